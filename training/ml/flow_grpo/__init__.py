"""Flow-GRPO: GRPO group updates for flow-matching pipelines (SD3-like text-to-image, Wan-like
text-to-video), with the log-probability of each step from the SDE form of the Euler step."""
