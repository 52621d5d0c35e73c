"""Command line for best-of-N sampling with a judge tournament.

    python -m sana_jax.scaling.best_of_n --prompt "a red cube left of a blue ball" \\
        --n 32 --k 4 --judge nvila --judge_path ~/models/NVILA-Lite-2B-Verifier \\
        --judge_python ~/nvila-env/bin/python --model MODEL_FOLDER --out_dir out/bon

Every argument (n, k, sampling options, judge name, judge folder, judge python, prompts,
model folder, output folder) is checked before the generator is built or any image is
sampled; a bad one ends with `error: ...` and exit status 2. Output: OUT/{prompt
index:05d}/ as written by `run_best_of_n`, and OUT/summary.json, written into a temporary
sibling of OUT that becomes OUT when every prompt is done (an existing, non-empty OUT is
replaced only with --overwrite). If the judge fails, the partial folder stays and the error
names it (the candidates are never lost). See docs/best_of_n.md.

Generation goes through one seam, `generate_fn(prompt, seeds) -> list of uint8 (H, W, 3)`:
`--generate_fn module:function` names any such callable; without it the sana_jax pipeline
over `--model FOLDER` (default: the embedded ShapesEval model) is used
(`sana_jax.pipeline.make_generate_fn`), with `--steps` / `--guidance` if given.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from sana_jax.cli import CommandParser, UsageError  # noqa: F401  (re-exported)
from sana_jax.scaling.best_of_n import GenerateFn, check_request, run_best_of_n
from sana_jax.scaling.judges import JUDGE_NAMES, JudgeError, ShapesJudge, make_judge

# --------------------------------------------------------------------------------------
# the command-line contract (DESIGN.md decision 14), shared with sana_jax.eval.score_model
# and sana_jax.scaling.prune_cli: argparse errors as `error: ...` + exit 2, argument types
# that name the allowed values, outputs checked first and written whole (temporary sibling,
# then rename).
# --------------------------------------------------------------------------------------


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the module docstring's layout in --help."""


def int_at_least(minimum: int, maximum: int | None = None):
  """argparse type: an integer in [minimum, maximum]."""
  allowed = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"

  def parse(text: str) -> int:
    try:
      v = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}") from None
    if v < minimum or (maximum is not None and v > maximum):
      raise argparse.ArgumentTypeError(f"expected an integer {allowed}, got {text!r}")
    return v

  return parse


def float_in(minimum: float, maximum: float = math.inf, *, open_min: bool = False):
  """argparse type: a finite number >= minimum (> minimum if open_min) and <= maximum."""
  lo = ">" if open_min else ">="
  allowed = f"a finite number {lo} {minimum:g}" + (
    f" and <= {maximum:g}" if math.isfinite(maximum) else ""
  )

  def parse(text: str) -> float:
    try:
      v = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}") from None
    if not math.isfinite(v) or v < minimum or (open_min and v == minimum) or v > maximum:
      raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
    return v

  return parse


