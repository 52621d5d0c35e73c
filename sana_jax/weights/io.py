"""Reading and writing tensor files without torch where possible.

- safetensors: read by parsing the header ourselves, so bf16/fp16 checkpoints load as
  numpy (bf16 via ml_dtypes), with a clear error for truncated files; written with
  safetensors.numpy.
- diffusers folders: a single `*.safetensors` or shards + `*.safetensors.index.json`.
- `.pth`: torch.load(weights_only=True) (torch imported lazily); pickles carrying code are
  refused by torch, and we re-raise with the path.
- Every writer builds its output in a temporary sibling and renames it into place, so a
  failure leaves no partial output.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import struct
import tempfile
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit what was asked."""


def _require_exists(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such file or folder: {path}")
  return path


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as numpy arrays (bf16 as ml_dtypes.bfloat16)."""
  path = _require_exists(path)
  data = path.read_bytes()
  if len(data) < 8:
    raise CheckpointError(f"{path}: truncated safetensors file ({len(data)} bytes)")
  (header_len,) = struct.unpack("<Q", data[:8])
  if 8 + header_len > len(data):
    raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} "
                          f"bytes, file has {len(data) - 8})")
  try:
    header = json.loads(data[8:8 + header_len])
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
  base = 8 + header_len
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    if base + end > len(data):
      raise CheckpointError(f"{path}: truncated safetensors file: tensor {name} needs bytes up "
                            f"to {base + end}, file has {len(data)}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    arr = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize,
                        offset=base + start)
    out[name] = arr.reshape(info["shape"])
  return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
            metadata=dict(metadata) if metadata else None)


def read_safetensors_folder(folder: str | os.PathLike,
                            stem: str = "diffusion_pytorch_model") -> dict[str, np.ndarray]:
  """A folder holding `{stem}.safetensors`, or shards listed in `{stem}.safetensors.index.json`.

  Any single `*.safetensors` / index in the folder is accepted when `stem` is not found.
  """
  folder = _require_exists(folder)
  if folder.is_file():
    return read_safetensors(folder)
  index = folder / f"{stem}.safetensors.index.json"
  single = folder / f"{stem}.safetensors"
  if not index.exists() and not single.exists():
    indices = sorted(folder.glob("*.safetensors.index.json"))
    singles = sorted(folder.glob("*.safetensors"))
    if len(indices) == 1:
      index = indices[0]
    elif len(singles) == 1:
      single = singles[0]
    else:
      raise CheckpointError(f"{folder}: expected {stem}.safetensors or a sharded index; found "
                            f"{[p.name for p in indices + singles] or 'no safetensors files'}")
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
      tensors = read_safetensors(folder / shard)
      out.update(tensors)
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise CheckpointError(f"{index}: tensors listed but absent from shards: {missing[:10]}")
    return out
  return read_safetensors(single)


def write_safetensors_sharded(tensors: Mapping[str, np.ndarray], folder: pathlib.Path,
                              stem: str, max_shard_bytes: int | None = None) -> None:
  """Writes `{stem}.safetensors`, or shards + index when larger than max_shard_bytes."""
  total = sum(np.asarray(v).nbytes for v in tensors.values())
  if max_shard_bytes is None or total <= max_shard_bytes:
    write_safetensors(tensors, folder / f"{stem}.safetensors")
    return
  shards, current, size = [], {}, 0
  for name in sorted(tensors):
    nbytes = np.asarray(tensors[name]).nbytes
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensors[name]
    size += nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards):
    fname = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(shard, folder / fname)
    weight_map.update({name: fname for name in shard})
  index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
  (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, is_dir: bool) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; moves it into place only on success."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  tmp = tmp_root / path.name
  if is_dir:
    tmp.mkdir()
  try:
    yield tmp
    if path.exists():
      if path.is_dir():
        shutil.rmtree(path)
      else:
        path.unlink()
    os.replace(tmp, path)
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)


# ---------------------------------------------------------------------------- torch .pth


def torch_to_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy, keeping bf16 (as ml_dtypes.bfloat16) bit-exactly."""
  import torch
  tensor = tensor.detach().cpu().contiguous()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def numpy_to_torch(array: np.ndarray):
  import torch
  array = np.array(array, copy=True, order="C")  # torch wants writable memory
  if array.dtype == ml_dtypes.bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)


def read_pth(path: str | os.PathLike) -> dict:
  """torch.load(path, weights_only=True): a pickle that carries code is refused."""
  path = _require_exists(path)
  import pickle

  import torch
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(f"{path}: refused to unpickle (weights_only=True): {e}") from None
  except (RuntimeError, EOFError, OSError) as e:
    raise CheckpointError(f"{path}: cannot read .pth checkpoint: {e}") from None


def write_pth(obj, path: str | os.PathLike) -> None:
  import torch
  with atomic_output(path, is_dir=False) as tmp:
    torch.save(obj, str(tmp))
