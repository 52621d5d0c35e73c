"""Moved to `sana_jax.shapes_eval.tfds_builder`; this path stays as an alias for one release."""

import sys

from sana_jax.shapes_eval import tfds_builder as _moved

sys.modules[__name__] = _moved
