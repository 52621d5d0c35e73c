"""`--config configs/tiny.py` in a checkout; the config is sana_jax/configs/tiny.py (`--config tiny`)."""

from sana_jax.configs.tiny import get_config  # noqa: F401
