"""Kept for `from configs import common` in configs written against a checkout; the file is
sana_jax/configs/common.py."""

from sana_jax.configs.common import *  # noqa: F403
