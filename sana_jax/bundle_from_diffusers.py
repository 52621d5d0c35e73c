"""A sana_jax model folder from a diffusers SanaPipeline folder.

  python -m sana_jax.bundle_from_diffusers --src Sana_600M_512px_diffusers --out MODEL
  python -m sana_jax.bundle_from_diffusers --src SRC --out MODEL --settings_only

SRC is what `diffusers.SanaPipeline.save_pretrained` writes (model_index.json, scheduler/,
text_encoder/, tokenizer/, transformer/, vae/). Each part goes through the existing
converters (the same functions as `convert/dit.py`, `convert/gemma.py`, `convert/dcae.py`):

  transformer/  SanaTransformer2DModel -> sana_jax.weights.dit.save_flax; the DiT config
                gets diffusers' numerics (DiTConfig.diffusers_compatible: no timestep
                flooring, additive -10000 cross-attention mask, eps 1e-15 / 1e-5).
  text_encoder/ Gemma2Model -> sana_jax.weights.gemma.save_params (--text_encoder_dtype).
  tokenizer/    copied as is.
  vae/          AutoencoderDC -> sana_jax.weights.dcae.save_params.
  pipeline.json diffusers' SanaPipeline defaults: its CHI text (single quotes around
                'Enhanced prompt'), lower-cased prompts, 300 caption tokens, the negative
                prompt's own mask for the null half (use_null_mask), 20 steps, CFG 4.5,
                flow shift and solver from scheduler/scheduler_config.json, image size =
                transformer sample_size x the autoencoder's downsampling.

With --settings_only only pipeline.json is written (after converting the parts by hand,
see docs/sampling.md). The folder is built next to OUT and renamed into place at the end,
so a failure leaves nothing half-written; an existing OUT is refused.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile

from sana_jax import bundle
from sana_jax.models.prompts import COMPLEX_HUMAN_INSTRUCTION

# diffusers' SanaPipeline default `complex_human_instruction`: the official text with
# 'Enhanced prompt' in single quotes.
DIFFUSERS_CHI: tuple[str, ...] = tuple(
    line.replace('"Enhanced prompt"', "'Enhanced prompt'") for line in COMPLEX_HUMAN_INSTRUCTION)

PARTS = ("transformer", "text_encoder", "tokenizer", "vae")


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found (a diffusers SanaPipeline folder is expected)")
  return json.loads(path.read_text())


def check_source(src: pathlib.Path) -> None:
  """FileNotFoundError naming every missing part of a diffusers SanaPipeline folder."""
  if not src.is_dir():
    raise FileNotFoundError(f"no such folder: {src}")
  missing = [p for p in PARTS if not (src / p).is_dir()]
  if not (src / "scheduler" / "scheduler_config.json").is_file():
    missing.append("scheduler/scheduler_config.json")
  if missing:
    raise FileNotFoundError(f"{src} is not a diffusers SanaPipeline folder; missing: {missing}")


def sampler_settings(scheduler_config: dict, steps: int = 20,
                     guidance_scale: float = 4.5) -> tuple[dict, float]:
  """(pipeline.json "sampler", flow shift) for a diffusers flow scheduler config."""
  cls = scheduler_config.get("_class_name")
  if cls == "DPMSolverMultistepScheduler":
    if not scheduler_config.get("use_flow_sigmas") or \
        scheduler_config.get("prediction_type") != "flow_prediction":
      raise ValueError("DPMSolverMultistepScheduler must have use_flow_sigmas=True and "
                       f"prediction_type='flow_prediction' (SANA), got {scheduler_config}")
    if scheduler_config.get("solver_order", 2) != 2 or \
        scheduler_config.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
      raise ValueError("only 2nd-order dpmsolver++ is implemented (SANA's Flow DPM-Solver)")
    name, shift = "dpm_solver", float(scheduler_config.get("flow_shift", 1.0))
  elif cls == "FlowMatchEulerDiscreteScheduler":
    if scheduler_config.get("use_dynamic_shifting"):
      raise ValueError("FlowMatchEulerDiscreteScheduler with dynamic shifting is not supported")
    name, shift = "euler", float(scheduler_config.get("shift", 1.0))
  else:
    raise ValueError(f"scheduler {cls!r} is not supported (DPMSolverMultistepScheduler with "
                     "flow sigmas, or FlowMatchEulerDiscreteScheduler)")
  return {"name": name, "steps": steps, "guidance_scale": guidance_scale,
          "use_null_mask": True}, shift


def write_pipeline_json(src: pathlib.Path, out: pathlib.Path, max_length: int = 300) -> dict:
  """pipeline.json for `out` from SRC's scheduler, transformer and vae configs."""
  sched = _read_json(src / "scheduler" / "scheduler_config.json")
  tcfg = _read_json(src / "transformer" / "config.json")
  vcfg = _read_json(src / "vae" / "config.json")
  channels = vcfg.get("encoder_block_out_channels") or vcfg.get("block_out_channels")
  downsample = 2 ** (len(channels) - 1)
  sampler, shift = sampler_settings(sched)
  image_size = int(tcfg.get("sample_size", 32)) * downsample
  prompt = {"max_length": max_length, "chi": list(DIFFUSERS_CHI), "lowercase": True,
            "null_prompt": ""}
  bundle.write_settings(out, image_size=image_size, flow_shift=shift, sampler=sampler,
                        prompt=prompt, autoencoder={"kind": "dcae"})
  return json.loads((out / bundle.PIPELINE_FILE).read_text())


