"""A sana_jax model folder from a diffusers SanaPipeline folder.

  sana-convert bundle --src Sana_600M_512px_diffusers --out MODEL
  sana-convert bundle --src SRC --out MODEL --settings_only

SRC is what `diffusers.SanaPipeline.save_pretrained` writes (model_index.json, scheduler/,
text_encoder/, tokenizer/, transformer/, vae/). Each part goes through the existing
converters (the same functions as `sana-convert dit`, `gemma`, `dcae`: sana_jax/convert/):

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
see docs/sampling.md). Every argument and every part's config is checked before any
tensor is read (bad input: `error: ...`, exit status 2). The folder is built next to OUT
and renamed into place at the end, so a failure leaves nothing half-written; an existing
OUT (with --settings_only: OUT/pipeline.json) is refused unless --overwrite, and then
replaced only once the new one is complete.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

from sana_jax import bundle
from sana_jax.models.prompts import COMPLEX_HUMAN_INSTRUCTION

# diffusers' SanaPipeline default `complex_human_instruction`: the official text with
# 'Enhanced prompt' in single quotes.
DIFFUSERS_CHI: tuple[str, ...] = tuple(
  line.replace('"Enhanced prompt"', "'Enhanced prompt'") for line in COMPLEX_HUMAN_INSTRUCTION
)

PARTS = ("transformer", "text_encoder", "tokenizer", "vae")


def _read_json(path: pathlib.Path) -> dict:
  from sana_jax.weights import io

  if not path.is_file():
    raise FileNotFoundError(f"{path} not found (a diffusers SanaPipeline folder is expected)")
  return io.read_json(path, path.name)


def check_source(src: pathlib.Path) -> None:
  """FileNotFoundError naming every missing part of a diffusers SanaPipeline folder."""
  if not src.is_dir():
    raise FileNotFoundError(f"no such folder: {src}")
  missing = [p for p in PARTS if not (src / p).is_dir()]
  if not (src / "scheduler" / "scheduler_config.json").is_file():
    missing.append("scheduler/scheduler_config.json")
  if missing:
    raise FileNotFoundError(f"{src} is not a diffusers SanaPipeline folder; missing: {missing}")


def check_parts(src: pathlib.Path, max_length: int = 300) -> None:
  """Every part's config parses and fits, and its weight files are whole (headers only):
  ValueError / FileNotFoundError naming the file, before any tensor is read."""
  from sana_jax.weights import dcae
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import gemma, io

  check_source(src)
  sampler_settings(_read_json(src / "scheduler" / "scheduler_config.json"))
  tcfg_file = src / "transformer" / "config.json"
  try:
    dit_weights.from_diffusers_config(_read_json(tcfg_file), caption_len=max_length)
  except (KeyError, TypeError) as e:
    raise ValueError(
      f"{tcfg_file}: not a SanaTransformer2DModel config: {type(e).__name__}: {e}"
    ) from None
  gcfg_file = src / "text_encoder" / "config.json"
  try:
    gemma.config_from_hf(_read_json(gcfg_file))
  except (KeyError, TypeError) as e:
    raise ValueError(f"{gcfg_file}: not a Gemma-2 config: {type(e).__name__}: {e}") from None
  vcfg_file = src / "vae" / "config.json"
  try:
    dcae.config_from_folder(src / "vae")
  except (KeyError, TypeError) as e:
    raise ValueError(f"{vcfg_file}: not an AutoencoderDC config: {type(e).__name__}: {e}") from None
  _vae_downsample(_read_json(vcfg_file))
  for part in ("transformer", "text_encoder", "vae"):
    files = sorted((src / part).glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{src / part}: no *.safetensors weights")
    for f in files:
      io.check_safetensors(f)


def _vae_downsample(vcfg: dict) -> int:
  channels = vcfg.get("encoder_block_out_channels") or vcfg.get("block_out_channels")
  if not channels:
    raise ValueError("vae/config.json has no encoder_block_out_channels / block_out_channels")
  return 2 ** (len(channels) - 1)


def sampler_settings(
  scheduler_config: dict, steps: int = 20, guidance_scale: float = 4.5
) -> tuple[dict, float]:
  """(pipeline.json "sampler", flow shift) for a diffusers flow scheduler config."""
  cls = scheduler_config.get("_class_name")
  if cls == "DPMSolverMultistepScheduler":
    if (
      not scheduler_config.get("use_flow_sigmas")
      or scheduler_config.get("prediction_type") != "flow_prediction"
    ):
      raise ValueError(
        "DPMSolverMultistepScheduler must have use_flow_sigmas=True and "
        f"prediction_type='flow_prediction' (SANA), got {scheduler_config}"
      )
    if (
      scheduler_config.get("solver_order", 2) != 2
      or scheduler_config.get("algorithm_type", "dpmsolver++") != "dpmsolver++"
    ):
      raise ValueError("only 2nd-order dpmsolver++ is implemented (SANA's Flow DPM-Solver)")
    name, shift = "dpm_solver", float(scheduler_config.get("flow_shift", 1.0))
  elif cls == "FlowMatchEulerDiscreteScheduler":
    if scheduler_config.get("use_dynamic_shifting"):
      raise ValueError("FlowMatchEulerDiscreteScheduler with dynamic shifting is not supported")
    name, shift = "euler", float(scheduler_config.get("shift", 1.0))
  else:
    raise ValueError(
      f"scheduler {cls!r} is not supported (DPMSolverMultistepScheduler with "
      "flow sigmas, or FlowMatchEulerDiscreteScheduler)"
    )
  return {
    "name": name,
    "steps": steps,
    "guidance_scale": guidance_scale,
    "use_null_mask": True,
  }, shift


def pipeline_settings(src: pathlib.Path, max_length: int = 300) -> dict:
  """pipeline.json fields from SRC's scheduler, transformer and vae configs."""
  sched = _read_json(src / "scheduler" / "scheduler_config.json")
  tcfg = _read_json(src / "transformer" / "config.json")
  vcfg = _read_json(src / "vae" / "config.json")
  sampler, shift = sampler_settings(sched)
  image_size = int(tcfg.get("sample_size", 32)) * _vae_downsample(vcfg)
  prompt = {
    "max_length": max_length,
    "chi": list(DIFFUSERS_CHI),
    "lowercase": True,
    "null_prompt": "",
  }
  return dict(
    image_size=image_size,
    flow_shift=shift,
    sampler=sampler,
    prompt=prompt,
    autoencoder={"kind": "dcae"},
  )