def int_list(minimum: int | None = None, *, distinct: bool = False):
  """argparse type: comma-separated integers (>= minimum; distinct), at least one."""
  what = "comma-separated integers" + (f" >= {minimum}" if minimum is not None else "")

  def parse(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    try:
      vals = [int(p) for p in parts]
    except ValueError:
      bad = next(p for p in parts if not _is_int(p))
      raise argparse.ArgumentTypeError(
        f"expected {what}, got {text!r} ({bad!r} is not an integer)"
      ) from None
    if minimum is not None and min(vals) < minimum:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if distinct and len(set(vals)) != len(vals):
      dup = sorted({v for v in vals if vals.count(v) > 1})
      raise argparse.ArgumentTypeError(
        f"expected distinct {what}, got {text!r} ({', '.join(map(str, dup))} repeated)"
      )
    return vals

  return parse


def _is_int(text: str) -> bool:
  try:
    int(text)
    return True
  except ValueError:
    return False


def check_new_output(path, flag: str, *, overwrite: bool, folder: bool = True) -> Path:
  """Checks (writing nothing) that a command may create `path` whole: an existing
  output is refused unless `overwrite` (an empty existing folder counts as absent), a
  file where a folder goes (or the reverse) always, and so is a place that cannot be
  written (probed by creating and removing a temporary folder in the nearest existing
  ancestor)."""
  p = Path(path)
  kind = "folder" if folder else "file"
  cwd = Path.cwd().resolve()
  if p.resolve() in (cwd, *cwd.parents) or not p.absolute().name:
    raise UsageError(
      f"{flag} {path}: the current folder or one above it; name a new {kind} for the output"
    )
  if p.exists() or p.is_symlink():
    if folder and not p.is_dir():
      raise UsageError(f"{flag} {path}: exists and is not a folder (expected a {kind})")
    if not folder and p.is_dir():
      raise UsageError(f"{flag} {path}: exists and is a folder (expected a {kind})")
    if not overwrite and not (folder and not any(p.iterdir())):
      raise UsageError(
        f"{flag} {path} already exists; pass --overwrite to replace it "
        "(it is replaced only once the new output is complete)"
      )
  anc = p.absolute().parent
  while not anc.exists():
    anc = anc.parent
  if not anc.is_dir():
    raise UsageError(f"{flag} {path}: {anc} is a file, not a folder")
  try:
    probe = tempfile.mkdtemp(prefix=".write-probe-", dir=anc)
    os.rmdir(probe)
  except OSError as e:
    raise UsageError(f"{flag} {path}: cannot write in {anc} ({e.strerror or e})") from None
  return p


def _replace(new: Path, dest: Path) -> None:
  """Moves `new` to `dest`; an existing `dest` is moved aside first and deleted after."""
  if dest.exists() or dest.is_symlink():
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(dest, old)
    os.rename(new, dest)
    if old.is_dir() and not old.is_symlink():
      shutil.rmtree(old)
    else:
      old.unlink()
  else:
    os.rename(new, dest)


@contextlib.contextmanager
def staged_folder(dest, *, keep_on: tuple = ()):
  """Yields a new temporary sibling folder of `dest` to write the output into; when the
  block ends normally it replaces `dest`. On an exception the partial folder is removed,
  except for the exception types in `keep_on` (then it stays, for the error to name)."""
  dest = Path(dest)
  parent = dest.absolute().parent
  parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=parent))
  try:
    yield tmp
  except keep_on:
    raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _replace(tmp, dest)


@contextlib.contextmanager
def staged_file(dest):
  """Yields a temporary sibling path of file `dest` (same suffix) to write; replaces
  `dest` when the block ends normally, removes the temporary file otherwise."""
  dest = Path(dest)
  dest.absolute().parent.mkdir(parents=True, exist_ok=True)
  tmp = dest.with_name(f".{dest.stem}.partial-{uuid.uuid4().hex[:8]}{dest.suffix}")
  try:
    yield tmp
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  os.replace(tmp, dest)


def check_model_folder(model, flag: str = "--model") -> Path:
  """A sana_jax model folder (default: the embedded ShapesEval model), checked without
  loading it."""
  from sana_jax import bundle
  from sana_jax.embedded import EMBEDDED_MODEL as DEFAULT_MODEL

  folder = Path(model) if model is not None else DEFAULT_MODEL
  try:
    bundle.check_folder(folder)
  except (bundle.BundleError, ValueError, KeyError, TypeError) as e:
    raise UsageError(f"{flag} {folder}: {e}") from None
  return folder


# --------------------------------------------------------------------------------------
# best-of-N
# --------------------------------------------------------------------------------------


def pipeline_generate_fn(model: str | None, **options) -> GenerateFn:
  """The sana_jax pipeline's generate_fn over a model folder (default: the embedded one);
  options: SamplingOptions fields (steps, guidance_scale, ...)."""
  from sana_jax.pipeline import make_generate_fn

  return make_generate_fn(model=None if model is None else str(model), **options)


def load_callable(spec: str) -> GenerateFn:
  """'package.module:function' -> the callable."""
  mod, sep, attr = spec.partition(":")
  if not sep or not mod or not attr:
    raise UsageError(f"--generate_fn must look like package.module:function, got {spec!r}")
  try:
    module = importlib.import_module(mod)
  except ImportError as e:
    raise UsageError(f"--generate_fn {spec!r}: cannot import {mod!r} ({e})") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise UsageError(f"--generate_fn {spec!r}: {attr!r} is not a callable in {mod}")
  return fn


