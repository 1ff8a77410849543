"""Artifact classifier: probability that a sample is flagged with an artifact."""
