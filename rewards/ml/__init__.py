"""Reward-model code in plain torch/transformers: no Django imports, so it can be read and tested alone.

- ``encoders``: image (CLIP/SigLIP), video (frames through the image tower) and text encoders loaded
  with ``from_pretrained`` from a local directory.
- ``data``: ``PairSet``, the arrays every trainer reads (cached features + judged pairs).
- ``<kind>/config.py`` + ``<kind>/trainer.py``: one folder per reward-model kind.
- ``model``: load any saved reward-model directory; ``metrics``: evaluation.
"""
