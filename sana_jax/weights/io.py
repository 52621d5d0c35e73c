"""Reading and writing tensor files without torch where possible.

- safetensors: one strict reader for every model (`read_safetensors`, shards through
  `read_safetensors_index`): the header parsed here, the tensors read-only numpy views of
  a memory map (no copy; bf16 stays bf16 via ml_dtypes), clear errors naming the file,
  the tensor, its dtype and shape; written with safetensors.numpy.
- parameter trees: one `flatten` / `unflatten` ('a/b/kernel' keys) for every model.
- diffusers folders: a single `*.safetensors` or shards + `*.safetensors.index.json`.
- `.pth`: torch.load(weights_only=True) (torch imported lazily); pickles carrying code are
  refused by torch, and we re-raise with the path.
- Every writer builds its output in a temporary sibling and renames it into place, so a
  failure leaves no partial output; an existing output is replaced (moved aside, then
  deleted) only once the new one is complete, or refused with `overwrite=False`.
- Command-line helpers shared by the converters (`ArgumentParser`, `check_output`,
  `run_main`): bad input ends with `error: ...` and exit status 2 before any heavy work.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import struct
import sys
import tempfile
from typing import Any, Callable, Iterator, Mapping, Sequence

import ml_dtypes
import numpy as np

from sana_jax.cli import UsageError  # noqa: F401  (re-exported: converters raise it)

_ST_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit what was asked."""


def _require_exists(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no such file or folder: {path}")
  return path


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as read-only numpy views of a memory map of it:
  nothing is read until used and no copy is made, so a converter's peak is its output,
  not its input plus its output. Each tensor keeps the file's dtype (BF16 as
  ml_dtypes.bfloat16, F8 as ml_dtypes float8; never upcast). Strict: a truncated file, a
  corrupt header, an unknown dtype or a tensor whose byte range does not fit its dtype and
  shape raises CheckpointError naming the file and the tensor."""
  path = _require_exists(path)
  if path.is_dir():
    raise CheckpointError(f"{path} is a folder, not a .safetensors file")
  header, base, size = _safetensors_header(path)
  data = np.memmap(path, dtype=np.uint8, mode="r") if size > base else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype, shape, start, end = _tensor_entry(path, name, info)
    if base + end > size:
      raise CheckpointError(
        f"{path}: truncated safetensors file: tensor {name} needs bytes up "
        f"to {base + end}, file has {size}"
      )
    count = (end - start) // dtype.itemsize
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=base + start) if count else None
    out[name] = np.zeros(shape, dtype) if arr is None else arr.reshape(shape)
  return out


def _safetensors_header(path: pathlib.Path) -> tuple[dict, int, int]:
  """(header dict, offset of the data, file size); CheckpointError when unreadable."""
  size = path.stat().st_size
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if 8 + header_len > size:
      raise CheckpointError(
        f"{path}: truncated safetensors file (header says {header_len} bytes, file has {size - 8})"
      )
    raw = f.read(header_len)
  try:
    header = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
  return header, 8 + header_len, size


def _tensor_entry(path, name: str, info) -> tuple[np.dtype, tuple[int, ...], int, int]:
  """(dtype, shape, start, end) of one header entry, checked against each other."""
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise CheckpointError(f"{path}: tensor {name}: corrupt header entry {info!r}")
  if info["dtype"] not in _ST_DTYPES:
    raise CheckpointError(
      f"{path}: tensor {name} has unsupported dtype {info['dtype']} "
      f"(supported: {', '.join(_ST_DTYPES)})"
    )
  dtype = np.dtype(_ST_DTYPES[info["dtype"]])
  shape, offsets = info["shape"], info["data_offsets"]
  if not (
    isinstance(shape, list)
    and all(isinstance(d, int) and d >= 0 for d in shape)
    and isinstance(offsets, list)
    and len(offsets) == 2
    and all(isinstance(o, int) for o in offsets)
    and 0 <= offsets[0] <= offsets[1]
  ):
    raise CheckpointError(
      f"{path}: tensor {name}: corrupt header entry (shape {shape}, data_offsets {offsets})"
    )
  start, end = offsets
  need = math.prod(shape) * dtype.itemsize
  if end - start != need:
    raise CheckpointError(
      f"{path}: tensor {name}: {info['dtype']} {tuple(shape)} needs {need} bytes, "
      f"its data_offsets give {end - start}"
    )
  return dtype, tuple(shape), start, end


def read_safetensors_index(index: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of every shard an `*.safetensors.index.json` lists (read_safetensors each);
  strict: a listed shard that is absent, or a tensor listed but in none of the shards."""
  index = pathlib.Path(index)
  weight_map = read_json(index, "safetensors index").get("weight_map")
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: no 'weight_map' object")
  shards = sorted(set(weight_map.values()))
  absent = [s for s in shards if not (index.parent / s).is_file()]
  if absent:
    raise FileNotFoundError(f"{index.parent}: shards listed in {index.name} are missing: {absent}")
  out = {}
  for shard in shards:
    out.update(read_safetensors(index.parent / shard))
  missing = sorted(set(weight_map) - set(out))
  if missing:
    raise CheckpointError(f"{index}: tensors listed but absent from shards: {missing[:10]}")
  return out


