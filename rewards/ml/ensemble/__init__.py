"""Ensemble of Bradley-Terry heads on bootstrap resamples: reward = mean, uncertainty = spread."""
