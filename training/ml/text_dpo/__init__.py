"""Offline DPO for text policies with TRL's DPOTrainer (no re-implementation), on the pairs people
judged: (prompt, chosen, rejected). LoRA through ``peft_config``."""
