"""ShapesEval evaluator: a pixel-level detector plus GenEval's scoring rules.

Detection (no learned weights, no reading of the spec):

1. Background = median colour of the image border.
2. Every pixel is explained as a mix of the background and one palette colour: for each
   colour c, t_c = projection of (pixel - bg) on (c - bg), clipped to [0, 1], and the
   residual is the distance to that mixing line. The pixel takes the colour with the
   smallest residual; its coverage ("alpha") is t. Pixels whose residual exceeds
   `tolerance` are unexplained and ignored. This is robust to anti-aliasing, blur against
   the background and mild noise.
3. Connected components (8-neighbourhood) of alpha >= 0.5 per colour; components under
   `min_area` pixels are dropped as noise.
4. Shape by fitting: for each component the alpha-weighted centroid and standard
   deviations are measured; each shape class is placed with the same centroid and spread
   (its known moments in its own frame) and rasterised at the same pixel grid; the class
   with the highest soft IoU with the observed alpha wins, and that IoU is the detection's
   confidence. Components whose best IoU is under `min_confidence` are not objects.

Scoring follows GenEval's `evaluate` (geneval/evaluation/evaluate_images.py):

- each include entry needs >= count detections of its class (detections ranked with the
  requested colour first, then by confidence; GenEval ranks by detector confidence only);
- the colour of those detections must be the requested one;
- position: each of them must be <relation> every object of the referenced entry, by
  GenEval's rule on bounding boxes (centre offset minus 0.1 x summed sizes, normalised,
  > 0.5 along the axis);
- exclude entries fail when the image holds >= count detections of the class (counting
  prompts exclude count + 1, so extra instances are penalised).

The report is GenEval's: accuracy per tag and overall = mean over tags.

Command line, on GenEval's folder layout (<images>/<00000>/samples/<0000>.png, with
<images>/<00000>/metadata.jsonl or a --metadata jsonl whose line i is folder i)::

    python -m sana_jax.eval.shapes --images DIR [--metadata FILE] [--out results.jsonl]

Its arguments (folders, specifications, output files) are checked before any image is
scored (bad input: `error: ...`, exit status 2); --out / --json are written whole and an
existing one is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import json
import os
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from sana_jax.shapes_eval.task import (
  CATEGORIES,
  COLORS,
  RELATIONS,
  SHAPES,
  coverage,
  inside,
  relation_strength,
)

_PALETTE = np.asarray([COLORS[c] for c in COLORS], np.float32)  # (K, 3)
_COLOR_NAMES = tuple(COLORS)


@dataclasses.dataclass(frozen=True)
class Detection:
  """One detected object. box: (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

  cls: str
  color: str
  box: tuple
  area: float  # alpha-weighted area in pixels
  confidence: float  # soft IoU of the best shape fit, in [0, 1]


class ShapesResult(NamedTuple):
  """The verdict on one image.

  correct: all constraints hold (GenEval's rule). reason: why not ("" when correct).
  score: soft match in [0, 1], the mean over constraints of their degree of satisfaction
    (1 exactly when correct); a tie-break for best-of-N.
  detections: what the detector saw.
  """

  correct: bool
  reason: str
  score: float
  detections: tuple = ()


# ----------------------------------------------------------------------------- detector


@functools.lru_cache(maxsize=None)
def _shape_moments(shape: str) -> tuple[float, float, float, float]:
  """Centroid (u, v) and standard deviations (su, sv) of a shape in its unit bounding box."""
  n = 801
  g = (np.arange(n) + 0.5) / n - 0.5
  m = inside(shape, g[None, :], g[:, None]).astype(np.float64)
  a = m.sum()
  u = (m * g[None, :]).sum() / a
  v = (m * g[:, None]).sum() / a
  su = np.sqrt((m * (g[None, :] - u) ** 2).sum() / a)
  sv = np.sqrt((m * (g[:, None] - v) ** 2).sum() / a)
  return float(u), float(v), float(su), float(sv)


def _as_float_image(image: np.ndarray) -> np.ndarray:
  if (
    not isinstance(image, np.ndarray)
    or image.dtype != np.uint8
    or image.ndim != 3
    or image.shape[-1] != 3
  ):
    desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
    raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {desc}")
  if min(image.shape[:2]) < 8:
    raise ValueError(f"image too small for detection: {image.shape}")
  return image.astype(np.float32)


def estimate_background(img: np.ndarray) -> np.ndarray:
  """Median colour of the outermost pixel ring: float32 (3,)."""
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]], axis=0)
  return np.median(border, axis=0).astype(np.float32)


