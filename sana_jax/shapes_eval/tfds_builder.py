"""TFDS builder for ShapesEval, written as ArrayRecord (readable without TensorFlow).

Configs: "32px", "64px", "128px" (image side), each with a "train" split of
`num_train` examples (categories cycle, so they are balanced to within one) and an "eval"
split with one ground-truth render per evaluation prompt (sana_jax/assets/
shapes_eval_prompts.jsonl, same order). Training captions never equal an evaluation prompt.

Features (numpy, as `tfds.data_source` returns them):
  image     uint8 (S, S, 3), white background
  caption   bytes (utf-8 text)
  spec      bytes (utf-8 JSON: the GenEval-style specification, "prompt" = caption)
  category  int64 index into sana_jax.data.shapes.CATEGORIES

Build and read (no TensorFlow needed)::

    from sana_jax.shapes_eval import tfds_builder as shapes_tfds
    shapes_tfds.ShapesEval(config="64px", data_dir=DIR).download_and_prepare()
    ds = tfds.data_source("shapes_eval/64px", data_dir=DIR)   # ds["train"][i]

Another size / length / seed: `ShapesEval(config=make_config(48, num_train=20000, seed=3),
data_dir=DIR)`; once written it reads back by name too (tfds.data_source(
"shapes_eval/48px_n20000_s3", data_dir=DIR)) or with `builder.as_data_source()`.

Records are stored in key order (shuffling disabled): ds["train"][i] is
`shapes.example(i, size, seed)` and ds["eval"][i] renders evaluation prompt i. Images are
stored raw (tfds.features.Image would need TensorFlow to encode PNG).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from sana_jax.shapes_eval import task as shapes

DEFAULT_NUM_TRAIN = 6_000  # 1000 per category; about 40 s to build at 64 px on 2 CPU cores


@dataclasses.dataclass(eq=False)
class ShapesEvalConfig(tfds.core.BuilderConfig):
  """image_size: image side in pixels; num_train: train examples; seed: data seed."""

  image_size: int = 64
  num_train: int = DEFAULT_NUM_TRAIN
  seed: int = 0


def make_config(
  image_size: int, num_train: int = DEFAULT_NUM_TRAIN, seed: int = 0
) -> ShapesEvalConfig:
  """A config for any size / length / seed, named so different data never share a folder:
  e.g. make_config(32, 20000, 1).name == "32px_n20000_s1"."""
  if image_size < 16 or num_train < 0:
    raise ValueError(f"need image_size >= 16 and num_train >= 0, got {image_size}, {num_train}")
  return ShapesEvalConfig(
    name=f"{image_size}px_n{num_train}_s{seed}",
    image_size=image_size,
    num_train=num_train,
    seed=seed,
  )


class ShapesEval(tfds.core.GeneratorBasedBuilder):
  """ShapesEval: coloured shapes with captions in GenEval's six categories."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    ShapesEvalConfig(name=f"{s}px", description=f"{s}x{s} images", image_size=s)
    for s in (32, 64, 128)
  ]
  DEFAULT_CONFIG_NAME = "64px"

  # TFDS finds a builder's source through `importlib_resources`, a package it does not
  # install on Python >= 3.9; name the file directly instead.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8),
          "caption": tfds.features.Text(),
          "spec": tfds.features.Text(),
          "category": tfds.features.ClassLabel(names=list(shapes.CATEGORIES)),
        }
      ),
      supervised_keys=None,
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples("train"), "eval": self._generate_examples("eval")}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    if split == "train":
      for i in range(cfg.num_train):
        ex = shapes.example(i, cfg.image_size, cfg.seed)
        yield i, _encode(ex["image"], ex["spec"])
    elif split == "eval":
      for i, spec in enumerate(shapes.eval_prompts()):
        image = shapes.render(spec, cfg.image_size, np.random.default_rng([cfg.seed, 1, i]))
        yield i, _encode(image, spec)
    else:
      raise ValueError(f"unknown split {split!r}; expected 'train' or 'eval'")


def _encode(image: np.ndarray, spec: dict) -> dict:
  return {
    "image": image,
    "caption": spec["prompt"],
    "spec": json.dumps(spec),
    "category": shapes.CATEGORIES.index(spec["tag"]),
  }


def decode(example: dict) -> dict:
  """A record from `tfds.data_source` -> {"image", "caption": str, "spec": dict,
  "category": str}."""
  text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  return {
    "image": np.asarray(example["image"], np.uint8),
    "caption": text(example["caption"]),
    "spec": json.loads(text(example["spec"])),
    "category": shapes.CATEGORIES[int(example["category"])],
  }
