"""Training app pieces: run config, seeding and provenance, logging, the trainer loop."""
