"""`python train.py ...`: the training command, sana_jax/commands/train.py (installed as
`sana-train`). `import train` gives that module itself."""

import sys

from sana_jax.commands import train as _command

main = _command.main

if __name__ == "__main__":
  sys.exit(main())
sys.modules[__name__] = _command
