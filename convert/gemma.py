"""Convert a transformers Gemma-2 checkpoint folder to sana_jax's format.

    python convert/gemma.py --src /path/to/gemma-2-2b-it --dst /path/to/gemma2_jax
    python convert/gemma.py --src ... --dst ... --dtype bfloat16 --tokenizer

--src: a folder written by `Gemma2Model` / `Gemma2ForCausalLM.save_pretrained`
(config.json + model.safetensors or sharded with model.safetensors.index.json).
--dst receives params.safetensors + config.json (see sana_jax.weights.gemma.save_params);
with --tokenizer, the tokenizer files of --src are copied into --dst/tokenizer too.
Loading is strict: a mismatching checkpoint stops with the list of offending tensors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from sana_jax.weights import gemma  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--src", required=True, help="transformers Gemma-2 folder")
    ap.add_argument("--dst", required=True, help="output folder (sana_jax format)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="storage dtype of the converted parameters")
    ap.add_argument("--tokenizer", action="store_true",
                    help="also copy the tokenizer files into DST/tokenizer")
    args = ap.parse_args(argv)

    if args.dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    else:
        dtype = np.float32
    params, config = gemma.load_hf_folder(args.src, dtype=dtype)
    import dataclasses
    config = dataclasses.replace(config, param_dtype=args.dtype)
    gemma.save_params(params, config, args.dst)
    n = sum(int(np.prod(s)) for s in gemma.param_shapes(config).values())
    print(f"wrote {args.dst}: {n:,} parameters ({args.dtype}), "
          f"{config.num_layers} layers, hidden {config.hidden_size}")
    if args.tokenizer:
        tok_dir = os.path.join(args.dst, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(args.src, f))]
        if not copied:
            raise FileNotFoundError(f"no tokenizer files {TOKENIZER_FILES} in {args.src!r}")
        for f in copied:
            shutil.copy2(os.path.join(args.src, f), tok_dir)
        print(f"copied tokenizer files {copied} to {tok_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
