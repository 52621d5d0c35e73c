"""`python sample.py ...`: the sampling command, sana_jax/commands/sample.py (installed as
`sana-sample`). `import sample` gives that module itself."""

import sys

from sana_jax.commands import sample as _command

main = _command.main

if __name__ == "__main__":
  sys.exit(main())
sys.modules[__name__] = _command
