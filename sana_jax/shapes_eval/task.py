"""ShapesEval: a GenEval-style text-to-image task made of coloured geometric shapes.

Everything here is plain numpy (PIL only for the example grid): the specification format,
the caption templates, the sampling of specifications and the renderer.

Specification (GenEval's metadata format, one dict per image)::

    {"tag": "position",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["right of", 0]}],
     "prompt": "a photo of a circle right of a square"}

``tag`` is one of CATEGORIES; every ``include`` entry has ``class`` (one of SHAPES) and
``count`` (1 to 4), optionally ``color`` (one of COLORS) and ``position``
([relation, index of the include entry it refers to], relation one of RELATIONS: the
object is <relation> the referenced one). ``exclude`` (counting only, as in GenEval)
lists {"class", "count"} that must NOT be reached, e.g. count + 1 for "three circles".

Images: uint8 (H, W, 3) on a plain white background (BACKGROUND); shapes are upright,
axis-aligned, as wide as tall, anti-aliased by 4x4 supersampling, never overlapping and
kept apart by a gap of a few pixels. Positions, sizes and the colour of objects whose
colour the prompt does not name are drawn from the rng.

Captions: ``caption(spec, rng)`` wraps an object phrase (several wordings per category) in
one of several frames ("a photo of ...", "an image of ...", ...). The evaluation prompts
(``eval_prompts()``, shipped as sana_jax/assets/shapes_eval_prompts.jsonl) are drawn from
the same grammar with another seed; ``sample_spec`` never returns a caption that is one of
them, so training captions and evaluation prompts are disjoint as strings.

Command line (example grid for the README)::

    python -m sana_jax.data.shapes --grid docs/images/shapes_grid.png
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from typing import Callable, Sequence

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
# Six colours far apart in RGB and far from the white background (the closest pair of
# colour/background mixing lines is ~100 units apart at full coverage).
COLORS = {
  "red": (220, 30, 30),
  "yellow": (240, 200, 20),
  "green": (20, 170, 40),
  "blue": (20, 60, 230),
  "purple": (160, 40, 200),
  "black": (20, 20, 20),
}
BACKGROUND = (255, 255, 255)
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
COUNTING_RANGE = (2, 3, 4)  # GenEval's counting prompts ask for 2 to 4 objects.
CROSS_ARM = 0.36  # width of the cross's arms, as a fraction of its size.
SUPERSAMPLE = 4
EVAL_PROMPTS_PATH = os.path.join(
  os.path.dirname(os.path.dirname(__file__)), "assets", "shapes_eval_prompts.jsonl"
)
EVAL_SEED = 20250601
EVAL_PER_CATEGORY = 50
VALIDATION_SEED = 20251122  # validation prompts: same grammar, disjoint from the eval set

# ----------------------------------------------------------------------------- geometry


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Boolean mask: is the point (u, v) inside `shape`?

  Coordinates are in the shape's own frame: its bounding box is [-0.5, 0.5]^2, u to the
  right, v downwards (image convention). The triangle points up.
  """
  au, av = np.abs(u), np.abs(v)
  if shape == "circle":
    return u * u + v * v <= 0.25
  if shape == "square":
    return (au <= 0.5) & (av <= 0.5)
  if shape == "triangle":
    return (av <= 0.5) & (au <= 0.5 * (v + 0.5))
  if shape == "cross":
    h = CROSS_ARM / 2
    return ((au <= h) & (av <= 0.5)) | ((av <= h) & (au <= 0.5))
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def coverage(
  shape: str,
  cx: float,
  cy: float,
  sx: float,
  sy: float,
  x0: int,
  y0: int,
  x1: int,
  y1: int,
  ss: int = SUPERSAMPLE,
) -> np.ndarray:
  """Fraction of each pixel of the window [y0:y1, x0:x1] covered by a shape.

  The shape's bounding box has centre (cx, cy) and size (sx, sy), in pixel units where
  pixel (i, j) spans [j, j+1] x [i, i+1]. Returns float32 (y1 - y0, x1 - x0) in [0, 1],
  estimated with ss x ss samples per pixel.
  """
  offs = (np.arange(ss, dtype=np.float64) + 0.5) / ss
  xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)
  ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)
  u = (xs[None, :] - cx) / sx
  v = (ys[:, None] - cy) / sy
  m = inside(shape, u, v).astype(np.float32)
  h, w = y1 - y0, x1 - x0
  return m.reshape(h, ss, w, ss).mean(axis=(1, 3))


# ----------------------------------------------------------------------------- specs


