"""Package data: the demo's training config."""
