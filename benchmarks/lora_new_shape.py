"""Worked example: teach the embedded ShapesEval model a fifth shape, a star, with LoRA on CPU.

The embedded model (sana_jax/assets/shapes_model) draws circles, squares, triangles and
crosses; it has never seen a star, and "star" is not in its word-level tokenizer (the word
reaches the model as <unk>, as a rare word would). The script runs the user's workflow end
to end with the real commands:

1. renders a dozen star images (32 px, the six ShapesEval colours) into OUT/images with
   their captions in OUT/images/metadata.jsonl ("a photo of a red star", ...);
2. python -m sana_jax.data.preprocess --source folder --captions OUT/images/metadata.jsonl
3. python train.py --config configs/shapes.py --config.train.lora.rank=R
   --config.train.lora.base=sana_jax/assets/shapes_model ... (only the adapters train);
4. samples held-out prompts (frames and seeds not in the training set) with the base model
   and with the trained LoRA merged (what `sample.py --lora OUT/run/lora/adapter.safetensors`
   does), and old-shape prompts to see what the adapter costs;
5. scores every sample with a template match: the largest foreground component is fitted by
   moments with each of the five shapes (ShapesEval's detector fit, plus a star template)
   and the best soft IoU names the shape. "star rate" = share of held-out star prompts whose
   sample is best explained by the star; a LoRA that learned nothing leaves it at the base
   model's (near 0). "old shapes kept" = share of old-shape samples whose class is still
   the prompted one.

  python benchmarks/lora_new_shape.py                      # a few CPU minutes
  python benchmarks/lora_new_shape.py --quick              # a smoke run (tens of steps)
  python benchmarks/lora_new_shape.py --docs docs/images   # also writes the before/after grids

The full run trains under `flock /tmp/heavy.lock` (shared machines: one heavy job at a
time); --quick (seconds of training) and --no_lock run it directly.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sana_jax.shapes_eval import task as shapes  # noqa: E402

COLORS = tuple(shapes.COLORS)  # red yellow green blue purple black
TRAIN_FRAMES = ("a photo of {}", "an image of {}")
HELD_OUT_FRAMES = ("a drawing of {}", "a picture with {}", "{} on a white background")
OLD_PROMPTS = ("a photo of a red circle", "a photo of a blue square", "a photo of a green triangle")
STAR_INNER = 0.45  # inner / outer radius of the five-pointed star


# ----------------------------------------------------------------------------- the star


def _star_polygon() -> np.ndarray:
  """(10, 2) vertices (u right, v down) of an upright five-pointed star whose bounding box
  is [-0.5, 0.5]^2 (scaled to fill it, as every ShapesEval shape does)."""
  ang = -np.pi / 2 + np.arange(10) * np.pi / 5
  rad = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER)
  pts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
  lo, hi = pts.min(0), pts.max(0)
  return (pts - (lo + hi) / 2) / (hi - lo)


_STAR = _star_polygon()


def star_inside(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Even-odd point-in-polygon test for the star (shapes.inside's frame)."""
  inside = np.zeros(np.broadcast(u, v).shape, bool)
  for (x0, y0), (x1, y1) in zip(_STAR, np.roll(_STAR, -1, axis=0)):
    crosses = (y0 > v) != (y1 > v)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at = x0 + (v - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (u < x_at)
  return inside


def _inside(cls: str):
  return star_inside if cls == "star" else (lambda u, v: shapes.inside(cls, u, v))


def coverage(cls, cx, cy, sx, sy, x0, y0, x1, y1, ss=shapes.SUPERSAMPLE) -> np.ndarray:
  """shapes.coverage for any of the five classes."""
  offs = (np.arange(ss, dtype=np.float64) + 0.5) / ss
  xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)
  ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)
  m = _inside(cls)((xs[None, :] - cx) / sx, (ys[:, None] - cy) / sy).astype(np.float32)
  return m.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))