def color_maps(img: np.ndarray, background: np.ndarray, tolerance: float):
  """Per-pixel colour label (-1 = unexplained), coverage alpha and residual.

  img: float32 (H, W, 3) in [0, 255]. Returns (label int (H, W), alpha float32 (H, W)).
  """
  d = _PALETTE - background[None, :]  # (K, 3)
  dd = np.maximum((d * d).sum(-1), 1.0)  # (K,)
  x = img - background  # (H, W, 3)
  dot = x @ d.T  # (H, W, K)
  t = np.clip(dot / dd, 0.0, 1.0)
  # |x - t d|^2 = |x|^2 - 2 t x.d + t^2 |d|^2
  resid2 = (x * x).sum(-1, keepdims=True) - 2 * t * dot + t * t * dd
  label = np.argmin(resid2, axis=-1)
  alpha = np.take_along_axis(t, label[..., None], axis=-1)[..., 0]
  r2 = np.take_along_axis(resid2, label[..., None], axis=-1)[..., 0]
  label = np.where(r2 <= tolerance**2, label, -1)
  alpha = np.where(label >= 0, alpha, 0.0).astype(np.float32)
  return label, alpha


BLUR_LEVELS = (0.0, 0.5, 0.9)  # gaussian blur (px) the shape fit also tries


def _fit_shape(weights: np.ndarray, y0: int, x0: int):
  """Best shape for a soft mask `weights` (h, w) located at (y0, x0): (class, IoU).

  Each class is fitted by moments under a few assumed blur levels (blur adds its variance
  to the observed one), rasterised, blurred alike and compared by soft IoU; the best
  (class, blur) pair wins.
  """
  ys, xs = np.mgrid[y0 : y0 + weights.shape[0], x0 : x0 + weights.shape[1]]
  ys, xs = ys + 0.5, xs + 0.5
  a = weights.sum()
  mx, my = (weights * xs).sum() / a, (weights * ys).sum() / a
  vx = (weights * (xs - mx) ** 2).sum() / a
  vy = (weights * (ys - my) ** 2).sum() / a
  h, w = weights.shape
  best, best_iou = None, -1.0
  for blur in BLUR_LEVELS:
    if best_iou >= 0.93:  # a sharp fit this good leaves nothing to explain by blur
      break
    tx, ty = vx - blur * blur, vy - blur * blur
    if min(tx, ty) < 1.0:  # the blur cannot be larger than the shape
      continue
    for shape in SHAPES:
      u, v, su, sv = _shape_moments(shape)
      bw, bh = np.sqrt(tx) / su, np.sqrt(ty) / sv
      cx, cy = mx - u * bw, my - v * bh
      tmpl = coverage(shape, cx, cy, bw, bh, x0, y0, x0 + w, y0 + h)
      if blur > 0:
        tmpl = ndimage.gaussian_filter(tmpl, blur, mode="constant")
      iou = np.minimum(tmpl, weights).sum() / max(np.maximum(tmpl, weights).sum(), 1e-6)
      if iou > best_iou:
        best, best_iou = shape, float(iou)
  return best, best_iou


