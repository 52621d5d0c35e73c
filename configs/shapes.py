"""`--config configs/shapes.py` in a checkout; the config is sana_jax/configs/shapes.py (`--config shapes`)."""

from sana_jax.configs.shapes import get_config  # noqa: F401