def render_star(color: str, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """One star of `color` placed like a ShapesEval single object: uint8 (size, size, 3)."""
  spec = {"tag": "single_object", "include": [{"class": "square", "count": 1, "color": color}]}
  (obj,) = shapes.layout(spec, size, rng)
  img = np.full((size, size, 3), shapes.BACKGROUND, np.float32)
  x0, y0, x1, y1 = obj["box"]
  ix0, iy0, ix1, iy1 = int(x0), int(y0), min(int(np.ceil(x1)), size), min(int(np.ceil(y1)), size)
  a = coverage("star", (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, ix0, iy0, ix1, iy1)
  col = np.asarray(shapes.COLORS[color], np.float32)
  img[iy0:iy1, ix0:ix1] = img[iy0:iy1, ix0:ix1] * (1 - a[..., None]) + col * a[..., None]
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------- the score


CLASSES = (*shapes.SHAPES, "star")


def _moments(cls: str) -> tuple[float, float, float, float]:
  """Centroid and std of a class in its own frame (bounding box [-0.5, 0.5]^2)."""
  g = (np.arange(400) + 0.5) / 400 - 0.5
  u, v = np.meshgrid(g, g)
  m = _inside(cls)(u, v)
  return u[m].mean(), v[m].mean(), u[m].std(), v[m].std()


_MOMENTS = {c: _moments(c) for c in CLASSES}


def classify(image: np.ndarray) -> tuple[str | None, dict]:
  """(best class or None, {class: soft IoU}) for the largest foreground component of a
  uint8 image: ShapesEval's colour-mixing alpha, each class fitted by moments (as the
  evaluator's _fit_shape, without blur) and compared by soft IoU."""
  from scipy import ndimage

  from sana_jax.shapes_eval import evaluator as ev

  img = ev._as_float_image(image)  # pylint: disable=protected-access
  _, alpha = ev.color_maps(img, ev.estimate_background(img), 80.0)
  comps, n = ndimage.label(alpha >= 0.5, structure=np.ones((3, 3), bool))
  if n == 0:
    return None, {}
  sizes = ndimage.sum(np.ones_like(alpha), comps, index=range(1, n + 1))
  k = int(np.argmax(sizes)) + 1
  if sizes[k - 1] < 6:
    return None, {}
  sl = ndimage.find_objects(comps)[k - 1]
  h, w = alpha.shape
  y0, x0 = max(sl[0].start - 2, 0), max(sl[1].start - 2, 0)
  y1, x1 = min(sl[0].stop + 2, h), min(sl[1].stop + 2, w)
  own = ndimage.binary_dilation(comps[y0:y1, x0:x1] == k, structure=np.ones((3, 3), bool))
  weights = np.where(own, alpha[y0:y1, x0:x1], 0.0)
  ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
  a = weights.sum()
  mx, my = (weights * xs).sum() / a, (weights * ys).sum() / a
  sx = np.sqrt((weights * (xs - mx) ** 2).sum() / a)
  sy = np.sqrt((weights * (ys - my) ** 2).sum() / a)
  ious = {}
  for cls in CLASSES:
    u, v, su, sv = _MOMENTS[cls]
    bw, bh = sx / su, sy / sv
    tmpl = coverage(cls, mx - u * bw, my - v * bh, bw, bh, x0, y0, x1, y1)
    ious[cls] = float(np.minimum(tmpl, weights).sum() / max(np.maximum(tmpl, weights).sum(), 1e-6))
  best = max(ious, key=ious.get)
  return (best if ious[best] >= 0.5 else None), ious


# ------------------------------------------------------------------------- the steps


def write_folder(folder: pathlib.Path, num: int, seed: int) -> list[dict]:
  """num star images + metadata.jsonl (colours cycle; frames alternate)."""
  from PIL import Image

  folder.mkdir(parents=True)
  rows = []
  for i in range(num):
    color = COLORS[i % len(COLORS)]
    frame = TRAIN_FRAMES[(i // len(COLORS)) % len(TRAIN_FRAMES)]
    img = render_star(color, np.random.default_rng([seed, i]))
    name = f"star_{i:02d}.png"
    Image.fromarray(img).save(folder / name)
    rows.append({"file_name": name, "text": frame.format(f"a {color} star")})
  (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def held_out_prompts(n: int) -> list[str]:
  out = []
  for i in range(n):
    frame = HELD_OUT_FRAMES[i % len(HELD_OUT_FRAMES)]
    out.append(frame.format(f"a {COLORS[(i * 5 + 1) % len(COLORS)]} star"))
  return out


def run(cmd: list[str], lock: bool) -> float:
  if lock and pathlib.Path("/tmp").is_dir() and shutil.which("flock"):
    cmd = ["flock", "/tmp/heavy.lock", *cmd]
  print("$", " ".join(str(c) for c in cmd), flush=True)
  t = time.perf_counter()
  subprocess.run([str(c) for c in cmd], check=True, cwd=REPO)
  return time.perf_counter() - t


def sample_all(model_dir, lora_file, prompts, seeds):
  """Images for (prompt, seed) pairs from the model, with the LoRA merged when given (what
  `sample.py --lora` does)."""
  from sana_jax import bundle
  from sana_jax.lora import diffusers as lora_diffusers
  from sana_jax.lora import merge
  from sana_jax.pipeline import SanaPipeline

  b = bundle.load(model_dir)
  if lora_file is not None:
    tree, lcfg = lora_diffusers.load(lora_file, b.dit_config)
    b.dit_params, b.dit_config = merge.merge_into(b.dit_params, b.dit_config, tree, lcfg, 1.0)
  return SanaPipeline(b).generate(prompts, seeds)


def diffusers_check(adapter: pathlib.Path, out: pathlib.Path) -> tuple[float, float]:
  """Exports the adapter with `python -m sana_jax.lora export`, loads the file into diffusers'
  SanaTransformer2DModel (the embedded model converted, diffusers' Sana LoRA loader) and
  compares its output with ours plus the adapter (fp32, diffusers' numerics): returns
  (relative error, how far the adapter moves the output)."""
  import jax
  import torch
  from diffusers import SanaPipeline, SanaTransformer2DModel

  from sana_jax.lora import diffusers as lora_diffusers
  from sana_jax.lora import merge
  from sana_jax.models import dit
  from sana_jax.weights import dit as dit_weights

  jax.config.update("jax_default_matmul_precision", "highest")
  model = REPO / "sana_jax" / "assets" / "shapes_model"
  exported = out / "star_lora_diffusers.safetensors"
  run(
    [
      sys.executable,
      "-m",
      "sana_jax.lora",
      "export",
      "--model",
      model,
      "--lora",
      adapter,
      "--out",
      exported,
      "--overwrite",
    ],
    lock=False,
  )
  params, cfg, _ = dit_weights.load_flax(model / "transformer")
  params = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
  cfg = cfg.diffusers_compatible()
  tree, lcfg = lora_diffusers.load(adapter, cfg)
  config = dit_weights.to_diffusers_config(cfg)
  config.pop("_class_name")
  torch_model = SanaTransformer2DModel(**config).eval()
  sd = dit_weights.params_to_diffusers(params, cfg)
  torch_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()})
  state_dict, metadata = SanaPipeline.lora_state_dict(str(exported), return_lora_metadata=True)
  SanaPipeline.load_lora_into_transformer(state_dict, torch_model, metadata=metadata)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  y = rng.standard_normal((2, cfg.caption_len, cfg.caption_channels)).astype(np.float32)
  mask = np.ones((2, cfg.caption_len), np.int32)
  mask[0, 10:] = 0
  t = np.array([999.0, 400.0], np.float32)
  ours = np.asarray(dit.SanaDiT(lcfg).apply({"params": merge.attach(params, tree)}, x, t, y, mask))
  plain = np.asarray(dit.SanaDiT(cfg).apply({"params": params}, x, t, y, mask))
  with torch.no_grad():
    theirs = (
      torch_model(
        hidden_states=torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
        encoder_hidden_states=torch.from_numpy(y),
        timestep=torch.from_numpy(t),
        encoder_attention_mask=torch.from_numpy(mask.astype(np.float32)),
        return_dict=False,
      )[0]
      .numpy()
      .transpose(0, 2, 3, 1)
    )
  rel = lambda a, b: float(np.max(np.abs(a - b)) / np.max(np.abs(b)))  # noqa: E731
  return rel(ours, theirs), rel(plain, ours)


def grid_png(path, rows, labels, scale=3):
  """A small PNG: one row per (label, images), each image `scale` times enlarged."""
  from PIL import Image, ImageDraw

  n = max(len(r) for r in rows)
  cell, label_w, pad = 32 * scale, 64, 4
  out = Image.new("RGB", (label_w + n * (cell + pad), len(rows) * (cell + pad) + pad), "white")
  draw = ImageDraw.Draw(out)
  for r, (label, images) in enumerate(zip(labels, rows)):
    y = pad + r * (cell + pad)
    draw.text((4, y + cell // 2 - 6), label, fill=(0, 0, 0))
    for c, im in enumerate(images):
      out.paste(
        Image.fromarray(im).resize((cell, cell), Image.NEAREST), (label_w + c * (cell + pad), y)
      )
  out.save(path, optimize=True)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  ap.add_argument(
    "--out",
    type=pathlib.Path,
    default=pathlib.Path("/tmp/lora_new_shape"),
    help="work folder, replaced (default: %(default)s)",
  )
  ap.add_argument(
    "--num_images", type=int, default=12, help="training images (default: %(default)s)"
  )
  ap.add_argument("--steps", type=int, default=400, help="training steps (default: %(default)s)")
  ap.add_argument("--rank", type=int, default=8, help="LoRA rank (default: %(default)s)")
  ap.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
  ap.add_argument(
    "--targets",
    default="all",
    help="'default' (q, k, v of self and cross) or 'all' (default: %(default)s)",
  )
  ap.add_argument(
    "--eval_prompts", type=int, default=12, help="held-out star prompts (default: %(default)s)"
  )
  ap.add_argument(
    "--eval_seeds", type=int, default=2, help="seeds per prompt (default: %(default)s)"
  )
  ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 4 prompts x 1 seed")
  ap.add_argument(
    "--docs",
    type=pathlib.Path,
    default=None,
    help="write lora_star_before_after.png and lora_star_train.png here (default: no)",
  )
  ap.add_argument("--no_lock", action="store_true", help="train without flock /tmp/heavy.lock")
  ap.add_argument(
    "--check_only",
    type=pathlib.Path,
    default=None,
    help="only the diffusers check of this adapter file (default: the full run)",
  )
  args = ap.parse_args(argv)
  if args.check_only:
    args.out.mkdir(parents=True, exist_ok=True)
    err, moved = diffusers_check(args.check_only, args.out)
    print(
      f"diffusers with the exported LoRA vs ours: rel. error {err:.2e} (the adapter moves the output {moved:.2e})"
    )
    return 0
  if args.quick:
    args.steps, args.eval_prompts, args.eval_seeds = 20, 4, 1
  model = REPO / "sana_jax" / "assets" / "shapes_model"
  out = args.out
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  t0 = time.perf_counter()

  rows = write_folder(out / "images", args.num_images, seed=0)
  prep_s = run(
    [
      sys.executable,
      "-m",
      "sana_jax.data.preprocess",
      "--model",
      model,
      "--out",
      out / "data",
      "--source",
      "folder",
      "--images",
      out / "images",
      "--captions",
      out / "images" / "metadata.jsonl",
      "--name",
      "stars",
      "--no_progress",
    ],
    lock=False,
  )
  from sana_jax.models.dit_config import DEFAULT_LORA_TARGETS, LORA_TARGETS

  targets = LORA_TARGETS if args.targets == "all" else DEFAULT_LORA_TARGETS
  batch = min(args.num_images, 12)
  train_cmd = [
    sys.executable,
    "train.py",
    "--config",
    "configs/shapes.py",
    "--workdir",
    out / "run",
    f"--config.data.dir={out / 'data'}",
    f"--config.train.lora.rank={args.rank}",
    f"--config.train.lora.base={model}",
    f"--config.train.lora.targets={tuple(targets)!r}",
    f"--config.train.steps={args.steps}",
    f"--config.train.global_batch={batch}",
    f"--config.train.lr={args.lr}",
    "--config.train.warmup_steps=20",
    "--config.train.ema=off",
    f"--config.train.checkpoint_every={args.steps}",
    "--config.train.log_every=50",
  ]
  train_s = run(train_cmd, lock=not (args.no_lock or args.quick))
  adapter = out / "run" / "lora" / "adapter.safetensors"

  prompts = held_out_prompts(args.eval_prompts)
  flat = [p for p in prompts for _ in range(args.eval_seeds)]
  seeds = [1000 + k for k in range(len(flat))]
  old = [p for p in OLD_PROMPTS for _ in range(args.eval_seeds * 2)]
  old_seeds = [2000 + k for k in range(len(old))]
  results = {}
  for label, lora_file in (("base", None), ("lora", adapter)):
    imgs = sample_all(model, lora_file, flat + old, seeds + old_seeds)
    star_imgs, old_imgs = imgs[: len(flat)], imgs[len(flat) :]
    star_cls = [classify(im)[0] for im in star_imgs]
    old_cls = [classify(im)[0] for im in old_imgs]
    want_old = [p.split()[-1] for p in old]
    results[label] = dict(
      star_rate=float(np.mean([c == "star" for c in star_cls])),
      classes={c: star_cls.count(c) for c in set(star_cls)},
      old_kept=float(np.mean([c == w for c, w in zip(old_cls, want_old)])),
      images=star_imgs,
      old_images=old_imgs,
    )
  train_imgs = [
    np.asarray(__import__("PIL.Image").Image.open(out / "images" / r["file_name"])) for r in rows
  ]
  train_cls = [classify(im)[0] for im in train_imgs]

  print()
  print(
    f"training images: {len(rows)} (template match calls {train_cls.count('star')} of them star)"
  )
  print(
    f"held-out star prompts: {len(prompts)} x {args.eval_seeds} seeds; old-shape prompts: {len(old)}"
  )
  print(f"{'model':8s} {'star rate':>10s} {'old shapes kept':>16s}  classes of the star samples")
  for label in ("base", "lora"):
    r = results[label]
    cls = ", ".join(f"{k}: {v}" for k, v in sorted(r["classes"].items(), key=lambda kv: str(kv[0])))
    print(f"{label:8s} {r['star_rate']:10.2f} {r['old_kept']:16.2f}  {cls}")
  print(
    f"preprocess {prep_s:.0f} s, train {train_s:.0f} s ({args.steps} steps, rank {args.rank}, "
    f"{len(targets)} targets), total {time.perf_counter() - t0:.0f} s"
  )
  print(f"sample with it: python sample.py --prompt '{prompts[0]}' --lora {adapter}")
  try:
    err, moved = diffusers_check(adapter, out)
    print(
      f"diffusers with the exported LoRA vs ours: rel. error {err:.2e} (the adapter moves the output {moved:.2e})"
    )
  except ImportError as e:
    print(f"diffusers check skipped ({e})")
  if args.docs:
    args.docs.mkdir(parents=True, exist_ok=True)
    k = min(8, len(flat))
    grid_png(
      args.docs / "lora_star_before_after.png",
      [
        results["base"]["images"][:k],
        results["lora"]["images"][:k],
        results["base"]["old_images"][:k],
        results["lora"]["old_images"][:k],
      ],
      ["star base", "star LoRA", "old base", "old LoRA"],
    )
    grid_png(args.docs / "lora_star_train.png", [train_imgs[:12]], ["train"])
    print(
      f"wrote {args.docs / 'lora_star_before_after.png'} and {args.docs / 'lora_star_train.png'}"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
