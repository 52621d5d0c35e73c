"""Depth pruning by block importance, from the command line.

  python -m sana_jax.scaling.prune_cli --checkpoint ckpt/dit --captions calib.npz \\
      --depth 20 --out ckpt/dit_pruned --chart importance.png
  python -m sana_jax.scaling.prune_cli --checkpoint ckpt/dit --captions prompts.txt \\
      --text-encoder ckpt/gemma2_jax --tokenizer ckpt/gemma-2-2b-it --keep 0,1,5,9 --out ...

--checkpoint: our folder (config.json + params.safetensors), a diffusers
  SanaTransformer2DModel folder or an official .pth (anything `python -m convert.dit` reads).
--captions: cached caption embeddings (.npz / .safetensors with 'caption' (N, L, Cy) float
  and 'mask' (N, L)), or prompts (.txt one per line, .jsonl with a "prompt"/"caption"/"text"
  field) encoded with the Gemma-2 text encoder in --text-encoder (our folder or a
  transformers folder) and the tokenizer in --tokenizer (default: --text-encoder).
--latents: optional .npz / .safetensors with 'latents' (N, H, W, C), clean latents paired
  with the captions; without it x0 is pure Gaussian noise (see sana_jax.scaling.pruning).

Writes the pruned checkpoint in our format (convert it with `python -m convert.dit`), a
block_importance.json next to it (importance per block, kept blocks), and with --chart a
bar chart of the importance per block (kept blocks dark, pruned ones light). Fine-tune the
pruned model with train.py started from --out.

Every argument is checked before the weights are loaded (a folder checkpoint's geometry is
read from its config.json; an official .pth's right after loading, before any computing):
bad input ends with `error: ...` and exit status 2. --out (and --chart) are written whole,
through a temporary sibling renamed at the end; existing ones are replaced only with
--overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import sys

import numpy as np

from sana_jax.scaling import best_of_n_cli as cli
from sana_jax.scaling import pruning
from sana_jax.weights import dit as W

DEFAULT_TIMESTEPS = "100,300,500,700,900"


# ---------------------------------------------------------------------------- loading


def load_checkpoint(path: str | pathlib.Path):
  """Any DiT checkpoint -> (params, DiTConfig, extras)."""
  from sana_jax.weights import dit as W
  from sana_jax.weights.io import CheckpointError

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such checkpoint: {path}")
  if path.is_file():
    return W.load_official(path)
  meta_file = path / "config.json"
  if not meta_file.exists():
    raise CheckpointError(f"{path}: a checkpoint folder needs a config.json")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") == W.FORMAT:
    return W.load_flax(path)
  if meta.get("_class_name") == "SanaTransformer2DModel":
    params, cfg = W.load_diffusers(path)
    return params, cfg, {}
  raise CheckpointError(
    f"{meta_file} describes neither a sana_jax DiT nor a diffusers SanaTransformer2DModel"
  )


def _read_arrays(path: pathlib.Path) -> dict[str, np.ndarray]:
  if path.suffix == ".npz":
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from sana_jax.weights.io import read_safetensors

  return read_safetensors(path)


def read_prompts(path: pathlib.Path) -> list[str]:
  if path.suffix == ".jsonl":
    prompts = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      rec = json.loads(line)
      text = next((rec[k] for k in ("prompt", "caption", "text") if k in rec), None)
      if not isinstance(text, str):
        raise ValueError(f"{path}:{n}: no 'prompt', 'caption' or 'text' string field")
      prompts.append(text)
  else:
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
  if not prompts:
    raise ValueError(f"{path}: no prompts")
  return prompts


def load_captions(args, caption_len: int) -> tuple[np.ndarray, np.ndarray]:
  """-> captions (N, L, Cy) float32, masks (N, L) int32."""
  path = pathlib.Path(args.captions)
  if not path.exists():
    raise FileNotFoundError(f"no such captions file: {path}")
  if path.suffix in (".npz", ".safetensors"):
    arrays = _read_arrays(path)
    missing = [k for k in ("caption", "mask") if k not in arrays]
    if missing:
      raise ValueError(
        f"{path} must hold 'caption' (N, L, Cy) and 'mask' (N, L); missing "
        f"{missing}, has {sorted(arrays)}"
      )
    return np.asarray(arrays["caption"], np.float32), np.asarray(arrays["mask"], np.int32)
  if args.text_encoder is None:
    raise ValueError(
      f"{path} holds prompts: pass --text-encoder (and --tokenizer) to encode "
      "them, or give cached embeddings (.npz / .safetensors)"
    )
  from tqdm import tqdm

  from sana_jax.models.prompts import PromptConfig, PromptEncoder

  prompts = read_prompts(path)
  pcfg = PromptConfig(
    max_length=args.max_length or caption_len, chi=None if args.no_chi else PromptConfig().chi
  )
  enc = PromptEncoder.from_folders(args.tokenizer or args.text_encoder, args.text_encoder, pcfg)
  embs, masks = [], []
  for i in tqdm(range(0, len(prompts), args.batch_size), desc="encode captions", unit="batch"):
    e, m = enc.encode(prompts[i : i + args.batch_size])
    embs.append(e)
    masks.append(m)
  return np.concatenate(embs), np.concatenate(masks)


# ------------------------------------------------------------------------------ chart


def plot_importance(importance, kept, path: str | pathlib.Path, title: str = "") -> None:
  """Bar chart of block importance (paper figure 5 style): kept blocks dark, pruned light."""
  importance = np.asarray(importance, np.float64)
  kept = set(int(i) for i in kept)
  n = importance.shape[0]
  colors = ["#1f4e79" if i in kept else "#9ec5e8" for i in range(n)]
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.patches import Patch

  fig, ax = plt.subplots(figsize=(max(4.0, min(12.0, 0.22 * n + 2.5)), 2.8), dpi=100)
  ax.bar(np.arange(n), importance, color=colors, width=0.8)
  ax.set_xlabel("block")
  ax.set_ylabel("importance  1 - E[cos]")
  ax.set_xlim(-0.7, n - 0.3)
  step = max(1, n // 20)
  ax.set_xticks(np.arange(0, n, step))
  if title:
    ax.set_title(title, fontsize=9)
  if len(kept) < n:
    ax.legend(
      handles=[
        Patch(color="#1f4e79", label=f"kept ({len(kept)})"),
        Patch(color="#9ec5e8", label=f"pruned ({n - len(kept)})"),
      ],
      fontsize=7,
      frameon=False,
    )
  ax.spines[["top", "right"]].set_visible(False)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ------------------------------------------------------------------------------- main


def _timesteps(text: str) -> list[float]:
  parts = [p.strip() for p in text.split(",")]
  try:
    vals = [float(p) for p in parts]
  except ValueError:
    raise argparse.ArgumentTypeError(
      f"expected comma-separated model times in [0, 1000], got {text!r}"
    ) from None
  if any(not 0 <= v <= 1000 for v in vals):  # also refuses nan
    raise argparse.ArgumentTypeError(
      f"expected comma-separated model times in [0, 1000], got {text!r}"
    )
  return vals


def _latent_size(text: str) -> tuple[int, int]:
  parts = text.lower().split("x")
  try:
    vals = [int(p) for p in parts]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected H or HxW (integers >= 1), got {text!r}") from None
  if len(vals) not in (1, 2) or min(vals) < 1:
    raise argparse.ArgumentTypeError(f"expected H or HxW (integers >= 1), got {text!r}")
  return (vals[0], vals[-1])


def build_parser() -> argparse.ArgumentParser:
  ap = cli.CommandParser(
    prog="python -m sana_jax.scaling.prune_cli",
    description=__doc__,
    formatter_class=cli.HelpFormatter,
  )
  ap.add_argument(
    "--checkpoint",
    required=True,
    help="DiT checkpoint: our folder, a diffusers folder or an official .pth "
    "(required, no default)",
  )
  ap.add_argument(
    "--captions",
    help="calibration captions: .npz/.safetensors embeddings, or prompts "
    "(.txt/.jsonl) to encode with --text-encoder (default: none; needed "
    "by --depth and --chart)",
  )
  ap.add_argument(
    "--text-encoder",
    help="Gemma-2 folder, ours or transformers (default: none; needed for prompt captions)",
  )
  ap.add_argument("--tokenizer", help="tokenizer folder (default: --text-encoder)")
  ap.add_argument(
    "--max-length",
    type=cli.int_at_least(1),
    default=None,
    help="caption tokens kept (default: the model's caption_len)",
  )
  ap.add_argument(
    "--no-chi",
    action="store_true",
    help="encode prompts without the complex human instruction (default: off, with it)",
  )
  ap.add_argument(
    "--latents",
    help=".npz/.safetensors with 'latents' (N, H, W, C) paired with "
    "the captions (default: none, pure noise)",
  )
  ap.add_argument(
    "--latent-size",
    type=_latent_size,
    default=None,
    help="H or HxW of the noise latents (default: the model's sample_size)",
  )
  ap.add_argument(
    "--timesteps",
    type=_timesteps,
    default=_timesteps(DEFAULT_TIMESTEPS),
    help=f"model times in [0, 1000] (default {DEFAULT_TIMESTEPS})",
  )
  ap.add_argument(
    "--draws",
    type=cli.int_at_least(1),
    default=1,
    help="noise draws per caption and timestep (default 1)",
  )
  ap.add_argument(
    "--batch-size",
    type=cli.int_at_least(1),
    default=8,
    help="captions per forward (default 8; the result does not depend on it)",
  )
  ap.add_argument(
    "--seed", type=cli.int_at_least(0), default=0, help="seed of the noise draws (default 0)"
  )
  group = ap.add_mutually_exclusive_group(required=True)
  group.add_argument(
    "--depth",
    type=cli.int_at_least(1),
    help="keep this many most important blocks (one of --depth / --keep is required; no default)",
  )
  group.add_argument(
    "--keep",
    type=cli.int_list(0, distinct=True),
    help="explicit distinct block indices, e.g. 0,1,5,9, kept in this order (no default)",
  )
  ap.add_argument(
    "--out",
    required=True,
    help="folder of the pruned checkpoint, our format (required, no default); "
    "an existing non-empty one needs --overwrite",
  )
  ap.add_argument("--chart", help="PNG bar chart of the importance per block (default: none)")
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out / --chart, once the new output is complete "
    "(default: off, refuse)",
  )
  return ap


def checkpoint_config(path: pathlib.Path):
  """The DiTConfig of a checkpoint folder, read from its config.json without loading any
  weights; None for an official .pth (its geometry is in the weights). UsageError if the
  path is no checkpoint."""
  from sana_jax.models.dit_config import DiTConfig

  if not path.exists():
    raise cli.UsageError(f"--checkpoint {path}: no such file or folder")
  if path.is_file():
    return None
  meta_file = path / "config.json"
  if not meta_file.exists():
    raise cli.UsageError(
      f"--checkpoint {path}: a checkpoint folder needs a config.json (ours or diffusers')"
    )
  try:
    meta = json.loads(meta_file.read_text())
    if meta.get("format") == W.FORMAT:
      return DiTConfig.coerce(meta["model"])
    if meta.get("_class_name") == "SanaTransformer2DModel":
      return W.from_diffusers_config(meta)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise cli.UsageError(f"--checkpoint {path}: unreadable {meta_file} ({e})") from None
  raise cli.UsageError(
    f"--checkpoint {path}: {meta_file} describes neither a sana_jax DiT "
    "nor a diffusers SanaTransformer2DModel"
  )


def check_args(args, cfg) -> dict:
  """Every check that needs no model weights (cfg: the checkpoint's DiTConfig, or None for
  a .pth, whose geometry checks then run right after loading). Returns the calibration
  inputs read so far: {"captions", "masks"} for cached embeddings, {"prompts"} for text,
  and {"latents"}. Raises UsageError naming the argument."""
  if args.captions is None and (args.depth is not None or args.chart):
    raise cli.UsageError(
      "--captions is needed to compute block importance (for --depth or --chart)"
    )
  if args.captions is None and args.latents:
    raise cli.UsageError("--latents pairs with --captions; give both or neither")
  if cfg is not None:
    check_geometry(args, cfg)
  out: dict = {}
  if args.captions is not None:
    path = pathlib.Path(args.captions)
    if not path.is_file():
      raise cli.UsageError(f"--captions {path}: no such file")
    if path.suffix in (".npz", ".safetensors"):
      try:
        arrays = _read_arrays(path)
      except Exception as e:  # a damaged file: name it
        raise cli.UsageError(f"--captions {path}: unreadable ({e})") from None
      missing = [k for k in ("caption", "mask") if k not in arrays]
      if missing:
        raise cli.UsageError(
          f"--captions {path} must hold 'caption' (N, L, Cy) and 'mask' "
          f"(N, L); missing {missing}, has {sorted(arrays)}"
        )
      out["captions"] = np.asarray(arrays["caption"], np.float32)
      out["masks"] = np.asarray(arrays["mask"], np.int32)
    else:
      try:
        out["prompts"] = read_prompts(path)
      except (ValueError, UnicodeDecodeError) as e:
        raise cli.UsageError(f"--captions {path}: {e}") from None
      if args.text_encoder is None:
        raise cli.UsageError(
          f"--captions {path} holds prompts: pass --text-encoder (and "
          "--tokenizer) to encode them, or give cached embeddings "
          "(.npz / .safetensors)"
        )
      for flag, folder in (("--text-encoder", args.text_encoder), ("--tokenizer", args.tokenizer)):
        if folder is not None and not pathlib.Path(folder).is_dir():
          raise cli.UsageError(f"{flag} {folder}: no such folder")
      if not (pathlib.Path(args.text_encoder) / "config.json").is_file():
        raise cli.UsageError(
          f"--text-encoder {args.text_encoder}: no config.json (expected "
          "our Gemma-2 folder or a transformers one)"
        )
  if args.latents:
    lp = pathlib.Path(args.latents)
    if not lp.is_file():
      raise cli.UsageError(f"--latents {lp}: no such file")
    try:
      arrays = _read_arrays(lp)
    except Exception as e:
      raise cli.UsageError(f"--latents {lp}: unreadable ({e})") from None
    if "latents" not in arrays:
      raise cli.UsageError(f"--latents {lp} must hold 'latents' (N, H, W, C); has {sorted(arrays)}")
    out["latents"] = arrays["latents"]
  if cfg is not None:
    check_calibration(args, cfg, out)
  cli.check_new_output(args.out, "--out", overwrite=args.overwrite)
  if args.chart:
    cli.check_new_output(args.chart, "--chart", overwrite=args.overwrite, folder=False)
    if pathlib.Path(args.chart).suffix.lower() != ".png":
      raise cli.UsageError(f"--chart {args.chart}: expected a .png file name")
  return out


def check_geometry(args, cfg) -> None:
  """--depth / --keep against the checkpoint's depth."""
  if args.depth is not None and not 1 <= args.depth <= cfg.depth:
    raise cli.UsageError(
      f"--depth {args.depth}: expected 1..{cfg.depth} (the checkpoint has {cfg.depth} blocks)"
    )
  if args.keep is not None:
    bad = [i for i in args.keep if not 0 <= i < cfg.depth]
    if bad:
      raise cli.UsageError(
        f"--keep {','.join(map(str, args.keep))}: block indices "
        f"{bad} out of range; the checkpoint has blocks 0..{cfg.depth - 1}"
      )


