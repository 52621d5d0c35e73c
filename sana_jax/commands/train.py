"""Train a SANA DiT (`sana-train`, or train.py in a checkout):
`python train.py --config configs/tiny.py --workdir runs/tiny [--config.train.steps=500 ...]`
(or `sana-train --config tiny ...` from any folder: a bare name is a packaged config).
Resumes from the workdir's newest checkpoint.

Any config field can be overridden with --config.FIELD=VALUE (the value must have the
field's type). Exit status: 0 when training reached its last step (train.steps, or
--max_steps); 143 (128 + SIGTERM) when a SIGTERM stopped it after saving a checkpoint:
run the same command again to resume (a scheduler's requeue does exactly that); 2 for bad
input (an `error: ...` line, nothing written); 1 for a failure during training (a
traceback, or `error:` for non-finite losses; the last good checkpoint is kept).
Several processes: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or
SANA_JAX_DISTRIBUTED=1 on a TPU pod slice or SLURM) and start the same command in each;
see docs/training.md. Compiled steps are kept in a persistent cache (--compile_cache,
--no_compile_cache; sana_jax/commands/compile_cache.py), so a restart does not recompile.
"""

import argparse
import sys

from sana_jax.cli import CommandParser, UsageError
from sana_jax.commands import compile_cache, malloc_settings
from sana_jax.config_loader import packaged_config_names

EXIT_PREEMPTED = 143


def _parser() -> argparse.ArgumentParser:
  ap = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument(
    "--config",
    required=True,
    help="a config file (a .py with get_config(), e.g. configs/tiny.py) or the name of "
    f"one installed with the package ({', '.join(packaged_config_names())}); required, "
    "no default",
  )
  ap.add_argument(
    "--workdir",
    required=True,
    help="where checkpoints (WORKDIR/checkpoints), metrics.jsonl and "
    "TensorBoard logs go; an existing run there is resumed; required, no "
    "default",
  )
  ap.add_argument(
    "--max_steps",
    type=int,
    default=None,
    help="stop after this step (checkpointing it) even if train.steps is "
    "larger (default: none, run to train.steps)",
  )
  ap.add_argument(
    "--no_progress",
    action="store_true",
    help="no progress bar; the start, resume and end lines are still printed "
    "(default: off, a tqdm bar is shown)",
  )
  compile_cache.add_arguments(ap)
  return ap


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def main(argv=None) -> int:
  malloc_settings.restart(argv)
  from sana_jax.config_loader import load_config, split_config_args

  argv = list(sys.argv[1:] if argv is None else argv)
  argv, overrides = split_config_args(argv)
  args = _parser().parse_args(argv)
  if args.max_steps is not None and args.max_steps < 1:
    return _error(f"--max_steps {args.max_steps}: must be a positive integer")
  try:
    config = load_config(args.config, overrides)
  except (ValueError, FileNotFoundError) as e:
    return _error(str(e))
  try:
    cache = compile_cache.resolve(args)
  except UsageError as e:
    return _error(str(e))
  compile_cache.enable(cache)
  from sana_jax.train import loop

  shown = " ".join(f"--config.{o}" for o in overrides)
  import jax

  try:
    from sana_jax import parallel

    parallel.maybe_initialize_distributed()
  except ValueError as e:
    return _error(str(e))
  if jax.process_index() == 0:
    print(f"train.py: config {args.config}{' ' + shown if shown else ''}", flush=True)
  try:
    state = loop.train(
      config, args.workdir, max_steps=args.max_steps, progress=not args.no_progress
    )
  except loop.UsageError as e:
    return _error(str(e))
  except loop.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  target = config.train.steps if args.max_steps is None else min(config.train.steps, args.max_steps)
  if int(state.step) < target:  # only SIGTERM stops the loop early
    return EXIT_PREEMPTED
  return 0


if __name__ == "__main__":
  sys.exit(main())
