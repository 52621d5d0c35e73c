"""Builds and exports the embedded ShapesEval model folder (see configs/shapes.py).

  python -m sana_jax.shapes_model init --out MODEL      # tokenizer, text encoder, pipeline.json
  python -m sana_jax.shapes_model export --workdir RUN --model MODEL [--step N]
  python -m sana_jax.shapes_model curve --workdir RUN [RUN2 ...] --out curve.png
  python -m sana_jax.shapes_model probe --model MODEL   # word order in the caption tokens

`init` is deterministic: the word-level tokenizer covers sana_jax.data.shapes.vocabulary()
and the tiny Gemma-2 encoder starts from random weights (config.text_encoder.seed, token
table scaled by embed_scale) and is pre-trained by `sana_jax.shapes_encoder` as
config.text_encoder.pretrain says (~2 min on a laptop CPU; `probe` measures why).
`export` writes MODEL/transformer from a training run's EMA parameters (fp16 storage, so
the shipped model stays a few MB), with the null-caption embedding as its extra.

--out and --model have no default (the shipped sana_jax/assets/shapes_model is never a
silent target). Nothing that exists is replaced without --overwrite (init's --out folder,
export's MODEL/transformer, curve's --out file), and then only once the new output is
complete (written to a temporary sibling, then renamed). Bad arguments end with
`error: ...` and exit status 2 before anything is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import shutil
import sys
import uuid

import jax
import ml_dtypes  # noqa: F401  (bf16/fp16 numpy dtypes)
import numpy as np

from sana_jax import bundle
from sana_jax.embedded import EMBEDDED_MODEL
from sana_jax.cli import CommandParser, UsageError

DEFAULT_MODEL = EMBEDDED_MODEL


def shapes_config():
  from sana_jax.config_loader import load_config

  return load_config("shapes")


def text_encoder_config(config):
  from sana_jax.shapes_eval import task as shapes
  from sana_jax.models import text_encoder

  te = config.text_encoder
  vocab = len(shapes.vocabulary()) + 4  # + <pad>, <eos>, <bos>, <unk>
  return text_encoder.gemma2_tiny(
    vocab, hidden_size=te.hidden_size, num_layers=te.num_layers, layer_types=None
  )


def _check_new_output(flag: str, path: pathlib.Path, overwrite: bool, is_dir: bool) -> None:
  """`path` may be created (or, with overwrite, replaced): its kind matches, it is new or
  empty unless overwrite, and the nearest existing folder above it is writable."""
  path = pathlib.Path(path)
  if path.exists():
    if path.is_dir() != is_dir:
      raise UsageError(
        f"{flag} {path} is an existing {'folder' if path.is_dir() else 'file'};"
        f" give a {'folder' if is_dir else 'file'} path"
      )
    if not overwrite and not (is_dir and not any(path.iterdir())):
      raise UsageError(
        f"{flag} {path} already exists; pass --overwrite to replace it "
        "(once the new one is complete)"
      )
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
  if not os.access(parent, os.W_OK):
    raise UsageError(f"{flag} {path}: {parent} is not writable")


@contextlib.contextmanager
def _replace_whole(path: pathlib.Path, overwrite: bool, is_dir: bool):
  """Yields a temporary sibling of `path` to write; on success renames it to `path`,
  replacing an existing one only with overwrite (else FileExistsError, nothing touched)."""
  path = pathlib.Path(path)
  tag = uuid.uuid4().hex[:8]
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.new-{tag}{path.suffix}"
  old = path.parent / f".{path.name}.old-{tag}"
  if is_dir:
    tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      if not (overwrite or (is_dir and path.is_dir() and not any(path.iterdir()))):
        raise FileExistsError(f"{path} exists; not replaced without overwrite")
      os.rename(path, old)
    os.rename(tmp, path)
  finally:
    if tmp.is_dir():
      shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists():
      tmp.unlink()
    if old.is_dir():
      shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
      old.unlink()


def init(out: pathlib.Path, config=None, overwrite: bool = False) -> None:
  """Writes tokenizer/, text_encoder/ and pipeline.json of configs/shapes.py (or `config`)
  as the folder `out`, whole; an existing non-empty `out` is replaced only with overwrite
  (FileExistsError otherwise, before any work)."""
  out = pathlib.Path(out)
  if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
    raise FileExistsError(f"{out} exists; not replaced without overwrite")
  config = config or shapes_config()
  with _replace_whole(out, overwrite, is_dir=True) as tmp:
    _init_into(tmp, config)
  print(f"wrote tokenizer, text encoder and {bundle.PIPELINE_FILE} to {out}")


def _init_into(out: pathlib.Path, config) -> None:
  from sana_jax.shapes_eval import task as shapes
  from sana_jax.data.tokenizer import build_word_level_tokenizer
  from sana_jax.models import text_encoder
  from sana_jax.weights import gemma

  build_word_level_tokenizer(
    list(shapes.vocabulary()), str(out / "tokenizer"), lowercase=config.prompt.lowercase
  )
  tcfg = text_encoder_config(config)
  if tcfg.hidden_size != config.model.caption_channels:
    raise ValueError("text encoder width must equal model.caption_channels")
  params = text_encoder.init_params(tcfg, config.text_encoder.seed)
  params["embed"]["embedding"] = params["embed"]["embedding"] * config.text_encoder.get(
    "embed_scale", 1.0
  )
  pretrain = config.text_encoder.get("pretrain")
  if pretrain is not None and pretrain.steps > 0:
    from sana_jax.shapes_eval import encoder as shapes_encoder
    from sana_jax.models.prompts import load_tokenizer

    params, measured = shapes_encoder.pretrain(
      tcfg,
      params,
      load_tokenizer(str(out / "tokenizer")),
      prompt_config(config.prompt.to_dict()),
      shapes_encoder.PretrainConfig(**pretrain.to_dict()),
    )
    print(
      "caption encoder pre-trained (held-out captions): "
      + ", ".join(f"{k} {v:.4f}" for k, v in measured.items())
    )
  gemma.save_params(jax.device_get(params), tcfg, str(out / "text_encoder"))
  bundle.write_settings(
    out,
    image_size=config.image_size,
    flow_shift=config.flow_shift,
    sampler=config.sampler.to_dict(),
    prompt=config.prompt.to_dict(),
    autoencoder={"kind": config.autoencoder, "channels": config.model.in_channels},
  )


def null_caption(model: pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """(caption (L, Cy), mask (L,)) of the null prompt, from the folder's text encoder."""
  emb, mask = _prompt_encoder(model).encode_null(1)
  return emb[0], mask[0]


def checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  """The steps saved under workdir/checkpoints (sorted); [] if none."""
  root = pathlib.Path(workdir) / "checkpoints"
  if not root.is_dir():
    return []
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir())


def check_export(
  workdir: pathlib.Path, model: pathlib.Path, step: int | None, overwrite: bool
) -> int:
  """Every check export makes before loading anything (UsageError naming the argument);
  returns the step to export."""
  workdir, model = pathlib.Path(workdir), pathlib.Path(model)
  if not workdir.is_dir():
    raise UsageError(f"--workdir {workdir}: no such folder (a train.py workdir)")
  steps = checkpoint_steps(workdir)
  if not steps:
    raise UsageError(f"--workdir {workdir}: no checkpoints in {workdir / 'checkpoints'}")
  if step is not None and step not in steps:
    shown = ", ".join(map(str, steps[-10:]))
    raise UsageError(
      f"--step {step}: no checkpoint of that step in {workdir} (saved steps: "
      f"{'..., ' if len(steps) > 10 else ''}{shown})"
    )
  if not model.is_dir():
    raise UsageError(f"--model {model}: no such folder (make one with `init --out`)")
  missing = [
    p for p in (bundle.PIPELINE_FILE, "tokenizer", "text_encoder") if not (model / p).exists()
  ]
  if missing:
    raise UsageError(
      f"--model {model} is not a model folder made by init (missing: {', '.join(missing)})"
    )
  if (model / "transformer").exists() and not overwrite:
    raise UsageError(
      f"--model {model} already has a transformer/; pass --overwrite to "
      "replace it (once the new one is written)"
    )
  _check_new_output("--model", model / "transformer", True, is_dir=True)
  return steps[-1] if step is None else step


