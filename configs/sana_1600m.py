"""`--config configs/sana_1600m.py` in a checkout; the config is sana_jax/configs/sana_1600m.py (`--config sana_1600m`)."""

from sana_jax.configs.sana_1600m import get_config  # noqa: F401