def build_parser() -> CommandParser:
  ap = CommandParser(
    prog="python -m sana_jax.scaling.best_of_n", description=__doc__, formatter_class=HelpFormatter
  )
  ap.add_argument(
    "--prompt",
    action="append",
    default=[],
    help="a prompt (repeatable; default: none, then --prompts_file or the "
    "--shapes_metadata prompts)",
  )
  ap.add_argument("--prompts_file", help="text file, one prompt per line (default: none)")
  ap.add_argument(
    "--n",
    type=int_at_least(1),
    required=True,
    help="candidates per prompt, >= 1, any number (not only powers of two: "
    "byes fill the bracket); required, no default",
  )
  ap.add_argument(
    "--k",
    type=int_at_least(1),
    default=1,
    help="candidates kept per prompt, 1..n (default 1; the official script: 4)",
  )
  ap.add_argument(
    "--seed",
    type=int_at_least(0),
    default=0,
    help="first seed; candidates use seed..seed+n-1 (default 0)",
  )
  ap.add_argument(
    "--batch_size",
    type=int_at_least(1),
    default=None,
    help="seeds per generate_fn call (a multiple of the device count; default: n, all at once)",
  )
  ap.add_argument(
    "--steps",
    type=int_at_least(1),
    default=None,
    help="pipeline only: denoising steps (default: the model folder's pipeline.json)",
  )
  ap.add_argument(
    "--guidance",
    type=float_in(0.0),
    default=None,
    help="pipeline only: classifier-free guidance scale >= 0 (default: the "
    "model folder's pipeline.json)",
  )
  ap.add_argument(
    "--judge",
    required=True,
    choices=JUDGE_NAMES,
    help=f"one of {', '.join(JUDGE_NAMES)}; required, no default",
  )
  ap.add_argument("--judge_path", help="nvila, transformers: local model folder (default: none)")
  ap.add_argument(
    "--judge_python", help="nvila: the verifier environment's Python executable (default: none)"
  )
  ap.add_argument(
    "--judge_timeout",
    type=float_in(0.0, open_min=True),
    default=300.0,
    help="nvila: seconds per request (default 300)",
  )
  ap.add_argument(
    "--judge_batch",
    type=int_at_least(1),
    default=None,
    help="images per judge call (default: all n at once)",
  )
  ap.add_argument(
    "--judge_cuda_devices",
    help="nvila: CUDA_VISIBLE_DEVICES for the worker only, e.g. '1' (default: inherited)",
  )
  ap.add_argument(
    "--judge_yes_word", default="yes", help="transformers: the 'yes' answer word (default 'yes')"
  )
  ap.add_argument(
    "--judge_no_word", default="no", help="transformers: the 'no' answer word (default 'no')"
  )
  ap.add_argument(
    "--shapes_metadata",
    help="shapes: JSON-lines file of ShapesEval specifications with a 'prompt' "
    "field each; its prompts are used when no --prompt is given "
    "(default: none; required by --judge shapes)",
  )
  gen = ap.add_mutually_exclusive_group()
  gen.add_argument(
    "--model",
    help="model folder for the pipeline (default: the embedded ShapesEval "
    "model, sana_jax/assets/shapes_model)",
  )
  gen.add_argument(
    "--generate_fn",
    help="package.module:function with generate_fn's signature, instead of "
    "the pipeline (default: none, the pipeline)",
  )
  ap.add_argument(
    "--out_dir",
    required=True,
    help="output folder (required, no default); an existing non-empty one needs --overwrite",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out_dir, once the new output is complete (default: off, refuse)",
  )
  ap.add_argument(
    "--no_picture", action="store_true", help="skip bracket.png (default: off, draw it)"
  )
  return ap


def parse_args(argv=None):
  return build_parser().parse_args(argv)


def _shapes_specs(path: str) -> dict:
  p = Path(path)
  if not p.is_file():
    raise UsageError(f"--shapes_metadata {path}: no such file")
  specs = {}
  for ln, line in enumerate(p.read_text().splitlines(), 1):
    if line.strip():
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UsageError(f"--shapes_metadata {path}:{ln}: not JSON ({e.msg})") from None
      if not isinstance(obj, dict) or "prompt" not in obj:
        raise UsageError(f"--shapes_metadata {path}:{ln}: no 'prompt' field")
      specs[obj["prompt"]] = obj
  return specs


