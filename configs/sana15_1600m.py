"""`--config configs/sana15_1600m.py` in a checkout; the config is sana_jax/configs/sana15_1600m.py (`--config sana15_1600m`)."""

from sana_jax.configs.sana15_1600m import get_config  # noqa: F401
