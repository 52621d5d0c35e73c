"""Encode an image-caption source into a training dataset of latents and caption embeddings.

  python -m sana_jax.data.preprocess --model MODEL --out DATA --source shapes --num 20000
  python -m sana_jax.data.preprocess --model MODEL --out DATA --source folder --images DIR
  python -m sana_jax.data.preprocess --model MODEL --out DATA --source folder --images DIR \
      --captions DIR/metadata.jsonl

MODEL is a model folder (sana_jax.bundle): its text encoder, tokenizer, prompt settings and
autoencoder encode the data (the transformer need not exist yet). `folder` sources hold
images (.png/.jpg) with their captions either in a .txt file of the same stem beside each
image, or in one JSON-lines file (--captions) with a line {"file_name": "a.png", "text":
"..."} per image ("caption" is accepted for "text"; file_name relative to --images; images
not listed are left out). Images are resized to cover their bucket and centre-cropped
(aspect buckets: --buckets HxW,... in pixels, each image to the nearest aspect ratio;
default one square bucket of the model's image size). The null caption is written beside
the data for CFG dropout. docs/fine_tuning.md walks through a folder end to end.

The dataset is written to DATA/sana_latents/NAME/1.0.0, whole or not at all; an existing
dataset of that name is refused unless --overwrite (then replaced once the new one is
complete).

Across hosts: `--shard I/N` encodes the I-th of N contiguous slices of the examples (under
jax.distributed, e.g. SANA_JAX_DISTRIBUTED=1 on a TPU pod, the default is the process index
and count). Each host writes its part under DATA/.sana_latents-NAME.parts/; the host that
completes the set joins the parts into one dataset, record for record what one unsharded
run writes. DATA must be a folder every host sees (NFS, a shared disk).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

from sana_jax.cli import CommandParser, UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_SHAPES_NUM = 20000


class PartsError(ValueError):
  """The written parts do not make one dataset (see latents_tfds.merge_parts)."""


def build_parser() -> argparse.ArgumentParser:
  ap = CommandParser(
    prog="python -m sana_jax.data.preprocess",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  ap.add_argument(
    "--model",
    type=pathlib.Path,
    required=True,
    help="model folder whose text encoder, tokenizer and autoencoder encode the data (required)",
  )
  ap.add_argument(
    "--out",
    type=pathlib.Path,
    required=True,
    help="TFDS data_dir; the dataset goes to OUT/sana_latents/NAME/1.0.0 (required)",
  )
  ap.add_argument("--name", default="shapes32", help="dataset (config) name (default: %(default)s)")
  ap.add_argument(
    "--source",
    choices=("shapes", "folder"),
    default="shapes",
    help="shapes: generated ShapesEval scenes; folder: --images (default: %(default)s)",
  )
  ap.add_argument(
    "--num",
    type=int,
    default=None,
    help=f"number of examples: shapes (default {DEFAULT_SHAPES_NUM}); folder: "
    "the first NUM images in name order (default: all)",
  )
  ap.add_argument("--seed", type=int, default=0, help="shapes: scene seed (default: %(default)s)")
  ap.add_argument(
    "--images",
    type=pathlib.Path,
    default=None,
    help="folder source: images (.png/.jpg) with a same-stem .txt caption "
    "(default: none; required for --source folder)",
  )
  ap.add_argument(
    "--captions",
    type=pathlib.Path,
    default=None,
    help="folder source: a .jsonl file, one {\"file_name\": ..., \"text\": ...} object per "
    "line, instead of the sidecar .txt files (default: none: the .txt files)",
  )
  ap.add_argument(
    "--buckets",
    default="",
    help="folder source: HxW pixel sizes, comma-separated, each a multiple of "
    "the autoencoder's downsampling (default: the model's square image "
    "size)",
  )
  ap.add_argument(
    "--batch_size", type=int, default=64, help="images encoded at once (default: %(default)s)"
  )
  ap.add_argument(
    "--shard",
    default=None,
    help="I/N: encode slice I of N (0 <= I < N) and write it as part I; the "
    "last part to finish joins them (default: the jax.distributed process "
    "index/count when initialised, else 0/1: everything)",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing dataset of that name once the new one is complete (default: refuse)",
  )
  ap.add_argument("--no_progress", action="store_true", help="no progress bar (default: show it)")
  return ap


def parse_args(argv) -> argparse.Namespace:
  return build_parser().parse_args(argv)


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
  if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
    raise UsageError(f"--shard {text!r}: expected I/N with integers 0 <= I < N, e.g. 0/4")
  return int(m.group(1)), int(m.group(2))


def parse_buckets(text: str) -> list[tuple[int, int]]:
  out = []
  for b in text.split(","):
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", b)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
      raise UsageError(
        f"--buckets {text!r}: {b!r} is not HxW with positive integers (e.g. 1024x1024,768x1344)"
      )
    out.append((int(m.group(1)), int(m.group(2))))
  if len(set(out)) != len(out):
    raise UsageError(f"--buckets {text!r}: a size is listed twice")
  return out


def read_model_settings(model: pathlib.Path) -> tuple[dict, int, int]:
  """Checks what preprocessing needs of a model folder, loading nothing: returns
  (pipeline settings, autoencoder downsampling, latent channels)."""
  from sana_jax import bundle

  if not model.is_dir():
    raise UsageError(f"--model {model}: no such folder")
  path = model / bundle.PIPELINE_FILE
  if not path.is_file():
    raise UsageError(f"--model {model}: not a sana_jax model folder (no {bundle.PIPELINE_FILE})")
  try:
    settings = json.loads(path.read_text())
    prompt, spec = settings["prompt"], settings["autoencoder"]
    prompt["max_length"], settings["image_size"]  # pylint: disable=pointless-statement
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UsageError(
      f"--model {model}: {path} is not a valid settings file ({e!r}); "
      "expected 'prompt', 'autoencoder' and 'image_size'"
    ) from None
  need = ["text_encoder/config.json", "text_encoder/params.safetensors", "tokenizer/"]
  kind = spec.get("kind")
  if kind == "dcae":
    need.append("vae/config.json")
  elif kind != "pixels":
    raise UsageError(f"--model {model}: autoencoder kind {kind!r}; expected 'pixels' or 'dcae'")
  missing = [n for n in need if not (model / n).exists()]
  if missing:
    raise UsageError(f"--model {model}: the folder is incomplete; missing {missing}")
  if kind == "pixels":
    return settings, 1, int(spec.get("channels", 3))
  try:
    cfg = json.loads((model / "vae/config.json").read_text())
    stages = cfg.get("encoder_block_out_channels") or cfg["block_out_channels"]
    return settings, 2 ** (len(stages) - 1), int(cfg["latent_channels"])
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise UsageError(f"--model {model}: vae/config.json is not a DC-AE config ({e!r})") from None


def list_images(images: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def validate(args) -> dict:
  """Every check that loads no model; raises UsageError. Returns the resolved plan."""
  settings, downsample, channels = read_model_settings(args.model)
  size = int(settings["image_size"])
  if args.batch_size < 1:
    raise UsageError(f"--batch_size {args.batch_size}: must be >= 1")
  if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", args.name):
    raise UsageError(f"--name {args.name!r}: use letters, digits, '_', '.' and '-'")
  if args.out.exists() and not args.out.is_dir():
    raise UsageError(f"--out {args.out}: exists and is not a folder")
  parent = next(p for p in [args.out, *args.out.absolute().parents] if p.exists())
  if not os.access(parent, os.W_OK | os.X_OK):
    raise UsageError(f"--out {args.out}: {parent} is not writable")
  if args.num is not None and args.num < 1:
    raise UsageError(f"--num {args.num}: must be >= 1")
  from sana_jax.data import latents_tfds

  existing = latents_tfds.existing_dataset(args.out, args.name)
  if existing is not None and not args.overwrite:
    raise UsageError(
      f"--out {args.out}: {existing} already holds a dataset named "
      f"{args.name!r}; pass --overwrite to replace it, or choose another "
      "--name / --out"
    )
  shard = parse_shard(args.shard) if args.shard is not None else None
  if args.source == "shapes":
    for flag, value in (
      ("--images", args.images),
      ("--captions", args.captions),
      ("--buckets", args.buckets or None),
    ):
      if value is not None:
        raise UsageError(f"{flag} {value}: applies to --source folder only")
    if size % downsample:
      raise UsageError(
        f"--model {args.model}: image size {size} is not a multiple of the "
        f"autoencoder's {downsample}x downsampling"
      )
    num = args.num or DEFAULT_SHAPES_NUM
    buckets_px, files = [(size, size)], None
  else:
    if args.images is None:
      raise UsageError("--source folder needs --images DIR")
    if not args.images.is_dir():
      raise UsageError(f"--images {args.images}: no such folder")
    if args.captions is not None:
      captions = read_captions_jsonl(args.captions, args.images)
      files = sorted(captions)
    else:
      files = list_images(args.images)
    if not files:
      raise UsageError(f"--images {args.images}: no {'/'.join(IMAGE_SUFFIXES)} images")
    files = files[: args.num] if args.num else files
    num = len(files)
    buckets_px = parse_buckets(args.buckets) if args.buckets else [(size, size)]
    for h, w in buckets_px:
      if h % downsample or w % downsample:
        raise UsageError(
          f"--buckets {args.buckets}: {h}x{w} is not a multiple of the "
          f"autoencoder's {downsample}x downsampling"
        )
  return dict(
    captions=captions if args.source == "folder" and args.captions is not None else None,
    settings=settings,
    downsample=downsample,
    channels=channels,
    size=size,
    num=num,
    buckets_px=buckets_px,
    files=files,
    shard=shard,
  )


def read_captions_jsonl(path: pathlib.Path, images: pathlib.Path) -> dict[pathlib.Path, str]:
  """{image path: caption} from a JSON-lines file (blank lines skipped). Raises UsageError
  naming the line for malformed JSON, a missing file_name/text, a file that is absent,
  outside --images or not an image, or one listed twice."""
  if not path.is_file():
    raise UsageError(f"--captions {path}: no such file")
  out: dict[pathlib.Path, str] = {}
  root = images.resolve()
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    where = f"--captions {path}: line {n}"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise UsageError(f"{where}: not JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise UsageError(f"{where}: expected an object with file_name and text")
    name = row.get("file_name")
    text = row.get("text", row.get("caption"))
    if not isinstance(name, str) or not isinstance(text, str):
      raise UsageError(f'{where}: needs "file_name" and "text" (or "caption") strings')
    f = images / name
    if root not in f.resolve().parents:
      raise UsageError(f"{where}: {name!r} is outside --images {images}")
    if f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
      raise UsageError(f"{where}: {name!r} is not a {'/'.join(IMAGE_SUFFIXES)} file in {images}")
    if f in out:
      raise UsageError(f"{where}: {name!r} is listed twice")
    out[f] = text.strip()
  if not out:
    raise UsageError(f"--captions {path}: no captions in the file")
  return out


def shard_range(num: int, index: int, count: int) -> range:
  """The contiguous slice of range(num) that shard `index` of `count` encodes."""
  return range(index * num // count, (index + 1) * num // count)


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
  import numpy as np

  ratio = height / width
  return min(buckets, key=lambda b: abs(np.log(b[0] / b[1]) - np.log(ratio)))


def plan_folder(files: list[pathlib.Path], buckets, captions: dict | None = None) -> dict:
  """{bucket: [files]} from the image headers (nothing decoded); checks every caption
  (a sidecar .txt per image unless `captions` maps every file to its caption)."""
  from PIL import Image, UnidentifiedImageError

  plan = {b: [] for b in buckets}
  for f in files:
    if captions is None and not f.with_suffix(".txt").is_file():
      raise UsageError(f"--images: {f} has no caption file {f.with_suffix('.txt').name}")
    try:
      with Image.open(f) as im:
        w, h = im.size
    except (UnidentifiedImageError, OSError) as e:
      raise UsageError(f"--images: {f} is not a readable image ({e})") from None
    plan[nearest_bucket(h, w, buckets)].append(f)
  return plan


def load_folder_image(f: pathlib.Path, bucket: tuple[int, int], caption: str | None = None):
  """(uint8 (h, w, 3) image resized to cover the bucket and centre-cropped, caption: the
  given one, else the sidecar .txt's)."""
  import numpy as np
  from PIL import Image

  h, w = bucket
  img = Image.open(f).convert("RGB")
  scale = max(h / img.height, w / img.width)
  img = img.resize(
    (max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC
  )
  left, top = (img.width - w) // 2, (img.height - h) // 2
  if caption is None:
    caption = f.with_suffix(".txt").read_text().strip()
  return np.asarray(img.crop((left, top, left + w, top + h))), caption


def shapes_source(indices, image_size: int, seed: int):
  from sana_jax.shapes_eval import task as shapes

  for i in indices:
    ex = shapes.example(i, image_size, seed)
    yield ex["image"], ex["spec"]["prompt"]


def encode_source(source, settings, enc, ae, batch: int = 64):
  """Yields training examples, encoding images and captions in batches of `batch` (the last
  one padded to that size, so every batch runs one compiled program and an example's arrays
  do not depend on where a batch boundary falls)."""
  import numpy as np

  del settings

  def flush(items):
    n = len(items)
    padded = items + [items[-1]] * (batch - n)
    images = np.stack([im for im, _ in padded]).astype(np.float32) / 127.5 - 1.0
    latents = np.asarray(ae.encode(images))
    emb, mask = enc.encode([c for _, c in padded])
    for k, (_, c) in enumerate(items):
      yield {
        "latent": latents[k],
        "caption": np.asarray(emb[k]),
        "caption_mask": np.asarray(mask[k]),
        "text": c,
      }

  items, shape = [], None
  for image, caption in source:
    if shape is not None and image.shape != shape and items:
      yield from flush(items)
      items = []
    shape = image.shape
    items.append((image, caption))
    if len(items) == batch:
      yield from flush(items)
      items = []
  if items:
    yield from flush(items)


def _encoders(model: pathlib.Path, settings: dict):
  from sana_jax import bundle
  from sana_jax.models.prompts import PromptConfig, PromptEncoder

  p = settings["prompt"]
  enc = PromptEncoder.from_folders(
    str(model / "tokenizer"),
    str(model / "text_encoder"),
    PromptConfig(
      max_length=p["max_length"],
      chi=tuple(p["chi"]) if p.get("chi") else None,
      lowercase=p.get("lowercase", False),
      null_prompt=p.get("null_prompt", ""),
    ),
  )
  ae = bundle._autoencoder(model, settings["autoencoder"])  # pylint: disable=protected-access
  return enc, ae


def _default_shard() -> tuple[int, int]:
  """(process index, count) under jax.distributed (initialised from the environment as
  train.py does), else (0, 1)."""
  from sana_jax import parallel

  if parallel.maybe_initialize_distributed():
    import jax

    return jax.process_index(), jax.process_count()
  return 0, 1


def run(args) -> str:
  """Validates, encodes and writes; returns the message for the user."""
  plan = validate(args)
  index, count = plan["shard"] or _default_shard()
  if count > plan["num"]:
    raise UsageError(
      f"--shard {index}/{count}: {plan['num']} examples cannot be split into "
      f"{count} non-empty parts"
    )
  mine = shard_range(plan["num"], index, count)
  settings, ds = plan["settings"], plan["downsample"]
  if args.source == "shapes":
    by_bucket = {plan["buckets_px"][0]: list(mine)}
    make = lambda b: shapes_source(by_bucket[b], plan["size"], args.seed)  # noqa: E731
  else:
    caps = plan["captions"]
    by_bucket = plan_folder([plan["files"][i] for i in mine], plan["buckets_px"], caps)
    make = lambda b: (  # noqa: E731
      load_folder_image(f, b, caps[f] if caps else None) for f in by_bucket[b]
    )
  nonempty = [b for b, items in by_bucket.items() if items]
  total = sum(len(v) for v in by_bucket.values())

  # Every argument is checked: now load the encoders.
  import tqdm
  import tensorflow_datasets as tfds
  from sana_jax.data import latents_tfds

  tfds.disable_progress_bar()  # one bar: ours, over the examples this run encodes
  enc, ae = _encoders(args.model, settings)
  null_emb, null_mask = enc.encode_null(1)
  bar = tqdm.tqdm(
    total=total,
    desc=f"encode (part {index} of {count})" if count > 1 else "encode",
    unit="img",
    disable=args.no_progress,
  )

  def examples(bucket_latent):
    bucket = next(b for b in nonempty if (b[0] // ds, b[1] // ds) == tuple(bucket_latent))
    for ex in encode_source(make(bucket), settings, enc, ae, args.batch_size):
      bar.update(1)
      yield ex

  common = dict(
    buckets=[(h // ds, w // ds) for h, w in nonempty],
    channels=plan["channels"],
    caption_len=null_emb.shape[1],
    caption_channels=null_emb.shape[2],
    null_caption=null_emb[0],
    null_mask=null_mask[0],
    per_bucket=True,
  )
  try:
    if count == 1:
      out = latents_tfds.write_dataset(
        examples, str(args.out), args.name, overwrite=args.overwrite, **common
      )
      return f"wrote dataset of {total} examples to {out}"
    signature = {
      k: str(v) for k, v in vars(args).items() if k not in ("shard", "no_progress", "overwrite")
    }
    signature["count"] = str(count)
    part = latents_tfds.write_part(
      examples, str(args.out), args.name, index=index, count=count, signature=signature, **common
    )
  finally:
    bar.close()
  try:
    out = latents_tfds.merge_parts(str(args.out), args.name, count, overwrite=args.overwrite)
  except ValueError as e:
    raise PartsError(str(e)) from None
  if out is None:
    missing = latents_tfds.missing_parts(args.out, args.name, count)
    return (
      f"wrote part {index} of {count} ({total} examples) to {part}; the dataset is "
      f"joined when the other parts are written (missing: {missing})"
    )
  return (
    f"wrote part {index} of {count} ({total} examples); joined all {count} parts: wrote "
    f"dataset to {out}"
  )


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    message = run(args)
  except (UsageError, FileExistsError, PartsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(message)
  return 0


if __name__ == "__main__":
  sys.exit(main())