def _check_spec(spec: dict) -> None:
  if not isinstance(spec, dict) or "include" not in spec:
    raise ValueError(f"spec must be a dict with an 'include' list, got {spec!r}")
  for i, req in enumerate(spec["include"]):
    if req.get("class") not in SHAPES:
      raise ValueError(f"include[{i}].class must be one of {SHAPES}, got {req.get('class')!r}")
    if not isinstance(req.get("count"), int) or req["count"] < 1:
      raise ValueError(f"include[{i}].count must be a positive int, got {req.get('count')!r}")
    if "color" in req and req["color"] not in COLORS:
      raise ValueError(f"include[{i}].color must be one of {tuple(COLORS)}, got {req['color']!r}")
    if "position" in req:
      rel, ref = req["position"]
      if rel not in RELATIONS or not (0 <= ref < len(spec["include"])) or ref == i:
        raise ValueError(
          f"include[{i}].position must be [one of {RELATIONS}, index of another "
          f"include entry], got {req['position']!r}"
        )


def spec_for(category: str, rng: np.random.Generator) -> dict:
  """A random specification of `category` without its prompt (GenEval metadata format)."""
  shapes = list(SHAPES)
  colors = list(COLORS)
  if category == "single_object":
    include = [{"class": str(rng.choice(shapes)), "count": 1}]
    return {"tag": category, "include": include}
  if category == "two_object":
    a, b = rng.choice(shapes, size=2, replace=False)
    return {
      "tag": category,
      "include": [{"class": str(a), "count": 1}, {"class": str(b), "count": 1}],
    }
  if category == "counting":
    s = str(rng.choice(shapes))
    n = int(rng.choice(COUNTING_RANGE))
    return {
      "tag": category,
      "include": [{"class": s, "count": n}],
      "exclude": [{"class": s, "count": n + 1}],
    }
  if category == "colors":
    return {
      "tag": category,
      "include": [{"class": str(rng.choice(shapes)), "count": 1, "color": str(rng.choice(colors))}],
    }
  if category == "position":
    a, b = rng.choice(shapes, size=2, replace=False)
    rel = str(rng.choice(RELATIONS))
    return {
      "tag": category,
      "include": [
        {"class": str(a), "count": 1},
        {"class": str(b), "count": 1, "position": [rel, 0]},
      ],
    }
  if category == "color_attr":
    a, b = rng.choice(shapes, size=2, replace=False)
    ca, cb = rng.choice(colors, size=2, replace=False)
    return {
      "tag": category,
      "include": [
        {"class": str(a), "count": 1, "color": str(ca)},
        {"class": str(b), "count": 1, "color": str(cb)},
      ],
    }
  raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


# ----------------------------------------------------------------------------- captions

# Frames around the object phrase; every word stays in a small fixed vocabulary.
FRAMES = (
  "{}",
  "a photo of {}",
  "an image of {}",
  "a picture of {}",
  "a drawing of {}",
  "an illustration of {}",
  "a simple drawing of {}",
  "an image showing {}",
  "a picture with {}",
  "{} on a white background",
  "a photo of {} on a white background",
  "a white background with {}",
)


def _plural(shape: str) -> str:
  return shape + ("es" if shape.endswith("s") else "s")


def _one(shape: str, color: str | None = None, style: int = 0) -> str:
  """A noun phrase for one object, e.g. 'a red circle', 'a circle that is red'."""
  if color is None:
    return ("a {s}", "one {s}", "a single {s}")[style % 3].format(s=shape)
  return ("a {c} {s}", "a {s} that is {c}", "one {c} {s}", "a {c} colored {s}")[style % 4].format(
    s=shape, c=color
  )


_REL_WORDS = {
  "left of": ("left of", "to the left of", "on the left of"),
  "right of": ("right of", "to the right of", "on the right of"),
  "above": ("above", "placed above", "higher than"),
  "below": ("below", "placed below", "lower than"),
}


