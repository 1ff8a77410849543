"""Online RL for text policies with TRL's RLOOTrainer: REINFORCE with a leave-one-out baseline
over the completions of a prompt, the same reward callables as text GRPO."""
