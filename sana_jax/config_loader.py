"""Loading ml_collections config files with command-line overrides.

`load_config("configs/tiny.py", ["model.depth=4", "flow_shift=6.0"])` imports the file,
calls its get_config() and applies each override with the type of the existing field
(so a typo or a wrong type is an error, not a new field). A bare name (`"tiny"`,
`"shapes"`) is one of the configs installed with the package (sana_jax/configs/NAME.py),
so `sana-train --config shapes` works from any folder.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
from typing import Sequence

import ml_collections


PACKAGED = pathlib.Path(__file__).resolve().parent / "configs"


def packaged_config_names() -> list[str]:
  """Names of the configs in sana_jax/configs/ (`load_config(name)` loads one)."""
  return sorted(p.stem for p in PACKAGED.glob("*.py") if p.stem not in ("__init__", "common"))


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The ConfigDict of `path` (a .py file with get_config(), or a packaged config's name)
  with `overrides` ("FIELD=VALUE") applied. FileNotFoundError names a missing file or an
  unknown name (with the known ones); ValueError a file that cannot be loaded or a bad
  override."""
  path_obj = pathlib.Path(path)
  if path_obj.suffix == "" and path_obj.name == path:  # a bare name: a packaged config
    names = packaged_config_names()
    if path not in names:
      raise FileNotFoundError(
        f"no such config: {path!r} is neither a file nor a packaged config "
        f"(packaged: {', '.join(names)})"
      )
    path_obj = PACKAGED / f"{path}.py"
  if not path_obj.exists():
    raise FileNotFoundError(f"no such config file: {path}")
  if not path_obj.is_file() or path_obj.suffix != ".py":
    raise ValueError(f"config {path}: must be a Python file (configs/*.py) with get_config()")
  repo_root = path_obj.resolve().parent.parent
  if str(repo_root) not in sys.path:  # so a checkout's `from configs import common` works
    sys.path.insert(0, str(repo_root))
  spec = importlib.util.spec_from_file_location(f"_sana_config_{path_obj.stem}", path_obj)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - a user's file: name it, no traceback
    raise ValueError(f"config {path} could not be loaded: {type(e).__name__}: {e}") from e
  if not callable(getattr(module, "get_config", None)):
    raise ValueError(f"{path} has no get_config()")
  config = module.get_config()
  if not isinstance(config, ml_collections.ConfigDict):
    raise ValueError(
      f"{path}: get_config() returned a {type(config).__name__}, not an ml_collections.ConfigDict"
    )
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for item in overrides:
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
      raise ValueError(f"override --config.{item} is not of the form --config.FIELD=VALUE")
    key, raw = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if not isinstance(node, ml_collections.ConfigDict) or p not in node:
        raise ValueError(
          f"unknown config field {key!r} (in --config.{item}); known fields there: {_known(node)}"
        )
      node = node[p]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      raise ValueError(
        f"unknown config field {key!r} (in --config.{item}); known fields there: {_known(node)}"
      )
    old = node[leaf]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(old, ml_collections.ConfigDict):
      raise ValueError(
        f"{key} is a section, not a field (in --config.{item}); its fields: {_known(old)}"
      )
    if isinstance(old, bool) and not isinstance(value, bool):
      raise ValueError(f"{key} is a bool, got {raw!r} (allowed: True or False)")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if old is not None and (
      not isinstance(value, type(old)) or (isinstance(value, bool) and not isinstance(old, bool))
    ):
      raise ValueError(f"{key} is a {type(old).__name__} (now {old!r}), got {raw!r}")
    node[leaf] = value


def _known(node) -> str:
  if not isinstance(node, ml_collections.ConfigDict):
    return "(none: not a section)"
  names = sorted(node.keys())
  return ", ".join(names[:30]) + (", ..." if len(names) > 30 else "")


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides from the other arguments."""
  overrides = [a[len("--config.") :] for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides
