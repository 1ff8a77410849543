"""What the diffusion trainers share: DDIM steps that give each step's log-probability, sampling
through a diffusers pipeline's own components with those recorded, and LoRA adapters that load
back into a plain pipeline with ``load_lora_weights``."""
