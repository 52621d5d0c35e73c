"""Loading ml_collections config files with command-line overrides.

`load_config("configs/tiny.py", ["model.depth=4", "flow_shift=6.0"])` imports the file,
calls its get_config() and applies each override with the type of the existing field
(so a typo or a wrong type is an error, not a new field).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
from typing import Sequence

import ml_collections


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  path_obj = pathlib.Path(path)
  if not path_obj.exists():
    raise FileNotFoundError(f"no such config file: {path}")
  repo_root = path_obj.resolve().parent.parent
  if str(repo_root) not in sys.path:  # so `from configs import common` works
    sys.path.insert(0, str(repo_root))
  spec = importlib.util.spec_from_file_location(f"_sana_config_{path_obj.stem}", path_obj)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config()")
  config = module.get_config()
  apply_overrides(config, overrides)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  for item in overrides:
    item = item.removeprefix("--").removeprefix("config.")
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        raise ValueError(f"unknown config field {key!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"unknown config field {key!r}")
    old = node[leaf]
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    if isinstance(old, bool) and not isinstance(value, bool):
      raise ValueError(f"{key} is a bool, got {raw!r}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if old is not None and not isinstance(value, type(old)):
      raise ValueError(f"{key} is a {type(old).__name__}, got {raw!r}")
    node[leaf] = value


def split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Separates `--config.a.b=v` overrides from the other arguments."""
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  return rest, overrides