def export(
  workdir: pathlib.Path,
  model: pathlib.Path,
  step: int | None = None,
  storage_dtype: str = "float16",
  ema: bool = True,
  overwrite: bool = False,
) -> None:
  """Writes model/transformer from the run's checkpoint `step` (default: the latest),
  whole; an existing transformer/ is replaced only with overwrite."""
  from sana_jax.models.dit_config import DiTConfig
  from sana_jax.train import checkpoint
  from sana_jax.weights import dit as dit_weights

  model = pathlib.Path(model)
  step = check_export(workdir, model, step, overwrite)
  saved = checkpoint.read_config(workdir, step)
  cfg = DiTConfig.coerce(saved["model"])
  params, step = checkpoint.restore_params(workdir, step, ema=ema)
  params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(storage_dtype), params)
  null, _ = null_caption(model)
  with _replace_whole(model / "transformer", overwrite, is_dir=True) as tmp:
    tmp.rmdir()  # save_flax writes the folder itself
    dit_weights.save_flax(tmp, params, cfg, {"null_caption_embedding": null.astype(np.float32)})
  which = "EMA" if ema else "raw (non-EMA)"
  print(f"exported {which} parameters of step {step} ({storage_dtype}) to {model / 'transformer'}")


# Prompt pairs that differ only in which word comes where: a caption encoder whose outputs
# are (almost) context-free gives both the same bag of tokens, and a DiT that reads the
# caption through cross-attention (no position on the caption side) cannot tell them apart.
_SWAPS = {
  "colour binding": (
    "a photo of a red circle and a blue square",
    "a photo of a blue circle and a red square",
  ),
  "position": ("a photo of a circle left of a square", "a photo of a square left of a circle"),
}


def prompt_config(prompt: dict):
  """The PromptConfig of a shapes model's prompt settings (config.prompt or the "prompt"
  of pipeline.json): no CHI."""
  from sana_jax.models.prompts import PromptConfig

  return PromptConfig(
    max_length=prompt["max_length"], chi=None, lowercase=prompt.get("lowercase", False)
  )


def _prompt_encoder(model: pathlib.Path):
  from sana_jax.models.prompts import PromptEncoder
  import json

  p = json.loads((model / bundle.PIPELINE_FILE).read_text())["prompt"]
  return PromptEncoder.from_folders(
    str(model / "tokenizer"), str(model / "text_encoder"), prompt_config(p)
  )


def context_probe(model: pathlib.Path) -> dict:
  """How much word order the frozen text encoder's output carries.

  Returns {"same_word_cos": cosine between the outputs for the same word ("circle") after
  different context ("red" / "blue"): 1 means context-free; "<swap> bag_sim": mean over the
  tokens of one prompt of the best cosine match among the other prompt's tokens, for each
  pair in _SWAPS: 1 means the two prompts are the same bag of vectors; "distinct_word_cos":
  cosine of "circle" vs "square" in the same context (must stay well below 1)}.
  """
  enc = _prompt_encoder(model)
  prompts = [p for pair in _SWAPS.values() for p in pair] + [
    "a photo of a circle",
    "a photo of a square",
  ]
  emb, mask = enc.encode(prompts)
  emb, mask = np.asarray(emb, np.float32), np.asarray(mask) > 0

  def unit_tokens(i):
    x = emb[i][mask[i]]
    return x / np.linalg.norm(x, axis=-1, keepdims=True)

  circle = 1 + prompts[0].split().index("circle")  # word-level tokens after <bos>
  out = {
    "same_word_cos": float(unit_tokens(0)[circle] @ unit_tokens(1)[circle]),
    "distinct_word_cos": float(unit_tokens(4)[-1] @ unit_tokens(5)[-1]),
  }
  for k, name in enumerate(_SWAPS):
    a, b = unit_tokens(2 * k), unit_tokens(2 * k + 1)
    out[f"{name} bag_sim"] = float(np.mean(np.max(a @ b.T, axis=1)))
  return out


def check_curve(workdirs, out: pathlib.Path, overwrite: bool) -> None:
  for w in workdirs:
    if not (pathlib.Path(w) / "metrics.jsonl").is_file():
      raise UsageError(f"--workdir {w}: no metrics.jsonl there (a train.py workdir)")
  if pathlib.Path(out).suffix.lower() not in (".png", ".pdf", ".svg", ".jpg"):
    raise UsageError(f"--out {out}: give an image file name (.png, .pdf, .svg or .jpg)")
  _check_new_output("--out", out, overwrite, is_dir=False)


