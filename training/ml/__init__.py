"""RL fine-tuning without Django: one folder per algorithm (``<algo>/config.py`` + ``trainer.py``),
plus ``diffusion/``, the sampling-with-log-probabilities the diffusion trainers share."""