def detect(
  image: np.ndarray,
  *,
  tolerance: float = 80.0,
  min_area: float | None = None,
  min_confidence: float = 0.5,
  background: Sequence[float] | None = None,
) -> list[Detection]:
  """Detect the shapes in a uint8 (H, W, 3) image; sorted by confidence, best first.

  min_area: smallest component (pixels with alpha >= 0.5) kept; default
    max(6, 0.003 * H * W) (6 px at 32 px, 12 at 64 px).
  """
  img = _as_float_image(image)
  H, W = img.shape[:2]
  bg = estimate_background(img) if background is None else np.asarray(background, np.float32)
  if min_area is None:
    min_area = max(6.0, 0.003 * H * W)
  label, alpha = color_maps(img, bg, tolerance)
  hard = alpha >= 0.5
  struct8 = np.ones((3, 3), bool)
  out = []
  for k, cname in enumerate(_COLOR_NAMES):
    of_color = label == k
    comps, n = ndimage.label(hard & of_color, structure=struct8)
    if n == 0:
      continue
    slices = ndimage.find_objects(comps)
    for ci, sl in enumerate(slices, start=1):
      comp = comps[sl] == ci
      if comp.sum() < min_area:
        continue
      # Soft support: the component grown by 1 px into same-coloured soft edges.
      y0, x0 = max(sl[0].start - 3, 0), max(sl[1].start - 3, 0)
      y1, x1 = min(sl[0].stop + 3, H), min(sl[1].stop + 3, W)
      own = comps[y0:y1, x0:x1] == ci
      grown = ndimage.binary_dilation(own, structure=struct8)
      others = (comps[y0:y1, x0:x1] > 0) & ~own
      support = grown & of_color[y0:y1, x0:x1] & ~others
      weights = np.where(support, alpha[y0:y1, x0:x1], 0.0)
      cls, conf = _fit_shape(weights, y0, x0)
      if conf < min_confidence:
        continue
      box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
      out.append(Detection(cls, cname, box, float(weights.sum()), conf))
  out.sort(key=lambda d: -d.confidence)
  return out


# ----------------------------------------------------------------------------- scoring


def _check_spec(spec: dict) -> None:
  if not isinstance(spec, dict) or not isinstance(spec.get("include"), list):
    raise ValueError(f"spec must be a dict with an 'include' list, got {spec!r}")
  for i, req in enumerate(list(spec["include"]) + list(spec.get("exclude", []))):
    if req.get("class") not in SHAPES:
      raise ValueError(f"spec entry {i}: class must be one of {SHAPES}, got {req.get('class')!r}")
    if "color" in req and req["color"] not in COLORS:
      raise ValueError(
        f"spec entry {i}: color must be one of {tuple(COLORS)}, got {req['color']!r}"
      )
    if "position" in req and req["position"][0] not in RELATIONS:
      raise ValueError(
        f"spec entry {i}: relation must be one of {RELATIONS}, got {req['position']!r}"
      )


def score_detections(detections: Sequence[Detection], spec: dict) -> ShapesResult:
  """GenEval's rules applied to detections (see the module docstring)."""
  _check_spec(spec)
  by_class: dict[str, list[Detection]] = {}
  for d in detections:
    by_class.setdefault(d.cls, []).append(d)
  correct = True
  reasons: list[str] = []
  sat: list[float] = []  # degree of satisfaction of each constraint
  matched_groups: list[list[Detection] | None] = []
  for req in spec["include"]:
    cls, count = req["class"], req["count"]
    cands = list(by_class.get(cls, []))
    if "color" in req:  # requested colour first, then confidence (stable sort)
      cands.sort(key=lambda d: d.color != req["color"])
    found = cands[:count]
    matched = True
    sat.append(min(len(found), count) / count)
    if len(found) < count:
      correct = matched = False
      reasons.append(f"expected {cls}>={count}, found {len(found)}")
    if "color" in req:
      n_ok = sum(d.color == req["color"] for d in found)
      sat.append(n_ok / count)
      if n_ok < count and matched:
        correct = matched = False
        reasons.append(
          f"expected {req['color']} {cls}>={count}, found "
          f"{n_ok} {req['color']}; and "
          + ", ".join(f"{d.color}" for d in found if d.color != req["color"])
        )
    if "position" in req:
      rel, ref = req["position"]
      targets = matched_groups[ref] if ref < len(matched_groups) else None
      if not matched or targets is None:
        sat.append(0.0)
        if matched:
          correct = matched = False
          reasons.append(f"no target for {cls} to be {rel}")
      else:
        strengths = [relation_strength(d.box, t.box)[rel] for d in found for t in targets]
        worst = min(strengths)
        sat.append(1.0 if worst > 0.5 else float(np.clip((worst + 1) / 1.5, 0, 1)) * 0.99)
        if worst <= 0.5:
          correct = matched = False
          reasons.append(f"expected {cls} {rel} target, strength {worst:.2f} <= 0.5")
    matched_groups.append(found if matched else None)
  for req in spec.get("exclude", []):
    n = len(by_class.get(req["class"], []))
    ok = n < req["count"]
    sat.append(1.0 if ok else 0.0)
    if not ok:
      correct = False
      reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
  score = float(np.mean(sat)) if sat else 1.0
  if not correct:
    score = min(score, 0.99)
  return ShapesResult(bool(correct), "; ".join(reasons), score, tuple(detections))