def object_phrase(spec: dict, style: int) -> str:
  """The object phrase of a spec's caption; `style` picks among equivalent wordings."""
  tag, inc = spec["tag"], spec["include"]
  if tag in ("single_object", "colors"):
    return _one(inc[0]["class"], inc[0].get("color"), style)
  if tag == "counting":
    n, s = inc[0]["count"], inc[0]["class"]
    return ("{w} {p}", "{d} {p}", "exactly {w} {p}")[style % 3].format(
      w=COUNT_WORDS[n], d=n, p=_plural(s) if n > 1 else s
    )
  if tag in ("two_object", "color_attr"):
    a, b = inc
    sa = _one(a["class"], a.get("color"), style)
    sb = _one(b["class"], b.get("color"), style)
    if (style // 4) % 2:  # either order names the same scene
      sa, sb = sb, sa
    return f"{sa} and {sb}"
  if tag == "position":
    ref, obj = inc[0], inc[1]
    rel = _REL_WORDS[obj["position"][0]][style % 3]
    return f"a {obj['class']} {rel} a {ref['class']}"
  raise ValueError(f"unknown tag {tag!r}; expected one of {CATEGORIES}")


def caption(spec: dict, rng: np.random.Generator) -> str:
  """A random caption for `spec`: a random frame around a random wording of its objects."""
  frame = FRAMES[int(rng.integers(len(FRAMES)))]
  return frame.format(object_phrase(spec, int(rng.integers(12))))


def all_specs(category: str) -> list[dict]:
  """Every distinct spec (without prompt) `spec_for(category, .)` can return."""
  out = []
  pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
  cpairs = [(a, b) for a in COLORS for b in COLORS if a != b]
  if category == "single_object":
    out = [{"tag": category, "include": [{"class": s, "count": 1}]} for s in SHAPES]
  elif category == "two_object":
    out = [
      {"tag": category, "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]}
      for a, b in pairs
    ]
  elif category == "counting":
    out = [
      {
        "tag": category,
        "include": [{"class": s, "count": n}],
        "exclude": [{"class": s, "count": n + 1}],
      }
      for s in SHAPES
      for n in COUNTING_RANGE
    ]
  elif category == "colors":
    out = [
      {"tag": category, "include": [{"class": s, "count": 1, "color": c}]}
      for s in SHAPES
      for c in COLORS
    ]
  elif category == "position":
    out = [
      {
        "tag": category,
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [r, 0]}],
      }
      for a, b in pairs
      for r in RELATIONS
    ]
  elif category == "color_attr":
    out = [
      {
        "tag": category,
        "include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
      }
      for a, b in pairs
      for ca, cb in cpairs
    ]
  else:
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
  return out


@functools.lru_cache(maxsize=1)
def vocabulary() -> tuple:
  """Every word a ShapesEval caption or evaluation prompt can contain (sorted), for a
  word-level tokenizer. Words are split on whitespace; captions are lower case."""
  words = set()
  for frame in FRAMES:
    words.update(frame.replace("{}", " ").split())
  for category in CATEGORIES:
    for spec in all_specs(category):
      for style in range(12):
        words.update(object_phrase(spec, style).split())
  return tuple(sorted(words))


def normalize_prompt(prompt: str) -> str:
  """Lower case, single spaces, no punctuation: the key of the train/eval disjointness."""
  kept = "".join(ch if ch.isalnum() or ch == " " else " " for ch in prompt.lower())
  return " ".join(kept.split())


@functools.lru_cache(maxsize=1)
def _eval_prompt_keys() -> frozenset:
  return frozenset(normalize_prompt(s["prompt"]) for s in eval_prompts())


def sample_spec(
  category: str, rng: np.random.Generator, *, exclude_eval_prompts: bool = True
) -> dict:
  """A random spec of `category` with a varied "prompt".

  With exclude_eval_prompts (the default, for training data) the prompt is never one of
  the evaluation prompts (compared after `normalize_prompt`).
  """
  banned = _eval_prompt_keys() if exclude_eval_prompts else frozenset()
  for _ in range(1000):
    spec = spec_for(category, rng)
    spec["prompt"] = caption(spec, rng)
    if normalize_prompt(spec["prompt"]) not in banned:
      return spec
  raise RuntimeError(f"could not sample a {category} caption outside the evaluation set")


def make_eval_prompts(
  per_category: int = EVAL_PER_CATEGORY,
  seed: int = EVAL_SEED,
  *,
  exclude_eval_prompts: bool = False,
) -> list[dict]:
  """The evaluation prompt set: `per_category` distinct prompts for each category, in order.

  With exclude_eval_prompts and another seed this makes a validation set (for choosing
  sampling settings) that shares no prompt with the evaluation set."""
  out = []
  for ci, category in enumerate(CATEGORIES):
    rng = np.random.default_rng([seed, ci])
    seen = set()
    while len(seen) < per_category:
      spec = sample_spec(category, rng, exclude_eval_prompts=exclude_eval_prompts)
      key = normalize_prompt(spec["prompt"])
      if key not in seen:
        seen.add(key)
        out.append(spec)
  return out


