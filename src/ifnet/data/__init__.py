"""Data: annotations, image loading, datasets and collate, report cleaning and vocabulary."""