def evaluate(image: np.ndarray, spec: dict, **detect_kwargs) -> ShapesResult:
  """Score one uint8 (H, W, 3) image against a ShapesEval / GenEval spec."""
  return score_detections(detect(image, **detect_kwargs), spec)


# ----------------------------------------------------------------------------- report


def report(results: Sequence[tuple[dict, ShapesResult]]) -> dict:
  """GenEval's summary: {"categories": {tag: {"accuracy", "correct", "total"}},
  "overall": mean accuracy over the tags present, "images": total, "image_accuracy"}."""
  per: dict[str, list[int]] = {}
  for spec, res in results:
    per.setdefault(spec["tag"], []).append(int(res.correct))
  order = [c for c in CATEGORIES if c in per] + sorted(set(per) - set(CATEGORIES))
  cats = {
    t: {"accuracy": float(np.mean(per[t])), "correct": int(sum(per[t])), "total": len(per[t])}
    for t in order
  }
  n = sum(len(v) for v in per.values())
  return {
    "categories": cats,
    "overall": float(np.mean([c["accuracy"] for c in cats.values()])) if cats else 0.0,
    "images": n,
    "image_accuracy": float(sum(sum(v) for v in per.values()) / n) if n else 0.0,
  }


def format_report(rep: dict) -> str:
  """A plain-text table of `report`'s output."""
  lines = [f"{'category':<15}{'accuracy':>10}{'correct':>10}{'total':>8}", "-" * 43]
  for tag, c in rep["categories"].items():
    lines.append(f"{tag:<15}{c['accuracy']:>10.4f}{c['correct']:>10d}{c['total']:>8d}")
  lines.append("-" * 43)
  lines.append(f"{'overall':<15}{rep['overall']:>10.4f}{'':>10}{rep['images']:>8d}")
  return "\n".join(lines)


def print_report(rep: dict) -> None:
  print(format_report(rep))


# ----------------------------------------------------------------------------- folders


