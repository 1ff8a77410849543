"""Multi-aspect reward model: one Bradley-Terry head per aspect plus the overall head."""
