"""Moved to `sana_jax.shapes_eval.score`; this path stays as an alias for one release."""

import sys

from sana_jax.shapes_eval import score as _moved

if __name__ == "__main__":
  raise SystemExit(_moved.main())
else:
  sys.modules[__name__] = _moved
