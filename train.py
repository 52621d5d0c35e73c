"""Train a SANA DiT: `python train.py --config configs/tiny.py --workdir runs/tiny
[--config.train.steps=500 ...]`. Resumes from the workdir's newest checkpoint."""

import argparse
import sys

from sana_jax.config_loader import load_config, split_config_args


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_config_args(argv)
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--config", required=True, help="a configs/*.py file")
  ap.add_argument("--workdir", required=True, help="checkpoints, metrics and TensorBoard logs")
  ap.add_argument("--max_steps", type=int, default=None, help="stop after this step")
  ap.add_argument("--no_progress", action="store_true")
  args = ap.parse_args(argv)
  config = load_config(args.config, overrides)
  from sana_jax.train import loop
  loop.train(config, args.workdir, max_steps=args.max_steps, progress=not args.no_progress)
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
