"""`sana-convert KIND ARGS...`: the converters, one subcommand each.

  sana-convert dit     DiT weights: official .pth <-> diffusers folder <-> ours
  sana-convert gemma   Gemma-2 text encoder: a transformers folder -> ours
  sana-convert dcae    DC-AE autoencoder: a diffusers folder -> ours
  sana-convert bundle  a diffusers SanaPipeline folder -> one model folder for sana-sample

`sana-convert KIND --help` shows each one's options. In a checkout the same commands are
`python -m convert.dit|gemma|dcae` and `python -m sana_jax.bundle_from_diffusers`.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
  "dit": "sana_jax.convert.dit",
  "gemma": "sana_jax.convert.gemma",
  "dcae": "sana_jax.convert.dcae",
  "bundle": "sana_jax.convert.bundle_from_diffusers",
}


def main(argv=None) -> int:
  """Runs the subcommand's main; 2 with an `error: ...` line for a missing or unknown one."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] in ("-h", "--help"):
    print(f"usage: sana-convert {{{','.join(SUBCOMMANDS)}}} [ARGS...]\n\n{__doc__}")
    return 0
  if not argv or argv[0] not in SUBCOMMANDS:
    given = f"{argv[0]!r}" if argv else "none"
    print(
      f"usage: sana-convert {{{','.join(SUBCOMMANDS)}}} [ARGS...]\n"
      f"error: converter {given}: give one of {', '.join(SUBCOMMANDS)} "
      "(sana-convert --help lists them)",
      file=sys.stderr,
    )
    return 2
  module = importlib.import_module(SUBCOMMANDS[argv[0]])
  return module.main(argv[1:])


if __name__ == "__main__":
  sys.exit(main())
