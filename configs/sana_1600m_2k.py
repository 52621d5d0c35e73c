"""`--config configs/sana_1600m_2k.py` in a checkout; the config is sana_jax/configs/sana_1600m_2k.py (`--config sana_1600m_2k`)."""

from sana_jax.configs.sana_1600m_2k import get_config  # noqa: F401
