"""`--config configs/sana_600m.py` in a checkout; the config is sana_jax/configs/sana_600m.py (`--config sana_600m`)."""

from sana_jax.configs.sana_600m import get_config  # noqa: F401
