"""Moved to `sana_jax.shapes_eval.evaluator`; this path stays as an alias for one release."""

import sys

from sana_jax.shapes_eval import evaluator as _moved

if __name__ == "__main__":
  _moved.main()
else:
  sys.modules[__name__] = _moved
