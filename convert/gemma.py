"""`python -m convert.gemma ...`: sana_jax/convert/gemma.py (installed as `sana-convert gemma`).
`import convert.gemma` gives that module itself."""

import os
import sys

# `python convert/gemma.py` from an uninstalled checkout: the repository root on the path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sana_jax.convert import gemma as _command  # noqa: E402

main = _command.main

if __name__ == "__main__":
  sys.exit(main())
sys.modules[__name__] = _command