def build(args):
  """Checks everything that needs no model and builds (prompts, judge). Nothing is
  loaded or sampled; raises UsageError (a ValueError) naming the bad argument."""
  if not 1 <= args.k <= args.n:
    raise UsageError(f"--k {args.k}: expected 1 <= k <= n = {args.n} (--n)")
  check_request(args.n, args.k, batch_size=args.batch_size)
  if args.generate_fn and (args.steps is not None or args.guidance is not None):
    raise UsageError(
      "--steps and --guidance set the pipeline's sampling; with "
      "--generate_fn the callable decides (drop them or --generate_fn)"
    )
  prompts = list(args.prompt)
  for i, p in enumerate(prompts):
    if not p.strip():
      raise UsageError(f"--prompt {p!r} (number {i + 1}): a prompt must not be empty")
  if args.prompts_file:
    pf = Path(args.prompts_file)
    if not pf.is_file():
      raise UsageError(f"--prompts_file {args.prompts_file}: no such file")
    prompts += [ln.strip() for ln in pf.read_text().splitlines() if ln.strip()]
  if args.judge == "shapes":
    if not args.shapes_metadata:
      raise UsageError(
        "--judge shapes needs --shapes_metadata (the prompts' ShapesEval specifications)"
      )
    specs = _shapes_specs(args.shapes_metadata)
    prompts = prompts or list(specs)
    missing = [p for p in prompts if p not in specs]
    if missing:
      raise UsageError(
        f"--shapes_metadata {args.shapes_metadata}: no ShapesEval "
        f"specification for prompts {missing[:5]}"
      )
    judge = ShapesJudge(specs=specs)
  else:
    if args.judge == "nvila":
      kw = {"timeout_s": args.judge_timeout}
      if args.judge_cuda_devices is not None:
        kw["env"] = dict(os.environ, CUDA_VISIBLE_DEVICES=args.judge_cuda_devices)
    else:
      kw = {"yes_word": args.judge_yes_word, "no_word": args.judge_no_word}
    if args.judge_batch:
      kw["batch_size"] = args.judge_batch
    try:
      judge = make_judge(args.judge, path=args.judge_path, python=args.judge_python, **kw)
    except ValueError as e:
      raise UsageError(f"--judge {args.judge}: {e} (--judge_path / --judge_python)") from None
  if not prompts:
    raise UsageError("no prompts: give --prompt or --prompts_file")
  return prompts, judge


def main(argv=None, generate_fn: GenerateFn | None = None) -> int:
  args = parse_args(argv)
  judge = None
  try:
    prompts, judge = build(args)
    if generate_fn is None and args.generate_fn:
      generate_fn = load_callable(args.generate_fn)
    model = None if (generate_fn is not None) else check_model_folder(args.model)
    out = check_new_output(args.out_dir, "--out_dir", overwrite=args.overwrite)
  except ValueError as e:
    if judge is not None:
      judge.close()
    print(f"error: {e}", file=sys.stderr)
    return 2
  if generate_fn is None:
    options = {
      k: v for k, v in (("steps", args.steps), ("guidance_scale", args.guidance)) if v is not None
    }
    generate_fn = pipeline_generate_fn(model, **options)
  summary, partial = [], []
  try:
    with judge, staged_folder(out, keep_on=(JudgeError,)) as tmp:
      partial.append(tmp)
      for idx, prompt in enumerate(prompts):
        res = run_best_of_n(
          prompt,
          generate_fn,
          judge,
          tmp / f"{idx:05d}",
          n=args.n,
          k=args.k,
          seed=args.seed,
          batch_size=args.batch_size,
          judge_batch=args.judge_batch,
          picture=not args.no_picture,
        )
        summary.append(
          {
            "index": idx,
            "prompt": prompt,
            "winners": list(res.tournament.winners),
            "winner_seeds": res.winner_seeds,
            "winner_files": [str(p.relative_to(tmp)) for p in res.winner_paths],
          }
        )
        print(f"[{idx}] {prompt!r}: kept {res.winner_seeds}")
      (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
  except JudgeError as e:
    print(
      f"error: {e}\n(the partial output stays in {partial[0]}; --out_dir {out} was not written)",
      file=sys.stderr,
    )
    return 1
  print(f"wrote {out}: {len(prompts)} prompt(s), summary.json")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
