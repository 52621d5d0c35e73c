"""TFDS dataset of precomputed training inputs: latents, caption embeddings and masks.

Written as ArrayRecord and read with `tfds.data_source` / `builder.as_data_source()`,
without TensorFlow. One split per aspect-ratio bucket: "train_{h}x{w}" holds every
example whose latent is (h, w, C), so batches of one resolution come from one split.

Features:
  latent        float32 (h, w, C): autoencoder latents, already times the scaling factor
  caption       float32|float16 (L, Cy): text-encoder embeddings
  caption_mask  int8 (L,)
  text          the caption text
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import types
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

NAME = "sana_latents"


class _EpathGFile:
  """The part of `tf.io.gfile` TFDS's shuffler uses, on etils.epath (local, gs://, ...)."""

  GFile = staticmethod(lambda path, mode: epath.Path(path).open(mode))
  exists = staticmethod(lambda path: epath.Path(path).exists())
  remove = staticmethod(lambda path: epath.Path(path).unlink())


class _NeverRaised(Exception):
  pass


def _let_shuffler_spill_without_tensorflow() -> None:
  """TFDS holds a split in memory up to 1 GB, then spills it to temporary bucket files
  through `tf.io.gfile`: without TensorFlow every split over 1 GB failed with "No module
  named 'tensorflow'" after encoding all of it (a 1024 px SANA caption alone is 2.7 MB).
  Where TensorFlow is absent, the shuffler gets epath files instead."""
  if importlib.util.find_spec("tensorflow") is not None:
    return
  from tensorflow_datasets.core import shuffle

  if not isinstance(shuffle.tf, types.SimpleNamespace):
    _ensure_open_files(shuffle.BUCKETS_NUMBER + 64)
    shuffle.tf = types.SimpleNamespace(
      io=types.SimpleNamespace(gfile=_EpathGFile),
      errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised),
    )


def _ensure_open_files(needed: int) -> None:
  """Raises the soft open-file limit to `needed` (the shuffler's 1000 bucket files) when it
  is lower. TFDS's own helper logs an ERROR whenever the soft limit already equals the hard
  one, even when it is far above what is needed (every run printed "Soft and hard limits
  for the maximum number of open file descriptors ... are identical")."""
  try:
    import resource
  except ModuleNotFoundError:  # not UNIX: nothing to raise
    return
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft == resource.RLIM_INFINITY or soft >= needed:
    return
  target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
  if target > soft:
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
  if target < needed:
    import warnings

    warnings.warn(
      f"open-file limit {target} is below the {needed} a split over 1 GB needs "
      "while it is shuffled to disk; raise it (ulimit -n) if writing fails"
    )


@dataclasses.dataclass(eq=False)
class LatentsConfig(tfds.core.BuilderConfig):
  """buckets: latent (h, w) sizes; channels: latent channels; caption_len / caption_channels:
  embedding shape; caption_dtype: storage dtype of the embeddings."""

  buckets: tuple = ((8, 8),)
  channels: int = 32
  caption_len: int = 300
  caption_channels: int = 2304
  caption_dtype: str = "float32"


def split_name(h: int, w: int) -> str:
  return f"train_{h}x{w}"


def parse_split(name: str) -> tuple[int, int]:
  h, w = name.removeprefix("train_").split("x")
  return int(h), int(w)