def write_pipeline_json(
  src: pathlib.Path, out: pathlib.Path, max_length: int = 300, overwrite: bool = True
) -> dict:
  """pipeline.json for `out` from SRC's scheduler, transformer and vae configs."""
  bundle.write_settings(out, overwrite=overwrite, **pipeline_settings(src, max_length))
  return json.loads((out / bundle.PIPELINE_FILE).read_text())


def convert(
  src: str | pathlib.Path,
  out: str | pathlib.Path,
  text_encoder_dtype: str = "float32",
  max_length: int = 300,
  settings_only: bool = False,
  overwrite: bool = False,
) -> pathlib.Path:
  """Builds the model folder `out` from the diffusers SanaPipeline folder `src`.

  Everything is checked first (`check_parts`); an existing `out` (with settings_only:
  `out/pipeline.json`) raises FileExistsError unless `overwrite`, and is then replaced
  only once the new one is complete.
  """
  import numpy as np

  from sana_jax.weights import dcae
  from sana_jax.weights import dit as dit_weights
  from sana_jax.weights import gemma, io

  src, out = pathlib.Path(src), pathlib.Path(out)
  if text_encoder_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"text_encoder_dtype must be float32 or bfloat16, got {text_encoder_dtype!r}")
  if not isinstance(max_length, int) or max_length < 1:
    raise ValueError(f"max_length must be a positive number of caption tokens, got {max_length!r}")
  check_source(src)
  settings = pipeline_settings(src, max_length)
  if settings_only:
    if not overwrite and (out / bundle.PIPELINE_FILE).exists():
      raise FileExistsError(f"{out / bundle.PIPELINE_FILE} exists; pass --overwrite to replace it")
    bundle.write_settings(out, overwrite=overwrite, **settings)
    return out
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out} exists; choose a new output folder or pass --overwrite")
  check_parts(src, max_length)
  with io.atomic_output(out, is_dir=True, overwrite=overwrite) as tmp:
    cfg = dit_weights.from_diffusers_config(
      _read_json(src / "transformer" / "config.json"), caption_len=max_length
    )  # not in diffusers' json
    params, cfg = dit_weights.load_diffusers(src / "transformer", cfg)
    dit_weights.save_flax(tmp / "transformer", params, cfg)
    del params
    if text_encoder_dtype == "bfloat16":
      import ml_dtypes

      dtype = ml_dtypes.bfloat16
    else:
      dtype = np.float32
    import dataclasses

    tparams, tcfg = gemma.load_hf_folder(str(src / "text_encoder"), dtype=dtype)
    tcfg = dataclasses.replace(tcfg, param_dtype=text_encoder_dtype)
    gemma.save_params(tparams, tcfg, str(tmp / "text_encoder"))
    del tparams
    shutil.copytree(src / "tokenizer", tmp / "tokenizer")
    _, vparams, vcfg = dcae.load_autoencoder(src / "vae")
    dcae.save_params(vparams, vcfg, tmp / "vae")
    bundle.write_settings(tmp, **settings)
    bundle.check_folder(tmp)
  return out


