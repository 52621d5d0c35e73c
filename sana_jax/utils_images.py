"""Writing images: PNGs, a captioned grid, a JSON record; all or nothing."""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def grid(images: Sequence[np.ndarray], cols: int, captions: Sequence[str] | None = None,
         scale: int = 1, caption_height: int = 0) -> Image.Image:
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


def save_images(out: pathlib.Path, images: np.ndarray, names: Sequence[str],
                records: Sequence[dict], grid_cols: int, captions: Sequence[str]) -> None:
  """Writes every PNG, grid.png and samples.json into `out`, only once all are encoded."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".sample.", dir=out))
  try:
    for im, name in zip(images, names):
      Image.fromarray(im).save(tmp / name)
    scale = max(1, 128 // images.shape[1])
    grid(list(images), grid_cols, captions, scale=scale, caption_height=12).save(tmp / "grid.png")
    (tmp / "samples.json").write_text(json.dumps(list(records), indent=2))
    for f in tmp.iterdir():
      shutil.move(str(f), str(out / f.name))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
