"""Alias of sana_jax.convert.bundle_from_diffusers (its home beside the other converters;
`sana-convert bundle`); kept so `python -m sana_jax.bundle_from_diffusers` and imports of
this path keep working for a release."""

import sys

from sana_jax.convert import bundle_from_diffusers as _command

main = _command.main

if __name__ == "__main__":
  sys.exit(main())
sys.modules[__name__] = _command
