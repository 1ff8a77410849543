"""Diffusion-DPO (Wallace et al. 2023) offline from human pairs: winner and loser noised with the
same noise and timestep; the loss compares the model's and the reference's denoising errors."""
