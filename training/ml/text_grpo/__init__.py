"""Online RL for text policies with TRL's GRPOTrainer (no re-implementation): our reward model is
passed as a plain callable in ``reward_funcs``; LoRA through ``peft_config``."""
