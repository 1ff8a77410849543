"""Bradley-Terry reward head on cached features, with Davidson or Rao-Kupper ties."""