# ------------------------------------------------------------------- parameter trees


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """A nested mapping of parameters -> {'a/b/kernel': leaf}, leaves as they are (the keys
  of our params.safetensors files; every weights module uses this one)."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """Inverse of `flatten`: {'a/b/kernel': leaf} -> nested plain dicts."""
  tree: dict = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def write_safetensors(
  tensors: Mapping[str, np.ndarray],
  path: str | os.PathLike,
  metadata: Mapping[str, str] | None = None,
) -> None:
  from safetensors.numpy import save_file

  save_file(
    {k: np.ascontiguousarray(v) for k, v in tensors.items()},
    str(path),
    metadata=dict(metadata) if metadata else None,
  )


def read_safetensors_folder(
  folder: str | os.PathLike, stem: str = "diffusion_pytorch_model"
) -> dict[str, np.ndarray]:
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
      raise CheckpointError(
        f"{folder}: expected {stem}.safetensors or a sharded index; found "
        f"{[p.name for p in indices + singles] or 'no safetensors files'}"
      )
  if index.exists():
    return read_safetensors_index(index)
  return read_safetensors(single)


def write_safetensors_sharded(
  tensors: Mapping[str, np.ndarray],
  folder: pathlib.Path,
  stem: str,
  max_shard_bytes: int | None = None,
) -> None:
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
def atomic_output(
  path: str | os.PathLike, is_dir: bool, overwrite: bool = True
) -> Iterator[pathlib.Path]:
  """Yields a temporary path next to `path`; moves it into place only on success.

  An existing `path` is refused (FileExistsError, before anything is written) when
  `overwrite` is False; otherwise it is moved aside once the new output is complete, the new
  one renamed into place, and only then the old one deleted. Parent folders this creates
  are removed again on failure.
  """
  path = pathlib.Path(path)
  if not overwrite and (path.exists() or path.is_symlink()):
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
  created = []
  parent = path.parent
  while not parent.exists():
    created.append(parent)
    parent = parent.parent
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp_root = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  tmp = tmp_root / path.name
  if is_dir:
    tmp.mkdir()
  ok = False
  try:
    yield tmp
    if path.exists() or path.is_symlink():
      if not overwrite:
        raise FileExistsError(f"{path} appeared while it was written; left unchanged")
      old = tmp_root / f"{path.name}.replaced"
      os.replace(path, old)
      try:
        os.replace(tmp, path)
      except BaseException:
        os.replace(old, path)
        raise
    else:
      os.replace(tmp, path)
    ok = True
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
    if not ok:
      for d in created:  # innermost first
        with contextlib.suppress(OSError):
          d.rmdir()


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

  if path.is_dir():
    raise CheckpointError(f"{path} is a folder, not a .pth checkpoint file")
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    raise CheckpointError(
      f"{path}: refused to unpickle: it holds objects other than tensors and plain "
      f"containers, or is not a torch checkpoint ({_torch_reason(e)}); only "
      "weights-only checkpoints are read"
    ) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise CheckpointError(f"{path}: cannot read .pth checkpoint: {_torch_reason(e)}") from None


def _torch_reason(error: BaseException) -> str:
  """torch's loader error without its advice (never suggest weights_only=False)."""
  text = str(error)
  m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
  if m and m.group(1).strip():
    text = m.group(1)
  lines = [
    line.strip()
    for line in text.splitlines()
    if line.strip()
    and "weights_only" not in line
    and "arbitrary code" not in line
    and "file an issue" not in line.lower()
  ]
  return " ".join(lines)[:300] or type(error).__name__