def convert(src: str | pathlib.Path, out: str | pathlib.Path, text_encoder_dtype: str = "float32",
            max_length: int = 300, settings_only: bool = False) -> pathlib.Path:
  """Builds the model folder `out` from the diffusers SanaPipeline folder `src`."""
  import numpy as np

  from sana_jax.weights import dcae
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import gemma

  src, out = pathlib.Path(src), pathlib.Path(out)
  check_source(src)
  if settings_only:
    write_pipeline_json(src, out, max_length)
    return out
  if out.exists():
    raise FileExistsError(f"{out} exists; choose a new output folder")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    cfg = dit_weights.from_diffusers_config(_read_json(src / "transformer" / "config.json"),
                                            caption_len=max_length)  # not in diffusers' json
    params, cfg = dit_weights.load_diffusers(src / "transformer", cfg)
    dit_weights.save_flax(tmp / "transformer", params, cfg)
    del params
    if text_encoder_dtype == "bfloat16":
      import ml_dtypes
      dtype = ml_dtypes.bfloat16
    elif text_encoder_dtype == "float32":
      dtype = np.float32
    else:
      raise ValueError(f"text_encoder_dtype must be float32 or bfloat16, got "
                       f"{text_encoder_dtype!r}")
    import dataclasses
    tparams, tcfg = gemma.load_hf_folder(str(src / "text_encoder"), dtype=dtype)
    tcfg = dataclasses.replace(tcfg, param_dtype=text_encoder_dtype)
    gemma.save_params(tparams, tcfg, str(tmp / "text_encoder"))
    del tparams
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    _, vparams, vcfg = dcae.load_autoencoder(src / "vae")
    dcae.save_params(vparams, vcfg, tmp / "vae")
    write_pipeline_json(src, tmp, max_length)
    bundle.check_folder(tmp)
    tmp.rename(out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--src", required=True, type=pathlib.Path,
                  help="diffusers SanaPipeline folder (save_pretrained output)")
  ap.add_argument("--out", required=True, type=pathlib.Path, help="new model folder")
  ap.add_argument("--text_encoder_dtype", default="float32", choices=("float32", "bfloat16"),
                  help="storage dtype of the converted Gemma-2 parameters")
  ap.add_argument("--max_length", type=int, default=300, help="caption tokens kept")
  ap.add_argument("--settings_only", action="store_true",
                  help="only write OUT/pipeline.json (parts converted separately)")
  args = ap.parse_args(argv)
  out = convert(args.src, args.out, args.text_encoder_dtype, args.max_length, args.settings_only)
  what = bundle.PIPELINE_FILE if args.settings_only else "model folder"
  print(f"wrote {what} to {out}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