class SanaLatents(tfds.core.GeneratorBasedBuilder):
  """Precomputed (latent, caption embedding, mask, text) examples.

  Build with `SanaLatents(config=LatentsConfig(name=..., ...), data_dir=DIR,
  examples=callable)` where `examples()` yields dicts with the features above; then
  `download_and_prepare()`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [LatentsConfig(name="default")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)  # TFDS would need importlib_resources otherwise

  def __init__(
    self,
    *,
    examples: Callable[..., Iterable[dict]] | None = None,
    per_bucket: bool = False,
    file_format: str = "array_record",
    **kwargs,
  ):
    self._examples = examples
    self._per_bucket = per_bucket
    super().__init__(file_format=file_format, **kwargs)

  # TFDS prints "Downloading and preparing dataset ... to DIR" and "... downloaded and
  # prepared to DIR. Subsequent calls will reuse this data.": DIR is write_dataset's
  # temporary folder, and nothing is downloaded or reused; write_dataset's caller reports
  # where the dataset is.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "latent": tfds.features.Tensor(
            shape=(None, None, c.channels), dtype=np.float32, encoding="bytes"
          ),
          "caption": tfds.features.Tensor(
            shape=(c.caption_len, c.caption_channels), dtype=np.dtype(c.caption_dtype)
          ),
          "caption_mask": tfds.features.Tensor(shape=(c.caption_len,), dtype=np.int8),
          "text": tfds.features.Text(),
        }
      ),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._examples is None:
      raise ValueError("SanaLatents needs `examples=` to be built")
    c = self.builder_config
    return {split_name(h, w): self._generate_examples(h, w) for h, w in c.buckets}

  def _generate_examples(self, h: int, w: int):
    c = self.builder_config
    stream = self._examples((h, w)) if self._per_bucket else self._examples()
    for i, ex in enumerate(stream):
      latent = np.asarray(ex["latent"], np.float32)
      if latent.shape[:2] != (h, w):
        continue
      if latent.shape[2] != c.channels:
        raise ValueError(
          f"example {i}: latent has {latent.shape[2]} channels, config says {c.channels}"
        )
      yield (
        i,
        {
          "latent": latent,
          "caption": np.asarray(ex["caption"], c.caption_dtype),
          "caption_mask": np.asarray(ex["caption_mask"], np.int8),
          "text": ex.get("text", ""),
        },
      )


def open_dataset(data_dir: str) -> dict:
  """{split name: random-access source} for a written dataset folder (the version folder,
  e.g. DIR/sana_latents/NAME/1.0.0, or any parent that holds exactly one)."""
  path = epath.Path(data_dir)
  if not path.exists():
    raise FileNotFoundError(f"no dataset at {data_dir}")
  if not (path / "dataset_info.json").exists():
    root = pathlib.Path(str(path))
    found = sorted(
      p.parent
      for p in root.glob("**/dataset_info.json")
      if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if len(found) != 1:
      raise FileNotFoundError(
        f"{data_dir}: expected one TFDS dataset below, found {[str(f) for f in found] or 'none'}"
      )
    path = found[0]
  builder = tfds.builder_from_directory(str(path))
  return dict(builder.as_data_source())


def version_dir(data_dir: str | pathlib.Path, name: str) -> pathlib.Path:
  """Where `write_dataset(..., data_dir, name)` puts a dataset: DATA/sana_latents/NAME/1.0.0."""
  return pathlib.Path(data_dir) / NAME / name / str(SanaLatents.VERSION)


def existing_dataset(data_dir: str | pathlib.Path, name: str) -> pathlib.Path | None:
  """The dataset folder of that name under data_dir if one exists (any version)."""
  folder = pathlib.Path(data_dir) / NAME / name
  if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
    return folder
  return None


def _temporary_sibling(data_dir: pathlib.Path, label: str) -> pathlib.Path:
  import tempfile

  data_dir.mkdir(parents=True, exist_ok=True)
  return pathlib.Path(tempfile.mkdtemp(prefix=f".{label}.tmp-", dir=data_dir))


def _install(
  new_version: pathlib.Path, data_dir: pathlib.Path, name: str, overwrite: bool
) -> pathlib.Path:
  """Moves a complete version folder into place; an existing dataset of that name is
  refused, or with `overwrite` replaced (moved aside first, deleted after the move)."""
  import shutil

  final_parent = data_dir / NAME / name
  old = existing_dataset(data_dir, name)
  if old is not None and not overwrite:
    raise FileExistsError(f"{old} already holds a dataset (pass --overwrite to replace it)")
  final_parent.parent.mkdir(parents=True, exist_ok=True)
  aside = None
  if old is not None:
    aside = data_dir / NAME / f".{name}.replaced-{os.getpid()}"
    os.replace(old, aside)
  final_parent.mkdir()
  os.replace(new_version, final_parent / new_version.name)
  if aside is not None:
    shutil.rmtree(aside, ignore_errors=True)
  return final_parent / new_version.name


class _DropCustomConfigWarning(logging.Filter):
  def filter(self, record):
    return not str(record.msg).startswith("Using custom data configuration")


@contextlib.contextmanager
def _quiet_custom_config_warning():
  """TFDS warns "Using custom data configuration: LatentsConfig(...)" for every config not
  listed in BUILDER_CONFIGS; every dataset here is one (its geometry is the config)."""
  logger, f = logging.getLogger("absl"), _DropCustomConfigWarning()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def _build(
  examples,
  tmp: pathlib.Path,
  name: str,
  *,
  per_bucket: bool,
  buckets,
  channels,
  caption_len,
  caption_channels,
  caption_dtype,
) -> pathlib.Path:
  """TFDS writes the dataset into the fresh data_dir `tmp`; returns its version folder."""
  config = LatentsConfig(
    name=name,
    buckets=tuple(tuple(b) for b in buckets),
    channels=channels,
    caption_len=caption_len,
    caption_channels=caption_channels,
    caption_dtype=caption_dtype,
  )
  with _quiet_custom_config_warning():
    builder = SanaLatents(
      config=config, data_dir=str(tmp), examples=examples, per_bucket=per_bucket
    )
  _let_shuffler_spill_without_tensorflow()
  builder.download_and_prepare()
  return pathlib.Path(str(builder.data_dir))


def write_dataset(
  examples: Callable[..., Iterable[dict]],
  data_dir: str,
  name: str,
  *,
  buckets: Sequence[tuple[int, int]],
  channels: int,
  caption_len: int,
  caption_channels: int,
  null_caption: np.ndarray,
  null_mask: np.ndarray,
  caption_dtype: str = "float32",
  per_bucket: bool = False,
  overwrite: bool = False,
) -> str:
  """Writes a dataset and its null-caption embedding; returns the version folder
  (DATA/sana_latents/NAME/1.0.0).

  `examples()` yields {"latent" (h, w, C), "caption" (L, Cy), "caption_mask" (L,), "text"}
  and is called once per bucket (examples of other buckets are skipped); with `per_bucket`
  it is called as `examples((h, w))` and yields only that bucket's examples. The dataset is
  written into a temporary sibling folder and moved into place when complete: an existing
  dataset of that name raises FileExistsError, or with `overwrite` is replaced only then.
  """
  import shutil

  data_dir = pathlib.Path(data_dir)
  if existing_dataset(data_dir, name) is not None and not overwrite:
    raise FileExistsError(
      f"{existing_dataset(data_dir, name)} already holds a dataset (pass --overwrite to replace it)"
    )
  tmp = _temporary_sibling(data_dir, f"{NAME}-{name}")
  try:
    version = _build(
      examples,
      tmp,
      name,
      per_bucket=per_bucket,
      buckets=buckets,
      channels=channels,
      caption_len=caption_len,
      caption_channels=caption_channels,
      caption_dtype=caption_dtype,
    )
    save_null_caption(version / NULL_CAPTION_FILE, null_caption, null_mask)
    return str(_install(version, data_dir, name, overwrite))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


NULL_CAPTION_FILE = "null_caption.npz"


def save_null_caption(path: pathlib.Path, null_caption, null_mask) -> None:
  np.savez(path, caption=np.asarray(null_caption, np.float32), mask=np.asarray(null_mask, np.int32))


# Datasets written in parts (one per host): DATA/.sana_latents-NAME.parts/part-I-of-N/ holds
# part I as a complete dataset (its own data_dir) and part.json (what was asked for, to check
# that every part comes from the same run); the part that completes the set merges them.

PARTS_INFO = "part.json"
PART_NULL_CAPTION = "null_caption.part.npz"  # not NULL_CAPTION_FILE: never found as a dataset's


def parts_dir(data_dir: str | pathlib.Path, name: str) -> pathlib.Path:
  return pathlib.Path(data_dir) / f".{NAME}-{name}.parts"


def _part_folder(data_dir, name, index: int, count: int) -> pathlib.Path:
  return parts_dir(data_dir, name) / f"part-{index:05d}-of-{count:05d}"


def write_part(
  examples: Callable[..., Iterable[dict]],
  data_dir: str,
  name: str,
  *,
  index: int,
  count: int,
  signature: dict,
  buckets: Sequence[tuple[int, int]],
  channels: int,
  caption_len: int,
  caption_channels: int,
  null_caption: np.ndarray,
  null_mask: np.ndarray,
  caption_dtype: str = "float32",
  per_bucket: bool = False,
) -> pathlib.Path:
  """Writes part `index` of `count` (buckets without examples in this part get no split);
  returns its folder. `signature`: what the run was asked for apart from the part (the
  merge refuses parts whose signatures differ)."""
  import shutil

  data_dir = pathlib.Path(data_dir)
  root = parts_dir(data_dir, name)
  root.mkdir(parents=True, exist_ok=True)
  tmp = _temporary_sibling(root, f"part-{index:05d}")
  try:
    version = _build(
      examples,
      tmp / "data",
      name,
      per_bucket=per_bucket,
      buckets=buckets,
      channels=channels,
      caption_len=caption_len,
      caption_channels=caption_channels,
      caption_dtype=caption_dtype,
    )
    save_null_caption(version / PART_NULL_CAPTION, null_caption, null_mask)
    (tmp / PARTS_INFO).write_text(
      json.dumps(
        {
          "index": index,
          "count": count,
          "signature": signature,
          "version": str(version.relative_to(tmp)),
        },
        indent=1,
        sort_keys=True,
      )
    )
    final = _part_folder(data_dir, name, index, count)
    if final.exists():  # an earlier attempt at this part: replaced by the complete new one
      aside = root / f".{final.name}.replaced-{os.getpid()}"
      os.replace(final, aside)
      shutil.rmtree(aside, ignore_errors=True)
    os.replace(tmp, final)
    return final
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def missing_parts(data_dir, name, count: int) -> list[int]:
  return [
    i for i in range(count) if not (_part_folder(data_dir, name, i, count) / PARTS_INFO).exists()
  ]


def merge_parts(data_dir: str, name: str, count: int, overwrite: bool = False) -> str | None:
  """When all `count` parts are written, joins them into one dataset (each split's shard
  files in part order, so records keep the order of one unsharded run; the metadata and
  null caption written once), removes the parts and returns the version folder. Returns
  None when parts are missing or another process is already merging."""
  import shutil

  data_dir = pathlib.Path(data_dir)
  if missing_parts(data_dir, name, count):
    return None
  root = parts_dir(data_dir, name)
  try:
    (root / "merging").mkdir()  # atomic: exactly one process merges
  except FileExistsError:
    return None
  parts = [_part_folder(data_dir, name, i, count) for i in range(count)]
  infos = [json.loads((p / PARTS_INFO).read_text()) for p in parts]
  sig0 = infos[0]["signature"]
  for i, info in enumerate(infos[1:], 1):
    if info["signature"] != sig0:
      diff = {
        k: (sig0.get(k), info["signature"].get(k))
        for k in sorted(set(sig0) | set(info["signature"]))
        if sig0.get(k) != info["signature"].get(k)
      }
      (root / "merging").rmdir()
      raise ValueError(
        f"part {i} of {count} under {root} was written with other settings "
        f"than part 0 (field: (part 0, part {i})): {diff}; rewrite it"
      )
  versions = [p / info["version"] for p, info in zip(parts, infos)]
  tmp = _temporary_sibling(data_dir, f"{NAME}-{name}")
  try:
    merged = tmp / versions[0].name
    merged.mkdir()
    shutil.copy(versions[0] / "features.json", merged / "features.json")
    info = json.loads((versions[0] / "dataset_info.json").read_text())
    split_parts: dict[str, list] = {}
    for v in versions:
      for sp in json.loads((v / "dataset_info.json").read_text())["splits"]:
        split_parts.setdefault(sp["name"], []).append((v, sp))
    fmt = info.get("fileFormat", "array_record")
    splits = []
    for split, pieces in sorted(split_parts.items()):
      lengths = [int(n) for _, sp in pieces for n in sp.get("shardLengths", [])]
      total, k = len(lengths), 0
      for v, sp in pieces:
        for j in range(len(sp.get("shardLengths", []))):
          src = v / f"{NAME}-{split}.{fmt}-{j:05d}-of-{len(sp['shardLengths']):05d}"
          _link_or_copy(src, merged / f"{NAME}-{split}.{fmt}-{k:05d}-of-{total:05d}")
          k += 1
      splits.append(
        {
          "filepathTemplate": "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
          "name": split,
          "shardLengths": [str(n) for n in lengths],
          "numBytes": str(sum(int(sp.get("numBytes", 0)) for _, sp in pieces)),
        }
      )
    info["splits"] = splits
    (merged / "dataset_info.json").write_text(json.dumps(info, indent=2))
    shutil.copy(versions[0] / PART_NULL_CAPTION, merged / NULL_CAPTION_FILE)
    out = _install(merged, data_dir, name, overwrite)
  except BaseException:
    (root / "merging").rmdir()  # the parts are intact: a later run can merge them
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  shutil.rmtree(root, ignore_errors=True)
  return str(out)


def _link_or_copy(src: pathlib.Path, dst: pathlib.Path) -> None:
  try:
    os.link(src, dst)
  except OSError:
    import shutil

    shutil.copy2(src, dst)
