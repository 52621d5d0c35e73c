"""The training input pipeline: bucketed, shuffled, host-sharded, resumable batches (grain).

A batch plan maps a global batch index to record indices of one bucket (one latent
resolution): epoch e shuffles every bucket's records with seed (seed, e), cuts them into
global batches (the remainder is dropped) and shuffles the order of the batches. A grain
`DataLoader` walks the plan sequentially; its iterator state (the next batch index) is
what checkpoints save, so a resumed run continues with exactly the same batches. Each host
reads only its slice of every global batch.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import grain.python as grain
from absl import flags
import jax
import numpy as np

from sana_jax.data import latents_tfds


@dataclasses.dataclass(frozen=True)
class Bucket:
  split: str
  hw: tuple[int, int]
  size: int


class BatchPlanSource:
  """Random-access source of host-local batches; index = global batch number.

  Returns {"latent": (b, h, w, C) float32, "caption": (b, L, Cy) float32,
  "caption_mask": (b, L) int32} with b = global_batch // process_count.
  """

  def __init__(self, sources: Mapping[str, Sequence], global_batch: int, seed: int,
               num_epochs: int, process_index: int = 0, process_count: int = 1):
    if global_batch % process_count:
      raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
    self._sources = dict(sources)
    self._buckets = [Bucket(name, latents_tfds.parse_split(name), len(src))
                     for name, src in sorted(self._sources.items())]
    self.batches_per_epoch = sum(b.size // global_batch for b in self._buckets)
    if self.batches_per_epoch == 0:
      sizes = {b.split: b.size for b in self._buckets}
      raise ValueError(f"no bucket holds a full global batch of {global_batch}: {sizes}")
    self._global_batch = global_batch
    self._seed = seed
    self._num_epochs = num_epochs
    self._local = global_batch // process_count
    self._offset = process_index * self._local
    self._plan_epoch, self._plan = -1, None

  def __len__(self) -> int:
    return self.batches_per_epoch * self._num_epochs

  def __repr__(self) -> str:  # grain checks it on restore: keep it a pure function of the plan
    buckets = ",".join(f"{b.split}:{b.size}" for b in self._buckets)
    return (f"BatchPlanSource(buckets=[{buckets}], global_batch={self._global_batch}, "
            f"seed={self._seed}, epochs={self._num_epochs})")

  def _epoch_plan(self, epoch: int) -> list[tuple[str, np.ndarray]]:
    if epoch != self._plan_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      plan = []
      for b in self._buckets:
        order = rng.permutation(b.size)
        n = b.size // self._global_batch
        plan += [(b.split, order[i * self._global_batch:(i + 1) * self._global_batch])
                 for i in range(n)]
      self._plan = [plan[i] for i in rng.permutation(len(plan))]
      self._plan_epoch = epoch
    return self._plan

  def record_indices(self, index: int) -> tuple[str, np.ndarray]:
    """(split, global record indices) of global batch `index`."""
    epoch, j = divmod(index, self.batches_per_epoch)
    return self._epoch_plan(epoch)[j]

  def __getitem__(self, index: int) -> dict:
    split, idx = self.record_indices(int(index))
    local = idx[self._offset:self._offset + self._local]
    src = self._sources[split]
    records = [src[int(i)] for i in local]
    return {
        "latent": np.stack([np.asarray(r["latent"], np.float32) for r in records]),
        "caption": np.stack([np.asarray(r["caption"], np.float32) for r in records]),
        "caption_mask": np.stack([np.asarray(r["caption_mask"], np.int32) for r in records]),
    }


def make_loader(data_dir: str, global_batch: int, seed: int, num_epochs: int = 1000,
                worker_count: int = 0) -> tuple[grain.DataLoader, BatchPlanSource]:
  """A grain DataLoader over the dataset at data_dir (see latents_tfds.open_dataset)."""
  sources = {k: v for k, v in latents_tfds.open_dataset(data_dir).items()
             if k.startswith("train_")}
  if not sources:
    raise ValueError(f"{data_dir}: no train_HxW splits")
  plan = BatchPlanSource(sources, global_batch, seed, num_epochs,
                         jax.process_index(), jax.process_count())
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (defaults here)
  sampler = grain.IndexSampler(num_records=len(plan), shuffle=False, num_epochs=1,
                               shard_options=grain.NoSharding())
  loader = grain.DataLoader(data_source=plan, sampler=sampler, worker_count=worker_count)
  return loader, plan


def dataset_shapes(data_dir: str) -> dict:
  """{"latent_channels", "caption_len", "caption_channels", "buckets"} of a dataset."""
  sources = latents_tfds.open_dataset(data_dir)
  train = {k: v for k, v in sources.items() if k.startswith("train_")}
  if not train:
    raise ValueError(f"{data_dir}: no train_HxW splits")
  first = next(iter(train.values()))[0]
  return {"latent_channels": int(np.shape(first["latent"])[-1]),
          "caption_len": int(np.shape(first["caption"])[0]),
          "caption_channels": int(np.shape(first["caption"])[1]),
          "buckets": sorted(latents_tfds.parse_split(k) for k in train)}
