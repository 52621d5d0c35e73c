"""Encode an image-caption source into a training dataset of latents and caption embeddings.

  python -m sana_jax.data.preprocess --model MODEL --out DATA --source shapes --num 20000
  python -m sana_jax.data.preprocess --model MODEL --out DATA --source folder --images DIR

MODEL is a model folder (sana_jax.bundle): its text encoder, tokenizer, prompt settings and
autoencoder encode the data (the transformer need not exist yet). `folder` sources hold
images with a caption in a .txt file of the same stem; images are centre-cropped to the
model's image size (aspect buckets: --buckets HxW,... in pixels, each image to the nearest
aspect ratio). The null caption is written beside the data for CFG dropout.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import numpy as np
import tqdm
from PIL import Image

from sana_jax import bundle
from sana_jax.data import latents_tfds
from sana_jax.train.loop import NULL_CAPTION_FILE  # noqa: F401  (documented file name)


def _encoders(model: pathlib.Path):
  from sana_jax.models.prompts import PromptConfig, PromptEncoder
  settings = json.loads((model / bundle.PIPELINE_FILE).read_text())
  p = settings["prompt"]
  enc = PromptEncoder.from_folders(
      str(model / "tokenizer"), str(model / "text_encoder"),
      PromptConfig(max_length=p["max_length"], chi=tuple(p["chi"]) if p.get("chi") else None,
                   lowercase=p.get("lowercase", False)))
  ae = bundle._autoencoder(model, settings["autoencoder"])  # pylint: disable=protected-access
  return settings, enc, ae


def shapes_source(num: int, image_size: int, seed: int):
  from sana_jax.data import shapes
  for i in range(num):
    ex = shapes.example(i, image_size, seed)
    yield ex["image"], ex["spec"]["prompt"]


def folder_source(images: pathlib.Path, buckets: list[tuple[int, int]]):
  files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
  if not files:
    raise FileNotFoundError(f"no images in {images}")
  for f in files:
    cap = f.with_suffix(".txt")
    if not cap.exists():
      raise FileNotFoundError(f"{f} has no caption file {cap.name}")
    img = Image.open(f).convert("RGB")
    ratio = img.height / img.width
    h, w = min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(ratio)))
    scale = max(h / img.height, w / img.width)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                     Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    yield np.asarray(img.crop((left, top, left + w, top + h))), cap.read_text().strip()


def encode_source(source, settings, enc, ae, batch: int = 64):
  """Yields training examples, encoding images and captions in batches."""
  def flush(items):
    images = np.stack([im for im, _ in items]).astype(np.float32) / 127.5 - 1.0
    latents = ae.encode(images)
    emb, mask = enc.encode([c for _, c in items])
    for k, (_, c) in enumerate(items):
      yield {"latent": np.asarray(latents[k]), "caption": emb[k], "caption_mask": mask[k],
             "text": c}

  items, shape = [], None
  for image, caption in source:
    if shape is not None and image.shape != shape:
      yield from flush(items)
      items = []
    shape = image.shape
    items.append((image, caption))
    if len(items) == batch:
      yield from flush(items)
      items = []
  if items:
    yield from flush(items)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", type=pathlib.Path, required=True)
  ap.add_argument("--out", type=pathlib.Path, required=True, help="TFDS data_dir")
  ap.add_argument("--name", default="shapes32")
  ap.add_argument("--source", choices=("shapes", "folder"), default="shapes")
  ap.add_argument("--num", type=int, default=20000, help="shapes: number of examples")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--images", type=pathlib.Path, help="folder source: images + .txt captions")
  ap.add_argument("--buckets", default="", help="folder source: HxW pixel sizes, comma-separated")
  args = ap.parse_args(argv)

  bundle_folder = args.model
  if not (bundle_folder / bundle.PIPELINE_FILE).exists():
    raise FileNotFoundError(f"{bundle_folder} has no {bundle.PIPELINE_FILE}")
  settings, enc, ae = _encoders(bundle_folder)
  size = settings["image_size"]
  if args.source == "shapes":
    buckets_px = [(size, size)]
    make_source = lambda: shapes_source(args.num, size, args.seed)  # noqa: E731
    total = args.num
  else:
    if args.images is None:
      raise ValueError("--source folder needs --images DIR")
    buckets_px = ([tuple(int(v) for v in b.split("x")) for b in args.buckets.split(",")]
                  if args.buckets else [(size, size)])
    make_source = lambda: folder_source(args.images, buckets_px)  # noqa: E731
    total = len([p for p in args.images.iterdir() if p.suffix.lower() in (".png", ".jpg",
                                                                          ".jpeg")])
  for h, w in buckets_px:
    if h % ae.downsample or w % ae.downsample:
      raise ValueError(f"bucket {h}x{w} is not a multiple of the autoencoder's "
                       f"{ae.downsample}x downsampling")
  buckets = [(h // ae.downsample, w // ae.downsample) for h, w in buckets_px]
  null_emb, null_mask = enc.encode_null(1)
  bar = tqdm.tqdm(total=total * len(buckets), desc="encode", unit="img")

  def examples():
    for ex in encode_source(make_source(), settings, enc, ae):
      bar.update(1)
      yield ex

  out = latents_tfds.write_dataset(
      examples, str(args.out), args.name, buckets=buckets, channels=ae.latent_channels,
      caption_len=null_emb.shape[1], caption_channels=null_emb.shape[2],
      null_caption=null_emb[0], null_mask=null_mask[0])
  bar.close()
  print(f"wrote dataset to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
