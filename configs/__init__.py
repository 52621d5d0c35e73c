"""Thin files for `--config configs/NAME.py` in a checkout; the configs live in
sana_jax/configs/ (installed with the package; `--config NAME` names one)."""