@functools.lru_cache(maxsize=1)
def _load_eval_prompts() -> tuple:
  if os.path.exists(EVAL_PROMPTS_PATH):
    with open(EVAL_PROMPTS_PATH) as f:
      return tuple(json.loads(line) for line in f if line.strip())
  # The shipped file is exactly make_eval_prompts() (tested), so regenerating is equivalent.
  return tuple(make_eval_prompts())


def eval_prompts() -> list[dict]:
  """The evaluation prompts (GenEval metadata dicts), from the shipped jsonl file."""
  return [json.loads(json.dumps(s)) for s in _load_eval_prompts()]


def write_eval_prompts(path: str = EVAL_PROMPTS_PATH) -> None:
  """Regenerate the shipped evaluation prompt file."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for spec in make_eval_prompts():
      f.write(json.dumps(spec) + "\n")


# ----------------------------------------------------------------------------- layout


def _size_range(n_objects: int) -> tuple[float, float]:
  """Range of the objects' size as a fraction of the image side."""
  if n_objects == 1:
    return 0.30, 0.55
  if n_objects == 2:
    return 0.25, 0.40
  return 0.22, 0.30


MIN_SIZE_PX = 8.0  # smallest shape (px), so every class stays recognisable at 32 px
POSITION_MARGIN = 0.1  # GenEval's POSITION_THRESHOLD


def relation_strength(box_a, box_b) -> dict:
  """GenEval's relative position of box A w.r.t. box B, as signed strengths.

  Boxes are (x0, y0, x1, y1). Returns {"left of": s, ...} where s > 0.5 means the relation
  holds by GenEval's rule (centre offset shrunk by 0.1 x the summed box sizes, normalised
  by the centre distance).
  """
  a = np.asarray(box_a, np.float64).reshape(2, 2)
  b = np.asarray(box_b, np.float64).reshape(2, 2)
  offset = a.mean(0) - b.mean(0)
  dims = (a[1] - a[0]) + (b[1] - b[0])
  revised = np.maximum(np.abs(offset) - POSITION_MARGIN * dims, 0) * np.sign(offset)
  norm = np.linalg.norm(offset)
  if norm < 1e-9 or np.all(np.abs(revised) < 1e-3):
    return {r: 0.0 for r in RELATIONS}
  dx, dy = revised / norm
  return {"left of": -dx, "right of": dx, "above": -dy, "below": dy}


def layout(spec: dict, image_size: int, rng: np.random.Generator) -> list[dict]:
  """Place every object of `spec`: a list of {class, color, box=(x0, y0, x1, y1)}.

  Boxes lie inside the image with a 1 px border, are separated by a gap, and relations
  hold with a safety margin (GenEval strength >= 0.75 and an axis offset of >= 2 px).
  """
  _check_spec(spec)
  objects, group = [], []
  for gi, req in enumerate(spec["include"]):
    for _ in range(req["count"]):
      color = req.get("color") or str(rng.choice(list(COLORS)))
      objects.append({"class": req["class"], "color": color})
      group.append(gi)
  n = len(objects)
  lo, hi = _size_range(n)
  gap = max(2.0, 0.05 * image_size)
  relations = [(gi, req["position"]) for gi, req in enumerate(spec["include"]) if "position" in req]
  scale = 1.0
  for attempt in range(2000):
    if attempt and attempt % 200 == 0:
      scale *= 0.9
    sizes = np.maximum(rng.uniform(lo, hi, size=n) * image_size * scale, MIN_SIZE_PX)
    if np.any(sizes > image_size - 2):
      raise ValueError(f"image_size={image_size} is too small for shapes of {MIN_SIZE_PX} px")
    boxes = []
    ok = True
    for s in sizes:
      x0 = rng.uniform(1, image_size - 1 - s)
      y0 = rng.uniform(1, image_size - 1 - s)
      box = (x0, y0, x0 + s, y0 + s)
      for b in boxes:
        if (
          box[0] < b[2] + gap
          and b[0] < box[2] + gap
          and box[1] < b[3] + gap
          and b[1] < box[3] + gap
        ):
          ok = False
          break
      if not ok:
        break
      boxes.append(box)
    if not ok:
      continue
    for gi, (rel, ref) in relations:
      for i in (i for i in range(n) if group[i] == gi):
        for j in (j for j in range(n) if group[j] == ref):
          strength = relation_strength(boxes[i], boxes[j])[rel]
          ci = np.add(boxes[i][:2], boxes[i][2:]) / 2
          cj = np.add(boxes[j][:2], boxes[j][2:]) / 2
          axis = 0 if rel in ("left of", "right of") else 1
          if strength < 0.75 or abs(ci[axis] - cj[axis]) < 2.0:
            ok = False
    if ok:
      for o, b in zip(objects, boxes):
        o["box"] = tuple(float(x) for x in b)
      return objects
  raise RuntimeError(f"could not lay out {spec!r} at {image_size} px")


