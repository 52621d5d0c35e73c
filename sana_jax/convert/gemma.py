"""Convert a transformers Gemma-2 checkpoint folder to sana_jax's format.

    python convert/gemma.py --src /path/to/gemma-2-2b-it --dst /path/to/gemma2_jax
    sana-convert gemma --src ... --dst ... --dtype bfloat16 --tokenizer

--src: a folder written by `Gemma2Model` / `Gemma2ForCausalLM.save_pretrained`
(config.json + model.safetensors or sharded with model.safetensors.index.json).
--dst receives params.safetensors + config.json (see sana_jax.weights.gemma.save_params);
with --tokenizer, the tokenizer files of --src are copied into --dst/tokenizer too.
Loading is strict: a mismatching checkpoint stops with the list of offending tensors.
Every argument is checked before anything is loaded (bad input: `error: ...`, exit status
2); the output is built next to --dst and renamed into place when complete, and an
existing --dst is refused unless --overwrite.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import sys

import numpy as np

from sana_jax.weights import gemma
from sana_jax.weights import io
from sana_jax.weights.io import CheckpointError, UsageError

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "special_tokens_map.json",
)


def build_parser() -> io.ArgumentParser:
  ap = io.ArgumentParser(prog="sana-convert gemma", description=__doc__)
  ap.add_argument(
    "--src", required=True, help="required: transformers Gemma-2 folder (config.json + safetensors)"
  )
  ap.add_argument("--dst", required=True, help="required: new output folder (sana_jax format)")
  ap.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="storage dtype of the converted parameters",
  )
  ap.add_argument(
    "--tokenizer",
    action="store_true",
    help="also copy the tokenizer files of --src into DST/tokenizer",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing --dst (only once the new output is complete)",
  )
  return ap


def check_source(src: pathlib.Path, tokenizer: bool) -> tuple[gemma.Gemma2Config, list[str]]:
  """The source's config and tokenizer files, checked without reading any tensor."""
  if not src.exists():
    raise UsageError(f"--src {src}: no such folder")
  if not src.is_dir():
    raise UsageError(f"--src {src}: a transformers Gemma-2 folder is expected, not a file")
  hf = io.read_json(src / "config.json", "config.json")
  try:
    config = gemma.config_from_hf(hf)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(f"{src / 'config.json'}: not a supported Gemma-2 config: {e}") from None
  index = src / "model.safetensors.index.json"
  if index.is_file():
    weight_map = io.read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: no 'weight_map' object")
    files = sorted({src / f for f in weight_map.values()})
  elif (src / "model.safetensors").is_file():
    files = [src / "model.safetensors"]
  else:
    raise CheckpointError(
      f"--src {src} holds neither model.safetensors nor "
      f"model.safetensors.index.json (files: {sorted(os.listdir(src))[:20]})"
    )
  missing = [f.name for f in files if not f.is_file()]
  if missing:
    raise CheckpointError(f"{index}: shards listed in the index are missing: {missing}")
  for f in files:
    io.check_safetensors(f)
  copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
  if tokenizer and not copied:
    raise UsageError(f"--tokenizer: no tokenizer files {TOKENIZER_FILES} in --src {src}")
  return config, copied


def _main(argv: list[str]) -> int:
  args = build_parser().parse_args(argv)
  src, dst = pathlib.Path(args.src), pathlib.Path(args.dst)
  check_source(src, args.tokenizer)
  io.check_not_source(dst, src)
  io.check_output(dst, overwrite=args.overwrite, is_dir=True)

  if args.dtype == "bfloat16":
    import ml_dtypes

    dtype = ml_dtypes.bfloat16
  else:
    dtype = np.float32
  params, config = gemma.load_hf_folder(str(src), dtype=dtype)
  config = dataclasses.replace(config, param_dtype=args.dtype)
  n = sum(int(np.prod(s)) for s in gemma.param_shapes(config).values())
  with io.atomic_output(dst, is_dir=True, overwrite=args.overwrite) as tmp:
    gemma.save_params(params, config, str(tmp))
    copied = []
    if args.tokenizer:
      tok_dir = tmp / "tokenizer"
      tok_dir.mkdir()
      copied = [f for f in TOKENIZER_FILES if (src / f).is_file()]
      for f in copied:
        shutil.copy2(src / f, tok_dir)
  print(
    f"wrote {dst}: {n:,} parameters ({args.dtype}), "
    f"{config.num_layers} layers, hidden {config.hidden_size}"
  )
  if copied:
    print(f"copied tokenizer files {copied} to {dst / 'tokenizer'}")
  return 0


def main(argv=None) -> int:
  """The command; returns its exit status (2, with `error: ...` on stderr, for bad input)."""
  return io.run_main(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
