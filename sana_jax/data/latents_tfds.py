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

import dataclasses
import importlib.util
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
    shuffle._increase_open_files_limit()  # pylint: disable=protected-access  (1000 buckets)
    shuffle.tf = types.SimpleNamespace(
        io=types.SimpleNamespace(gfile=_EpathGFile),
        errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))


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

  def __init__(self, *, examples: Callable[[], Iterable[dict]] | None = None,
               file_format: str = "array_record", **kwargs):
    self._examples = examples
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "latent": tfds.features.Tensor(shape=(None, None, c.channels), dtype=np.float32,
                                          encoding="bytes"),
            "caption": tfds.features.Tensor(shape=(c.caption_len, c.caption_channels),
                                            dtype=np.dtype(c.caption_dtype)),
            "caption_mask": tfds.features.Tensor(shape=(c.caption_len,), dtype=np.int8),
            "text": tfds.features.Text(),
        }),
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
    for i, ex in enumerate(self._examples()):
      latent = np.asarray(ex["latent"], np.float32)
      if latent.shape[:2] != (h, w):
        continue
      if latent.shape[2] != c.channels:
        raise ValueError(f"example {i}: latent has {latent.shape[2]} channels, config says "
                         f"{c.channels}")
      yield i, {"latent": latent,
                "caption": np.asarray(ex["caption"], c.caption_dtype),
                "caption_mask": np.asarray(ex["caption_mask"], np.int8),
                "text": ex.get("text", "")}


def open_dataset(data_dir: str) -> dict:
  """{split name: random-access source} for a written dataset folder (the version folder,
  e.g. DIR/sana_latents/NAME/1.0.0, or any parent that holds exactly one)."""
  path = epath.Path(data_dir)
  if not path.exists():
    raise FileNotFoundError(f"no dataset at {data_dir}")
  if not (path / "dataset_info.json").exists():
    found = sorted(p.parent for p in pathlib.Path(str(path)).glob("**/dataset_info.json"))
    if len(found) != 1:
      raise FileNotFoundError(f"{data_dir}: expected one TFDS dataset below, found "
                              f"{[str(f) for f in found] or 'none'}")
    path = found[0]
  builder = tfds.builder_from_directory(str(path))
  return dict(builder.as_data_source())


def write_dataset(examples: Callable[[], Iterable[dict]], data_dir: str, name: str, *,
                  buckets: Sequence[tuple[int, int]], channels: int, caption_len: int,
                  caption_channels: int, null_caption: np.ndarray, null_mask: np.ndarray,
                  caption_dtype: str = "float32") -> str:
  """Writes a dataset and its null-caption embedding; returns the version folder.

  `examples()` yields {"latent" (h, w, C), "caption" (L, Cy), "caption_mask" (L,), "text"}
  and is called once per bucket.
  """
  config = LatentsConfig(name=name, buckets=tuple(tuple(b) for b in buckets), channels=channels,
                         caption_len=caption_len, caption_channels=caption_channels,
                         caption_dtype=caption_dtype)
  builder = SanaLatents(config=config, data_dir=data_dir, examples=examples)
  _let_shuffler_spill_without_tensorflow()
  builder.download_and_prepare()
  out = pathlib.Path(str(builder.data_dir))
  np.savez(out / "null_caption.npz", caption=np.asarray(null_caption, np.float32),
           mask=np.asarray(null_mask, np.int32))
  return str(out)
