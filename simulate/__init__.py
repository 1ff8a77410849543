"""Simulation: the demo's procedural generators (images, clips, texts) and, next, simulated
annotators and oracles. Used by the demo (`manage.py seed_demo`) and by tests; the labeling
platform (`annotate`) knows nothing of it."""
