"""Moved to `sana_jax.shapes_eval.encoder`; this path stays as an alias for one release."""

import sys

from sana_jax.shapes_eval import encoder as _moved

sys.modules[__name__] = _moved