def build_parser():
  from sana_jax.weights import io

  ap = io.ArgumentParser(prog="sana-convert bundle", description=__doc__)
  ap.add_argument(
    "--src",
    required=True,
    type=pathlib.Path,
    help="required: diffusers SanaPipeline folder (save_pretrained output)",
  )
  ap.add_argument(
    "--out",
    required=True,
    type=pathlib.Path,
    help="required: new model folder (with --settings_only: the folder that "
    "receives pipeline.json)",
  )
  ap.add_argument(
    "--text_encoder_dtype",
    default="float32",
    choices=("float32", "bfloat16"),
    help="storage dtype of the converted Gemma-2 parameters",
  )
  ap.add_argument("--max_length", type=int, default=300, help="caption tokens kept (positive)")
  ap.add_argument(
    "--settings_only",
    action="store_true",
    help="only write OUT/pipeline.json (parts converted separately)",
  )
  ap.add_argument(
    "--overwrite",
    action="store_true",
    help="replace an existing OUT (OUT/pipeline.json with --settings_only), "
    "only once the new one is complete",
  )
  return ap


def _main(argv) -> int:
  from sana_jax.weights import io

  args = build_parser().parse_args(argv)
  if args.max_length < 1:
    raise io.UsageError(f"--max_length {args.max_length}: a positive number of caption tokens")
  src, out = args.src, args.out
  if not src.is_dir():
    raise io.UsageError(f"--src {src}: no such folder (a diffusers SanaPipeline folder)")
  check_source(src)
  if args.settings_only:
    if out.exists() and not out.is_dir():
      raise io.UsageError(f"--out {out} is a file; --settings_only writes OUT/pipeline.json")
    io.check_output(
      out / bundle.PIPELINE_FILE, overwrite=args.overwrite, is_dir=False, flag="--out"
    )
    pipeline_settings(src, args.max_length)
  else:
    io.check_not_source(out, src, "--out")
    io.check_output(out, overwrite=args.overwrite, is_dir=True, flag="--out")
    check_parts(src, args.max_length)
  out = convert(
    src, out, args.text_encoder_dtype, args.max_length, args.settings_only, overwrite=args.overwrite
  )
  what = bundle.PIPELINE_FILE if args.settings_only else "model folder"
  print(f"wrote {what} to {out}")
  return 0


def main(argv=None) -> int:
  """The command; returns its exit status (2, with `error: ...` on stderr, for bad input)."""
  from sana_jax.weights import io

  return io.run_main(_main, argv)


if __name__ == "__main__":
  sys.exit(main())
