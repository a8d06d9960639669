"""The embedded default: a procedural chest-phantom dataset, so `ifnet demo` needs no download."""
