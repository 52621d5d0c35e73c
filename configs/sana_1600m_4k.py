"""`--config configs/sana_1600m_4k.py` in a checkout; the config is sana_jax/configs/sana_1600m_4k.py (`--config sana_1600m_4k`)."""

from sana_jax.configs.sana_1600m_4k import get_config  # noqa: F401
