"""The training input pipeline: bucketed, shuffled, host-sharded, resumable batches (grain).

A batch plan maps a global batch index to record indices of one bucket (one latent
resolution): epoch e shuffles every bucket's records with seed (seed, e), cuts them into
global batches (the remainder is dropped) and shuffles the order of the batches. A grain
`DataLoader` walks the plan sequentially; its iterator state (the next batch index) is
what checkpoints save for inspection. The training loop consumes one global batch per
step, so a run resumed at step s starts the plan at batch s (`make_loader(start_batch=s)`)
and continues with exactly the same batches, whatever data.worker_count it now uses.

Several processes: every process walks the same plan (the same global batch indices, so
the iterator state is the same everywhere and restores onto any process count) and reads
only the rows of each global batch that its devices hold (`process_rows`, from the batch
sharding); across processes each example of an epoch is read exactly once. grain's own
sharding (ShardByJaxProcess) is not used: it would give each process different *batches*,
not its share of the same global batch.
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
  "caption_mask": (b, L) int32}: rows [start, stop) of the global batch (b = stop - start;
  by default the process's equal share, process_index * global_batch // process_count on).
  """

  def __init__(
    self,
    sources: Mapping[str, Sequence],
    global_batch: int,
    seed: int,
    num_epochs: int,
    process_index: int = 0,
    process_count: int = 1,
    rows: tuple[int, int] | None = None,
  ):
    if rows is None:
      if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} hosts")
      local = global_batch // process_count
      rows = (process_index * local, (process_index + 1) * local)
    if not 0 <= rows[0] < rows[1] <= global_batch:
      raise ValueError(f"rows {rows} are not a slice of a global batch of {global_batch}")
    self._sources = dict(sources)
    self._buckets = [
      Bucket(name, latents_tfds.parse_split(name), len(src))
      for name, src in sorted(self._sources.items())
    ]
    self.batches_per_epoch = sum(b.size // global_batch for b in self._buckets)
    if self.batches_per_epoch == 0:
      sizes = {b.split: b.size for b in self._buckets}
      raise ValueError(f"no bucket holds a full global batch of {global_batch}: {sizes}")
    self._global_batch = global_batch
    self._seed = seed
    self._num_epochs = num_epochs
    self.rows = tuple(rows)
    self._plan_epoch, self._plan = -1, None

  def __len__(self) -> int:
    return self.batches_per_epoch * self._num_epochs

  def __repr__(self) -> str:  # grain checks it on restore: keep it a pure function of the plan
    buckets = ",".join(f"{b.split}:{b.size}" for b in self._buckets)
    return (
      f"BatchPlanSource(buckets=[{buckets}], global_batch={self._global_batch}, "
      f"seed={self._seed}, epochs={self._num_epochs})"
    )

  def _epoch_plan(self, epoch: int) -> list[tuple[str, np.ndarray]]:
    if epoch != self._plan_epoch:
      rng = np.random.default_rng([self._seed, epoch])
      plan = []
      for b in self._buckets:
        order = rng.permutation(b.size)
        n = b.size // self._global_batch
        plan += [
          (b.split, order[i * self._global_batch : (i + 1) * self._global_batch]) for i in range(n)
        ]
      self._plan = [plan[i] for i in rng.permutation(len(plan))]
      self._plan_epoch = epoch
    return self._plan

  def record_indices(self, index: int) -> tuple[str, np.ndarray]:
    """(split, global record indices) of global batch `index`."""
    epoch, j = divmod(index, self.batches_per_epoch)
    return self._epoch_plan(epoch)[j]

  def __getitem__(self, index: int) -> dict:
    split, idx = self.record_indices(int(index))
    local = idx[self.rows[0] : self.rows[1]]
    src = self._sources[split]
    records = [src[int(i)] for i in local]
    return {
      "latent": np.stack([np.asarray(r["latent"], np.float32) for r in records]),
      "caption": np.stack([np.asarray(r["caption"], np.float32) for r in records]),
      "caption_mask": np.stack([np.asarray(r["caption_mask"], np.int32) for r in records]),
    }


class _FromBatch:
  """The plan from global batch `start` on (what a run resumed at step `start` reads)."""

  def __init__(self, plan: BatchPlanSource, start: int):
    self._plan, self._start = plan, start

  def __len__(self) -> int:
    return len(self._plan) - self._start

  def __repr__(self) -> str:
    return repr(self._plan)

  def __getitem__(self, index: int) -> dict:
    return self._plan[int(index) + self._start]


def process_rows(batch_sharding: jax.sharding.NamedSharding, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows this process's devices hold under
  `batch_sharding` (batch on axis 0); the slice `jax.make_array_from_process_local_data`
  expects. Raises if the process's rows are not one contiguous block."""
  shape = (global_batch,) + (1,) * (len(batch_sharding.spec) - 1)
  index = batch_sharding.addressable_devices_indices_map(shape)
  blocks = sorted(
    {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index.values()}
  )
  start, stop = blocks[0][0], blocks[-1][1]
  covered = np.zeros(global_batch, bool)
  for a, b in blocks:
    covered[a:b] = True
  if not covered[start:stop].all():
    raise ValueError(
      f"process {jax.process_index()} holds batch rows {blocks}, not one "
      "contiguous block: order the mesh so each process's devices are adjacent"
    )
  return int(start), int(stop)


def _train_sources(data_dir: str) -> dict:
  sources = {k: v for k, v in latents_tfds.open_dataset(data_dir).items() if k.startswith("train_")}
  if not sources:
    raise ValueError(f"{data_dir}: no train_HxW splits")
  return sources


def make_plan(data_dir: str, global_batch: int, seed: int, num_epochs: int) -> BatchPlanSource:
  """The batch plan alone (its repr is what a checkpoint's data state records)."""
  return BatchPlanSource(_train_sources(data_dir), global_batch, seed, num_epochs)


def make_loader(
  data_dir: str,
  global_batch: int,
  seed: int,
  num_epochs: int = 1000,
  worker_count: int = 0,
  rows: tuple[int, int] | None = None,
  start_batch: int = 0,
) -> tuple[grain.DataLoader, BatchPlanSource]:
  """A grain DataLoader over the dataset at data_dir (see latents_tfds.open_dataset),
  yielding global batches start_batch, start_batch + 1, ... of the plan.
  rows: this process's [start, stop) of every global batch (`process_rows`); by default
  its equal share by process index."""
  sources = _train_sources(data_dir)
  plan = BatchPlanSource(
    sources, global_batch, seed, num_epochs, jax.process_index(), jax.process_count(), rows=rows
  )
  if worker_count and not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags (defaults here)
  if not 0 <= start_batch < len(plan):
    raise ValueError(
      f"start_batch {start_batch}: the plan has {len(plan)} batches "
      f"({plan.batches_per_epoch} per epoch); raise data.num_epochs"
    )
  source = _FromBatch(plan, start_batch) if start_batch else plan
  sampler = grain.IndexSampler(
    num_records=len(source), shuffle=False, num_epochs=1, shard_options=grain.NoSharding()
  )
  loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=worker_count)
  return loader, plan


def dataset_shapes(data_dir: str) -> dict:
  """{"latent_channels", "caption_len", "caption_channels", "buckets"} of a dataset."""
  sources = latents_tfds.open_dataset(data_dir)
  train = {k: v for k, v in sources.items() if k.startswith("train_")}
  if not train:
    raise ValueError(f"{data_dir}: no train_HxW splits")
  first = next(iter(train.values()))[0]
  return {
    "latent_channels": int(np.shape(first["latent"])[-1]),
    "caption_len": int(np.shape(first["caption"])[0]),
    "caption_channels": int(np.shape(first["caption"])[1]),
    "buckets": sorted(latents_tfds.parse_split(k) for k in train),
  }