def write_pth(obj, path: str | os.PathLike, overwrite: bool = True) -> None:
  import torch

  with atomic_output(path, is_dir=False, overwrite=overwrite) as tmp:
    torch.save(obj, str(tmp))


# ----------------------------------------------------------------- command-line helpers


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the description's layout; adds "(default: X)" to optional arguments whose help
  does not state its default."""

  def _get_help_string(self, action):
    text = action.help or ""
    if (
      action.option_strings
      and not action.required
      and "default" not in text
      and action.default is not argparse.SUPPRESS
    ):
      d = action.default
      shown = "none" if d is None else "off" if d is False else "on" if d is True else d
      if isinstance(shown, (list, tuple)):
        shown = " ".join(map(str, shown))
      text += f" (default: {shown})"
    return text


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose errors raise UsageError, so `main(argv)` reports them like every other
  refusal (`run_main`), and whose help states every option's default."""

  def __init__(self, **kwargs):
    kwargs.setdefault("formatter_class", _HelpFormatter)
    super().__init__(**kwargs)

  def error(self, message):
    raise UsageError(message)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
  """A JSON object from `path`; errors name the file (and the line of a syntax error)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such {what}")
  try:
    data = json.loads(path.read_text())
  except UnicodeDecodeError:
    raise CheckpointError(f"{path}: not a text {what}") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: malformed {what}: {e}") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: a {what} must hold a JSON object, holds {type(data).__name__}")
  return data


def check_safetensors(path: str | os.PathLike) -> None:
  """Reads only the header: raises CheckpointError (as `read_safetensors` would) for a
  corrupt or truncated file, an unknown dtype or an entry whose bytes do not fit it."""
  path = _require_exists(path)
  header, base, size = _safetensors_header(path)
  ends = [
    _tensor_entry(path, name, info)[3] for name, info in header.items() if name != "__metadata__"
  ]
  if ends and base + max(ends) > size:
    raise CheckpointError(
      f"{path}: truncated safetensors file: tensors need {base + max(ends)} bytes, file has {size}"
    )


def check_output(
  path: str | os.PathLike, *, overwrite: bool, is_dir: bool, flag: str = "--dst"
) -> pathlib.Path:
  """Refuses (UsageError) an output that exists without --overwrite, one of the wrong kind
  (a file where a folder is written, or the reverse), or one that cannot be created."""
  path = pathlib.Path(path)
  kind = "folder" if is_dir else "file"
  if path.exists() or path.is_symlink():
    if not overwrite:
      raise UsageError(
        f"{flag} {path} exists; pass --overwrite to replace it (replaced "
        "only once the new output is complete)"
      )
    if path.is_dir() != is_dir:
      raise UsageError(
        f"{flag} {path} is a {'folder' if path.is_dir() else 'file'}; this "
        f"command writes a {kind} there (even --overwrite does not replace "
        "one with the other)"
      )
  parent = path.parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
  try:  # os.access says yes to root everywhere: probe with an empty folder, removed at once
    os.rmdir(tempfile.mkdtemp(prefix=".probe.", dir=parent))
  except OSError as e:
    raise UsageError(f"{flag} {path}: cannot write in {parent} ({e.strerror})") from None
  return path


def check_not_source(dst: str | os.PathLike, src: str | os.PathLike, flag: str = "--dst") -> None:
  """Refuses an output that is the source or holds it (replacing it would delete it)."""
  dst, src = pathlib.Path(dst).resolve(), pathlib.Path(src).resolve()
  if dst == src or dst in src.parents:
    raise UsageError(f"{flag} {dst} is or holds the source {src}; write to a new path")


REFUSALS = (UsageError, CheckpointError, ValueError, OSError)


def run_main(body: Callable[[Sequence[str]], int], argv: Sequence[str] | None) -> int:
  """Runs a command's body; a refusal (REFUSALS) prints `error: ...` (one line: a
  multi-line message is joined with '; ') and returns 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return body(argv)
  except REFUSALS as e:
    parts = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = "; ".join(p.rstrip(":") if i < len(parts) - 1 else p for i, p in enumerate(parts))
    print(f"error: {message or type(e).__name__}", file=sys.stderr)
    return 2