def render_objects(objects: Sequence[dict], image_size: int) -> np.ndarray:
  """Draw placed objects (from `layout`) on the background: uint8 (S, S, 3)."""
  img = np.empty((image_size, image_size, 3), np.float32)
  img[...] = np.asarray(BACKGROUND, np.float32)
  for o in objects:
    x0, y0, x1, y1 = o["box"]
    ix0, iy0 = max(int(np.floor(x0)), 0), max(int(np.floor(y0)), 0)
    ix1, iy1 = min(int(np.ceil(x1)), image_size), min(int(np.ceil(y1)), image_size)
    a = coverage(o["class"], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, ix0, iy0, ix1, iy1)
    col = np.asarray(COLORS[o["color"]], np.float32)
    win = img[iy0:iy1, ix0:ix1]
    img[iy0:iy1, ix0:ix1] = win * (1 - a[..., None]) + col * a[..., None]
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render(spec: dict, image_size: int, rng: np.random.Generator) -> np.ndarray:
  """Render a spec: uint8 (image_size, image_size, 3), deterministic given the rng state."""
  if not isinstance(image_size, (int, np.integer)) or image_size < 16:
    raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
  return render_objects(layout(spec, int(image_size), rng), int(image_size))


def example(index: int, image_size: int, seed: int = 0) -> dict:
  """Example `index` of the training stream: categories cycle in CATEGORIES order.

  The spec depends only on (seed, index); the layout also on image_size. Returns
  {"image", "caption", "spec" (dict), "category"}.
  """
  category = CATEGORIES[index % len(CATEGORIES)]
  spec = sample_spec(category, np.random.default_rng([seed, index, 0]))
  image = render(spec, image_size, np.random.default_rng([seed, index, 1]))
  return {"image": image, "caption": spec["prompt"], "spec": spec, "category": category}


# ----------------------------------------------------------------------------- grid


def make_grid(
  image_size: int = 64,
  per_category: int = 4,
  seed: int = 0,
  scale: int = 2,
  sample: Callable[[int], dict] | None = None,
):
  """A PIL image: one row per category, `per_category` examples with their captions.

  Examples are `example(index, image_size, seed)` (or `sample(index)`, returning a dict
  with "image" and "caption"), index = row + 6 * column, shown `scale` times enlarged.
  """
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  import textwrap  # pylint: disable=g-import-not-at-top

  cell = image_size * scale
  text_h, label_w, pad = 68, 100, 6
  font = ImageFont.load_default()
  w = label_w + per_category * (cell + pad) + pad
  h = len(CATEGORIES) * (cell + text_h + pad) + pad
  grid = Image.new("RGB", (w, h), (235, 235, 235))
  draw = ImageDraw.Draw(grid)
  chars = max(12, int(cell / 5.6))
  for r, category in enumerate(CATEGORIES):
    y = pad + r * (cell + text_h + pad)
    draw.text((pad, y + cell // 2 - 6), category, fill=(0, 0, 0), font=font)
    for c in range(per_category):
      index = r + len(CATEGORIES) * c
      ex = example(index, image_size, seed) if sample is None else sample(index)
      x = label_w + c * (cell + pad)
      tile = Image.fromarray(ex["image"]).resize((cell, cell), Image.NEAREST)
      grid.paste(tile, (x, y))
      lines = textwrap.wrap(ex["caption"], chars)[:5]
      for li, line in enumerate(lines):
        draw.text((x, y + cell + 2 + 13 * li), line, fill=(0, 0, 0), font=font)
  return grid


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--grid", help="write an example grid PNG here")
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--per-category", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--write-eval-prompts", action="store_true", help=f"regenerate {EVAL_PROMPTS_PATH}"
  )
  args = p.parse_args(argv)
  if args.write_eval_prompts:
    write_eval_prompts()
    print(f"wrote {EVAL_PROMPTS_PATH}")
  if args.grid:
    os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    make_grid(args.image_size, args.per_category, args.seed).save(args.grid, optimize=True)
    print(f"wrote {args.grid}")
  if not (args.grid or args.write_eval_prompts):
    p.print_help()


if __name__ == "__main__":
  main()
