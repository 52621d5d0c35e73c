"""Writing images: PNGs, a captioned grid, a JSON record; all or nothing."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def grid(
  images: Sequence[np.ndarray],
  cols: int,
  captions: Sequence[str] | None = None,
  scale: int = 1,
  caption_height: int = 0,
) -> Image.Image:
  """Images (H, W, 3) uint8 in a grid of `cols` columns, optional caption strip per row."""
  n = len(images)
  cols = max(1, min(cols, n))
  rows = -(-n // cols)
  h, w = images[0].shape[:2]
  h, w = h * scale, w * scale
  cap = caption_height if captions else 0
  canvas = Image.new("RGB", (cols * w, rows * (h + cap)), "white")
  draw = ImageDraw.Draw(canvas)
  for k, im in enumerate(images):
    r, c = divmod(k, cols)
    tile = Image.fromarray(im).resize((w, h), Image.NEAREST)
    canvas.paste(tile, (c * w, r * (h + cap) + cap))
    if captions and c == 0:
      draw.text((2, r * (h + cap) + 1), captions[k][: max(8, cols * w // 6)], fill="black")
  return canvas


def save_images(
  out: pathlib.Path,
  images: np.ndarray,
  names: Sequence[str],
  records: Sequence[dict],
  grid_cols: int,
  captions: Sequence[str],
  overwrite: bool = False,
) -> None:
  """Writes every PNG, grid.png and samples.json as the folder `out`, whole or not at all.

  Everything is written into a temporary sibling of `out` first, which is then renamed to
  `out`. An existing `out` must be an empty folder, or any folder with overwrite=True: it
  is replaced only after the new folder is complete (FileExistsError otherwise, and then
  nothing is touched). On any failure `out` is left as it was."""
  out = pathlib.Path(out)
  if out.exists() and not (out.is_dir() and (overwrite or not any(out.iterdir()))):
    raise FileExistsError(
      f"{out} exists and is not an empty folder; not overwritten (overwrite=True replaces it)"
    )
  out.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  tmp = out.parent / f".{out.name}.new-{tag}"
  old = out.parent / f".{out.name}.old-{tag}"
  tmp.mkdir()  # (not mkdtemp: the folder keeps the usual umask permissions)
  try:
    for im, name in zip(images, names):
      Image.fromarray(im).save(tmp / name)
    scale = max(1, 128 // images.shape[1])
    grid(list(images), grid_cols, captions, scale=scale, caption_height=12).save(tmp / "grid.png")
    (tmp / "samples.json").write_text(json.dumps(list(records), indent=2))
    if out.exists():
      os.rename(out, old)
    try:
      os.rename(tmp, out)
    except OSError:
      if old.exists() and not out.exists():
        os.rename(old, out)
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