def check_calibration(args, cfg, inputs: dict) -> None:
  """Cached captions and latents against the model's caption width and channels."""
  if "captions" in inputs:
    try:
      pruning._check_calibration(  # pylint: disable=protected-access
        cfg,
        inputs["captions"],
        inputs["masks"],
        inputs.get("latents"),
        args.latent_size or cfg.sample_size,
      )
    except ValueError as e:
      flag = "--latents" if str(e).startswith("latents") else "--captions"
      raise cli.UsageError(f"{flag} {getattr(args, flag[2:])}: {e}") from None
  elif "latents" in inputs:
    lat = np.asarray(inputs["latents"])
    if lat.ndim != 4 or lat.shape[-1] != cfg.in_channels:
      raise cli.UsageError(
        f"--latents {args.latents}: expected (N, H, W, {cfg.in_channels}), got {lat.shape}"
      )


def main(argv=None) -> int:
  args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    cfg = checkpoint_config(pathlib.Path(args.checkpoint))
    inputs = check_args(args, cfg)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  import jax
  from tqdm import tqdm

  from sana_jax.weights.io import CheckpointError

  try:
    params, cfg, extras = load_checkpoint(args.checkpoint)
  except CheckpointError as e:
    print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
    return 2
  print(f"loaded {args.checkpoint}: depth {cfg.depth}, hidden {cfg.hidden_size}")
  try:  # a .pth's geometry is known only now; for folders these passed already
    check_geometry(args, cfg)
    check_calibration(args, cfg, inputs)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  importance = None
  if args.captions is not None:
    if "captions" in inputs:
      captions, masks = inputs["captions"], inputs["masks"]
    else:
      captions, masks = load_captions(args, cfg.caption_len)
    total = pruning.num_samples(len(captions), args.timesteps, args.draws)
    with tqdm(total=total, desc="block importance", unit="sample") as bar:
      importance = pruning.block_importance(
        params,
        cfg,
        captions,
        masks,
        key=jax.random.key(args.seed),
        timesteps=args.timesteps,
        num_draws=args.draws,
        latents=inputs.get("latents"),
        latent_size=args.latent_size,
        batch_size=args.batch_size,
        progress=bar.update,
      )

  new_params, new_cfg, kept = pruning.prune(
    params, cfg, depth=args.depth, indices=args.keep, importance=importance
  )
  report = {
    "source": str(args.checkpoint),
    "source_depth": cfg.depth,
    "depth": new_cfg.depth,
    "kept": kept,
    "importance": None if importance is None else [float(v) for v in importance],
    "calibration": None
    if args.captions is None
    else {
      "captions": str(args.captions),
      "timesteps": args.timesteps,
      "draws": args.draws,
      "seed": args.seed,
      "x0": "latents" if args.latents else "gaussian noise",
    },
  }
  with contextlib.ExitStack() as stack:
    folder = stack.enter_context(cli.staged_folder(args.out))
    W.save_flax(folder, jax.device_get(new_params), new_cfg, extras)
    (folder / "block_importance.json").write_text(json.dumps(report, indent=2))
    if args.chart:
      chart = stack.enter_context(cli.staged_file(args.chart))
      plot_importance(
        importance, kept, chart, title=f"block importance, {cfg.depth} -> {new_cfg.depth} blocks"
      )
  if importance is not None:
    for i, v in enumerate(importance):
      print(f"block {i:3d}  importance {v:.6f}  {'kept' if i in kept else 'PRUNED'}")
  if args.chart:
    print(f"wrote {args.chart}")
  print(f"wrote {args.out}: depth {new_cfg.depth}, kept blocks {kept}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
