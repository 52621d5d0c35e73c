"""Moved to `sana_jax.shapes_eval.task`; this path stays as an alias for one release."""

import sys

from sana_jax.shapes_eval import task as _moved

if __name__ == "__main__":
  _moved.main()
else:
  sys.modules[__name__] = _moved
