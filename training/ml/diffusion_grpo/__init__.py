"""GRPO-style group updates for diffusion models (as in Flow-GRPO / DanceGRPO, here on DDIM
pipelines): G images per prompt, advantages standardised within the group, the clipped ratio, and
a KL term to the reference policy (the same UNet with its LoRA adapter switched off)."""
