"""DDPO (Black et al. 2023): policy-gradient fine-tuning of a text-to-image diffusion model on a
reward, with DDIM sampling as the policy and PPO's clipped objective over the denoising steps."""
