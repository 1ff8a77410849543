"""Optional fine-tuning of an image encoder (CLIP/SigLIP vision tower) end to end with a Bradley-Terry head.

The other kinds train a head on cached, frozen features; this one also adapts the image tower, either by
unfreezing its last layers or with LoRA adapters (our own few lines, no peft). The result saves as a plain
transformers encoder (``encoder/``) plus a bt head that ``rewards.ml.model.load_reward_model`` reads.
"""
