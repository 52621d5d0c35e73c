"""`--config configs/sana15_4800m.py` in a checkout; the config is sana_jax/configs/sana15_4800m.py (`--config sana15_4800m`)."""

from sana_jax.configs.sana15_4800m import get_config  # noqa: F401
