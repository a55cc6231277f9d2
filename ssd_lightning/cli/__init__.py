"""Hydra entry points: `train`, `eval` and `predict` (root scripts train.py / eval.py / predict.py)."""
