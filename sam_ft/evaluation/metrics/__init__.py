"""Metrics of one object: overlap, surface distances, attributes."""