def curve(workdirs, out: pathlib.Path, smooth: int = 8, overwrite: bool = False) -> None:
  """Training loss (and its moving average) against step, from each workdir's
  metrics.jsonl; later workdirs (runs resumed with init_from) continue the step count.
  An existing `out` is replaced only with overwrite."""
  import json
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  steps, loss, bounds, offset = [], [], [], 0
  for workdir in workdirs:
    rows = [
      json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if l
    ]
    steps += [offset + r["step"] for r in rows]
    loss += [r["loss"] for r in rows]
    offset = steps[-1]
    bounds.append(offset)
  steps, loss = np.array(steps), np.array(loss)
  k = min(smooth, len(loss))
  avg = np.convolve(loss, np.ones(k) / k, mode="valid")
  fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
  ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss (batch, every log step)")
  ax.plot(steps[k - 1 :], avg, lw=2, label=f"moving average ({k})")
  for b in bounds[:-1]:
    ax.axvline(b, color="gray", ls="--", lw=1)
  ax.set_yscale("log")
  ax.set_xlabel("step")
  ax.set_ylabel("flow-matching loss")
  ax.set_title(
    "Embedded ShapesEval model: training loss"
    + (f" ({len(bounds)} stages)" if len(bounds) > 1 else "")
  )
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  with _replace_whole(out, overwrite, is_dir=False) as tmp:
    fig.savefig(tmp)
  print(f"wrote {out} ({len(steps)} points, last step {steps[-1]}, last loss {loss[-1]:.4f})")


def build_parser() -> argparse.ArgumentParser:
  ap = CommandParser(
    prog="python -m sana_jax.shapes_model",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  sub = ap.add_subparsers(dest="cmd", required=True, parser_class=CommandParser)
  overwrite = "replace an existing output once the new one is complete (default: off, refuse)"
  a = sub.add_parser("init", help="write tokenizer, text encoder and pipeline.json")
  a.add_argument(
    "--out",
    type=pathlib.Path,
    required=True,
    help="model folder to create, new or empty (required; no default)",
  )
  a.add_argument("--overwrite", action="store_true", help=overwrite)
  b = sub.add_parser("export", help="write MODEL/transformer from a training run")
  b.add_argument(
    "--workdir",
    type=pathlib.Path,
    required=True,
    help="train.py workdir with checkpoints/ (required)",
  )
  b.add_argument(
    "--model",
    type=pathlib.Path,
    required=True,
    help="model folder made by init (required; no default)",
  )
  b.add_argument(
    "--step", type=int, default=None, help="checkpoint step to export (default: the latest)"
  )
  b.add_argument(
    "--raw", action="store_true", help="export the raw parameters, not the EMA (default: off, EMA)"
  )
  b.add_argument("--overwrite", action="store_true", help=overwrite)
  d = sub.add_parser("probe", help="how much word order the text encoder's output carries")
  d.add_argument(
    "--model",
    type=pathlib.Path,
    default=DEFAULT_MODEL,
    help="model folder (default: the shipped sana_jax/assets/shapes_model; read only)",
  )
  c = sub.add_parser("curve", help="plot the training loss of one or more runs")
  c.add_argument(
    "--workdir",
    type=pathlib.Path,
    nargs="+",
    required=True,
    help="train.py workdirs with metrics.jsonl, in stage order (required)",
  )
  c.add_argument(
    "--out", type=pathlib.Path, required=True, help="image file to write, e.g. curve.png (required)"
  )
  c.add_argument("--overwrite", action="store_true", help=overwrite)
  return ap


def main(argv=None) -> int:
  """Returns the exit status: 0, or 2 after an `error: ...` line for a bad argument."""
  args = build_parser().parse_args(argv)
  try:
    if args.cmd == "init":
      _check_new_output("--out", args.out, args.overwrite, is_dir=True)
    elif args.cmd == "export":
      check_export(args.workdir, args.model, args.step, args.overwrite)
    elif args.cmd == "probe":
      try:
        bundle.check_folder(args.model)
      except bundle.BundleError as e:
        raise UsageError(f"--model {args.model}: {e}") from None
    else:
      check_curve(args.workdir, args.out, args.overwrite)
  except (UsageError, bundle.BundleError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.cmd == "init":
    init(args.out, overwrite=args.overwrite)
  elif args.cmd == "export":
    export(args.workdir, args.model, args.step, ema=not args.raw, overwrite=args.overwrite)
  elif args.cmd == "probe":
    for k, v in context_probe(args.model).items():
      print(f"{k:28s} {v:.3f}")
  else:
    curve(args.workdir, args.out, overwrite=args.overwrite)
  return 0


if __name__ == "__main__":
  sys.exit(main())