def save_geneval_folder(out_dir: str, index: int, spec: dict, images: Sequence[np.ndarray]) -> str:
  """Write one prompt's images in GenEval's layout: <out>/<index:05d>/{metadata.jsonl,
  samples/<j:04d>.png}. Returns the prompt folder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  folder = os.path.join(out_dir, f"{index:05d}")
  os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
  with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
    f.write(json.dumps(spec) + "\n")
  for j, im in enumerate(images):
    Image.fromarray(np.asarray(im, np.uint8)).save(os.path.join(folder, "samples", f"{j:04d}.png"))
  return folder


def _read_specs(path: str, what: str) -> list[dict]:
  """A JSON-lines file of specifications, each checked; ValueError naming file:line."""
  specs = []
  with open(path) as f:
    for ln, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        spec = json.loads(line)
        _check_spec(spec)
        if "tag" not in spec:
          raise ValueError("no 'tag' field")
      except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{what} {path}:{ln}: not a ShapesEval specification ({e})") from None
      specs.append(spec)
  return specs


def plan_folder(images_dir: str, metadata: str | None = None) -> list[tuple[dict, list[str]]]:
  """Checks a GenEval-layout folder without reading any image: per prompt folder, its
  specification and image files. ValueError naming what is missing or malformed."""
  if not os.path.isdir(images_dir):
    raise ValueError(f"--images {images_dir}: no such folder")
  specs = None
  if metadata is not None:
    if not os.path.isfile(metadata):
      raise ValueError(f"--metadata {metadata}: no such file")
    specs = _read_specs(metadata, "--metadata")
  folders = sorted(p for p in glob.glob(os.path.join(images_dir, "*")) if os.path.isdir(p))
  if not folders:
    raise ValueError(f"--images {images_dir}: no prompt folders (<index:05d>/samples/*.png)")
  plan = []
  for folder in folders:
    name = os.path.basename(folder)
    if specs is not None:
      if not name.isdigit() or int(name) >= len(specs):
        raise ValueError(f"folder {folder!r} has no line in {metadata!r} ({len(specs)} lines)")
      spec = specs[int(name)]
    else:
      meta = os.path.join(folder, "metadata.jsonl")
      if not os.path.exists(meta):
        raise ValueError(f"{meta} missing; pass --metadata")
      found = _read_specs(meta, "metadata")
      if not found:
        raise ValueError(f"{meta}: empty")
      spec = found[0]
    files = sorted(glob.glob(os.path.join(folder, "samples", "*.png")))
    if not files:
      raise ValueError(f"no images in {os.path.join(folder, 'samples')}")
    plan.append((spec, files))
  return plan


def evaluate_folder(images_dir: str, metadata: str | None = None):
  """Score a GenEval-layout folder. Returns (report dict, per-image rows)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top

  results, rows = [], []
  for spec, files in plan_folder(images_dir, metadata):
    for path in files:
      try:
        image = np.asarray(Image.open(path).convert("RGB"))
      except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None
      res = evaluate(image, spec)
      results.append((spec, res))
      rows.append(
        {
          "filename": path,
          "tag": spec["tag"],
          "prompt": spec.get("prompt", ""),
          "correct": res.correct,
          "reason": res.reason,
          "score": res.score,
          "detections": [dataclasses.asdict(d) for d in res.detections],
          "metadata": json.dumps(spec),
        }
      )
  return report(results), rows


def build_parser() -> argparse.ArgumentParser:
  from sana_jax.scaling import best_of_n_cli as cli  # pylint: disable=g-import-not-at-top

  p = cli.CommandParser(
    prog="python -m sana_jax.eval.shapes", description="Score generated images with ShapesEval."
  )
  p.add_argument(
    "--images",
    required=True,
    help="GenEval layout: DIR/<00000>/samples/*.png (required, no default)",
  )
  p.add_argument(
    "--metadata", help="prompts jsonl, line i = folder i (default: each folder's metadata.jsonl)"
  )
  p.add_argument("--out", help="write per-image results (jsonl) here (default: none)")
  p.add_argument("--json", help="write the summary (json) here (default: none)")
  p.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --out / --json, once complete (default: off, refuse)",
  )
  return p


def main(argv: Sequence[str] | None = None) -> dict:
  """Returns the report; bad input prints `error: ...` and exits with status 2."""
  import sys  # pylint: disable=g-import-not-at-top
  from sana_jax.scaling import best_of_n_cli as cli  # pylint: disable=g-import-not-at-top

  args = build_parser().parse_args(argv)
  try:
    for flag, path in (("--out", args.out), ("--json", args.json)):
      if path:
        cli.check_new_output(path, flag, overwrite=args.overwrite, folder=False)
    if args.out and args.json and os.path.abspath(args.out) == os.path.abspath(args.json):
      raise ValueError(f"--out and --json name the same file {args.out}")
    rep, rows = evaluate_folder(args.images, args.metadata)  # plan_folder checks first
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None
  if args.out:
    with cli.staged_file(args.out) as tmp, open(tmp, "w") as f:
      for r in rows:
        f.write(json.dumps(r) + "\n")
  if args.json:
    with cli.staged_file(args.json) as tmp, open(tmp, "w") as f:
      json.dump(rep, f, indent=1)
  print_report(rep)
  return rep


if __name__ == "__main__":
  main()
