"""Prompt-to-image: a tiny random diffusers SanaPipeline converted to our model folder gives
the same image; pipeline properties (per-image seeds, device sharding, binning, K/V cache).

The diffusers side is a real `SanaPipeline` (tiny random Gemma2Model text encoder with a
word-level tokenizer built here, tiny SanaTransformer2DModel, tiny AutoencoderDC,
DPMSolverMultistepScheduler with flow sigmas) saved with `save_pretrained` and converted
by `sana_jax.bundle_from_diffusers`. Every dimension differs from the others: Gemma hidden
36, DiT hidden 48, cross-attention 4 x 10, latent channels 6, DC-AE f8 with stage widths
(12, 24, 48, 48), patch 2, images 64 x 96, 24 caption tokens.
"""

import inspect
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sana_jax import bundle as bundle_lib  # noqa: E402
from sana_jax import bundle_from_diffusers as bfd  # noqa: E402
from sana_jax import pipeline as pipeline_lib  # noqa: E402
from sana_jax.data.tokenizer import build_word_level_tokenizer, words_of  # noqa: E402
from sana_jax.models.dit_config import DiTConfig  # noqa: E402
from sana_jax.pipeline import SamplingOptions, SanaPipeline  # noqa: E402
from tests import dit_reference  # noqa: E402
from tests.test_sample_cli import write_pixel_model  # noqa: E402

DIFFUSERS_CHI = tuple(
  inspect.signature(diffusers.SanaPipeline.__call__).parameters["complex_human_instruction"].default
)
PROMPTS = ["A Red CIRCLE left of a blue square", "  a green triangle above a yellow star  "]
MAX_LEN = 24
H, W, STEPS, CFG = 64, 96, 6, 4.5
LATENT_C = 6

DIT = DiTConfig(
  in_channels=LATENT_C,
  out_channels=LATENT_C,
  patch_size=2,
  hidden_size=48,
  depth=2,
  self_head_dim=8,
  cross_heads=4,
  cross_head_dim=10,
  caption_channels=36,
  caption_len=MAX_LEN,
  mlp_ratio=2.5,
  sample_size=8,
  qk_norm=True,
  cross_norm=True,
).diffusers_compatible()
DCAE = dict(
  in_channels=3,
  latent_channels=LATENT_C,
  attention_head_dim=8,
  encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  encoder_block_out_channels=[12, 24, 48, 48],
  decoder_block_out_channels=[12, 24, 48, 48],
  encoder_layers_per_block=[1, 1, 1, 1],
  decoder_layers_per_block=[1, 1, 1, 1],
  encoder_qkv_multiscales=[[], [], [3], [5]],
  decoder_qkv_multiscales=[[], [], [5], [3]],
  upsample_block_type="interpolate",
  downsample_block_type="Conv",
  scaling_factor=0.6,
)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _tiny_diffusers_pipeline(folder):
  """A random tiny diffusers SanaPipeline (fp32), also saved to `folder`."""
  from transformers import Gemma2Config, Gemma2Model

  vocab = words_of(list(DIFFUSERS_CHI) + [p.lower() for p in PROMPTS])
  tok = build_word_level_tokenizer(vocab[:-2], str(folder / "_tok"))  # 2 words stay <unk>
  gcfg = Gemma2Config(
    vocab_size=len(tok) + 3,
    hidden_size=36,
    intermediate_size=52,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    sliding_window=9,
    query_pre_attn_scalar=12,
    attn_logit_softcapping=5.0,
  )
  gcfg._attn_implementation = "eager"
  torch.manual_seed(0)
  text_encoder = Gemma2Model(gcfg).eval()
  with torch.no_grad():
    for name, p in text_encoder.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.2)
  transformer = dit_reference.diffusers_model(DIT, seed=1)
  torch.manual_seed(2)
  vae = diffusers.AutoencoderDC(**DCAE).eval()
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():  # non-trivial norm weights; a conv_out scale that keeps most
    for name, p in vae.named_parameters():  # pixels inside (-1, 1), so clipping hides nothing
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    vae.decoder.conv_out.weight.mul_(0.3)
  scheduler = diffusers.DPMSolverMultistepScheduler(
    use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
  )
  pipe = diffusers.SanaPipeline(
    tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
  )
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(str(folder / "diffusers"))
  return pipe


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  folder = tmp_path_factory.mktemp("e2e")
  ref = _tiny_diffusers_pipeline(folder)
  model = bfd.convert(folder / "diffusers", folder / "model", max_length=MAX_LEN)
  return ref, model


def _diffusers_run(pipe, latents_nchw, output_type):
  with torch.no_grad():
    out = pipe(
      PROMPTS,
      negative_prompt="",
      num_inference_steps=STEPS,
      guidance_scale=CFG,
      height=H,
      width=W,
      latents=torch.from_numpy(latents_nchw),
      max_sequence_length=MAX_LEN,
      use_resolution_binning=False,
      output_type=output_type,
    ).images
  return np.asarray(out)


def test_converted_folder_settings(converted):
  """pipeline.json reproduces diffusers' prompt handling and scheduler."""
  _, model = converted
  s = json.loads((model / bundle_lib.PIPELINE_FILE).read_text())
  assert tuple(s["prompt"]["chi"]) == DIFFUSERS_CHI  # single quotes, as diffusers
  assert s["prompt"]["lowercase"] is True and s["prompt"]["max_length"] == MAX_LEN
  assert s["sampler"] == {
    "name": "dpm_solver",
    "steps": 20,
    "guidance_scale": 4.5,
    "use_null_mask": True,
  }
  assert s["flow_shift"] == 3.0 and s["image_size"] == 8 * 8
  b = bundle_lib.load(model)
  assert b.dit_config == DIT  # diffusers' numerics: no flooring, additive mask, eps
  assert b.null_caption is None  # diffusers encodes "" instead of a stored buffer


def test_bundle_loads_the_decoder_only_and_the_encoder_on_first_use(converted):
  """Text to image holds the DC-AE decoder alone; autoencoder.encode reads the encoder on
  its first call and matches diffusers' AutoencoderDC.encode (scaled by its factor)."""
  ref_pipe, model = converted
  b = bundle_lib.load(model)

  def dicts(fn):  # the parameter dicts the function closes over
    return [set(c.cell_contents) for c in fn.__closure__ if type(c.cell_contents) is dict]

  assert {"decoder"} in dicts(b.autoencoder.decode) and set() in dicts(b.autoencoder.encode)
  img = np.random.default_rng(3).uniform(-1, 1, (1, H, W, 3)).astype(np.float32)
  ours = b.autoencoder.encode(img)
  with torch.no_grad():
    theirs = ref_pipe.vae.encode(torch.from_numpy(img.transpose(0, 3, 1, 2))).latent
  theirs = theirs.numpy().transpose(0, 2, 3, 1) * ref_pipe.vae.config.scaling_factor
  assert _rel(ours, theirs) <= 1e-4, _rel(ours, theirs)
  assert {"encoder"} in dicts(b.autoencoder.encode)


def test_end_to_end_same_image_as_diffusers(converted):
  """Same prompts, same initial latents: our converted pipeline vs diffusers' SanaPipeline,
  final latents and decoded images (output_type="np") within 1e-4 relative."""
  ref_pipe, model = converted
  rng = np.random.default_rng(5)
  noise = rng.standard_normal((2, LATENT_C, H // 8, W // 8)).astype(np.float32)
  ref_lat = _diffusers_run(ref_pipe, noise, "latent")
  ref_img = _diffusers_run(ref_pipe, noise, "np")
  assert ref_img.shape == (2, H, W, 3)
  inside = np.mean((ref_img > 0) & (ref_img < 1))
  assert inside > 0.9, f"only {inside:.0%} of reference pixels are unclipped"

  pipe = SanaPipeline.from_folder(model)
  opts = SamplingOptions(
    height=H, width=W, steps=STEPS, guidance_scale=CFG, resolution_binning=False
  )
  x = noise.transpose(0, 2, 3, 1)
  lat = pipe.generate(PROMPTS, [0, 1], opts, latents=x, output="latent")
  img = pipe.generate(PROMPTS, [0, 1], opts, latents=x, output="float")
  err_lat = _rel(lat, ref_lat.transpose(0, 2, 3, 1))
  err_img = _rel(img, ref_img)
  print(f"end to end vs diffusers: latents {err_lat:.2e}, images {err_img:.2e}")
  assert err_lat <= 1e-4 and err_img <= 1e-4, (err_lat, err_img)
  u8 = pipe.generate(PROMPTS, [0, 1], opts, latents=x)
  assert u8.dtype == np.uint8 and u8.shape == (2, H, W, 3)
  assert np.abs(u8.astype(int) - np.round(ref_img * 255)).max() <= 1

  # The comparison is sensitive: the official null-mask choice gives another result.
  other = pipe.generate(
    PROMPTS,
    [0, 1],
    SamplingOptions(
      height=H,
      width=W,
      steps=STEPS,
      guidance_scale=CFG,
      resolution_binning=False,
      use_null_mask=False,
    ),
    latents=x,
    output="latent",
  )
  assert _rel(other, ref_lat.transpose(0, 2, 3, 1)) > 1e-3


def test_bundle_from_diffusers_errors(converted, tmp_path):
  _, model = converted
  src = model.parent / "diffusers"
  with pytest.raises(FileNotFoundError, match="not a diffusers SanaPipeline folder"):
    bfd.convert(model, tmp_path / "x")
  with pytest.raises(FileExistsError):
    bfd.convert(src, model)
  with pytest.raises(ValueError, match="use_flow_sigmas"):
    bfd.sampler_settings({"_class_name": "DPMSolverMultistepScheduler"})
  with pytest.raises(ValueError, match="not supported"):
    bfd.sampler_settings({"_class_name": "DDIMScheduler"})
  assert (
    bfd.sampler_settings({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 6.0})[0][
      "name"
    ]
    == "euler"
  )
  assert not (tmp_path / "x").exists()
  assert not [p for p in model.parent.iterdir() if p.name.startswith(".model.")]


# ------------------------------------------------------------- pipeline properties (pixels)


@pytest.fixture(scope="module")
def pixel_pipe(tmp_path_factory):
  folder = write_pixel_model(tmp_path_factory.mktemp("pixels"))
  return SanaPipeline.from_folder(folder)


def test_image_k_same_alone_or_in_batch(pixel_pipe):
  prompts = ["a red circle", "a blue square above a star", "a green triangle"]
  opts = SamplingOptions(steps=3)
  batch = pixel_pipe.generate(prompts, [10, 11, 12], opts, output="float")
  alone = pixel_pipe.generate(prompts[1:2], [11], opts, output="float")
  np.testing.assert_allclose(alone[0], batch[1], atol=1e-6)
  assert _rel(batch[0], batch[2]) > 1e-2  # different seeds / prompts differ
  # __call__: image k of prompt p uses seed + index, grouped by prompt.
  grid = pixel_pipe(prompts[:2], num_images_per_prompt=2, seed=10, steps=3)
  ref = pixel_pipe.generate(
    [prompts[0], prompts[0], prompts[1], prompts[1]], [10, 11, 12, 13], opts
  )
  np.testing.assert_array_equal(grid, ref)


def test_batch_sharded_over_8_devices_equals_1_device(pixel_pipe):
  assert jax.local_device_count() == 8
  prompts = ["a red circle", "a blue square", "a green star", "a yellow triangle"] * 2
  opts = SamplingOptions(steps=3)
  eight = pixel_pipe.generate(prompts, list(range(8)), opts, output="latent")
  one = pixel_pipe.generate(
    prompts, list(range(8)), opts, output="latent", devices=jax.local_devices()[:1]
  )
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=1e-5)
  x, _, _ = pipeline_lib._shard_batch(
    np.zeros((8, 4, 4, 3)), np.zeros((8, 10, 28)), np.zeros((8, 10))
  )
  assert len(x.sharding.device_set) == 8
  x, _, _ = pipeline_lib._shard_batch(
    np.zeros((6, 4, 4, 3)), np.zeros((6, 10, 28)), np.zeros((6, 10))
  )
  assert len(x.sharding.device_set) == 6


def test_caption_kv_cache_keeps_results(pixel_pipe):
  """Cross-attention K/V computed once per batch == recomputed at every step."""
  uncached = SanaPipeline(pixel_pipe.bundle, cache_caption_kv=False)
  prompts, seeds = ["a red circle", "a star below a square"], [3, 4]
  for use_null_mask in (False, True):
    opts = SamplingOptions(steps=3, use_null_mask=use_null_mask)
    a = pixel_pipe.generate(prompts, seeds, opts, output="latent")
    b = uncached.generate(prompts, seeds, opts, output="latent")
    assert _rel(a, b) <= 1e-5, use_null_mask


def test_null_caption_encoded_once_and_one_copy_of_the_weights(pixel_pipe, monkeypatch):
  """With use_null_mask the null prompt "" goes through the text encoder once per pipeline
  (it is the same at every call; diffusers re-encodes it), giving the same images; the
  bundle keeps only the placed DiT weights (the loaded memory-mapped ones are released)."""
  pipe = SanaPipeline(pixel_pipe.bundle)
  assert pipe.bundle.dit_params is pipe.params
  encoder = pipe.bundle.prompt_encoder
  calls = []
  real = encoder.encode_null
  monkeypatch.setattr(encoder, "encode_null", lambda n=1: calls.append(n) or real(n))
  opts = SamplingOptions(steps=3, use_null_mask=True)
  a = pipe.generate(["a red circle"], [3], opts, output="latent")
  b = pipe.generate(["a red circle"], [3], opts, output="latent")
  assert calls == [1]
  np.testing.assert_array_equal(a, b)
  fresh = SanaPipeline(pixel_pipe.bundle).null_caption(True)
  np.testing.assert_array_equal(pipe.null_caption(True)[0], fresh[0])
  np.testing.assert_array_equal(pipe.null_caption(True)[1], fresh[1])


def test_aspect_ratio_binning(pixel_pipe):
  # Requested size comes back; sampling happens at the nearest bin.
  r = pixel_pipe.resolve(SamplingOptions(height=16, width=48))
  assert (r["height"], r["width"]) == (16, 48)
  assert (r["gen_height"], r["gen_width"]) in pipeline_lib.resolution_bins(32, 4).values()
  assert r["gen_width"] > r["gen_height"]
  img = pixel_pipe(["a red circle"], height=16, width=48, steps=1)
  assert img.shape == (1, 16, 48, 3) and img.dtype == np.uint8
  img = pixel_pipe(["a red circle"], height=40, width=24, steps=1, resolution_binning=False)
  assert img.shape == (1, 40, 24, 3)
  img = pixel_pipe.generate(
    ["a red circle"], [0], SamplingOptions(height=16, width=48, steps=1), output="float"
  )
  assert img.shape == (1, 16, 48, 3) and img.dtype == np.float32
  assert 0.0 <= img.min() and img.max() <= 1.0


@pytest.mark.parametrize("base", [512, 1024, 2048, 4096])
def test_resolution_bins_are_diffusers_tables(base):
  from diffusers.pipelines.sana import pipeline_sana

  table = {
    512: "ASPECT_RATIO_512_BIN",
    1024: "ASPECT_RATIO_1024_BIN",
    2048: "ASPECT_RATIO_2048_BIN",
    4096: "ASPECT_RATIO_4096_BIN",
  }[base]
  ref = getattr(pipeline_sana, table)
  ours = pipeline_lib.resolution_bins(base, 32)
  assert {float(k): (int(h), int(w)) for k, (h, w) in ref.items()} == ours
  from diffusers.image_processor import PixArtImageProcessor

  rng = np.random.default_rng(base)
  for h, w in rng.integers(1, 60, (200, 2)) * 32:
    assert pipeline_lib.nearest_bin(
      int(h), int(w), ours
    ) == PixArtImageProcessor.classify_height_width_bin(int(h), int(w), ratios=ref)


def test_generate_bad_input(pixel_pipe):
  opts = SamplingOptions(steps=1)
  with pytest.raises(ValueError, match="prompts"):
    pixel_pipe.generate(["a"], [0, 1], opts)
  with pytest.raises(ValueError, match="non-empty"):
    pixel_pipe.generate([], [], opts)
  with pytest.raises(ValueError, match="latents must have shape"):
    pixel_pipe.generate(["a red circle"], [0], opts, latents=np.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="output"):
    pixel_pipe.generate(["a red circle"], [0], opts, output="pil")
  with pytest.raises(ValueError, match="multiple of 4"):
    pixel_pipe.resolve(SamplingOptions(height=30))


# -------------------------------------------- Euler and guidance intervals vs diffusers


def _components(pipe, scheduler):
  return diffusers.SanaPipeline(
    tokenizer=pipe.tokenizer,
    text_encoder=pipe.text_encoder,
    vae=pipe.vae,
    transformer=pipe.transformer,
    scheduler=scheduler,
  )


def _reference_loop(pipe, scheduler, noise_nchw, interval):
  """diffusers' SanaPipeline denoising loop written out, with the official guidance
  interval: CFG ([null, cond] batch, v = v_null + s (v_cond - v_null)) only at steps whose
  model time t has lo < t < hi, a conditional pass alone elsewhere. Captions from
  diffusers' own encode_prompt (negative "", its own mask, as the converted folder)."""
  lo, hi = interval
  with torch.no_grad():
    pe, pm, ne, nm = pipe.encode_prompt(
      PROMPTS,
      do_classifier_free_guidance=True,
      negative_prompt="",
      device=torch.device("cpu"),
      max_sequence_length=MAX_LEN,
      complex_human_instruction=list(DIFFUSERS_CHI),
    )
    scheduler.set_timesteps(STEPS)
    x = torch.from_numpy(noise_nchw)
    scale = pipe.transformer.config.timestep_scale
    guided = 0
    for t in scheduler.timesteps:
      if lo < float(t) < hi:
        guided += 1
        v = pipe.transformer(
          torch.cat([x, x]),
          encoder_hidden_states=torch.cat([ne, pe]),
          encoder_attention_mask=torch.cat([nm, pm]),
          timestep=(t * scale).expand(2 * x.shape[0]),
          return_dict=False,
        )[0].float()
        vn, vc = v.chunk(2)
        v = vn + CFG * (vc - vn)
      else:
        v = pipe.transformer(
          x,
          encoder_hidden_states=pe,
          encoder_attention_mask=pm,
          timestep=(t * scale).expand(x.shape[0]),
          return_dict=False,
        )[0].float()
      x = scheduler.step(v, t, x, return_dict=False)[0]
  return x.numpy(), guided


@pytest.fixture()
def one_torch_thread():
  """Tiny torch models on a shared 2-core box run far faster single-threaded."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


def test_euler_same_latents_as_diffusers_flow_match_euler(converted, one_torch_thread):
  """sampler="euler" against diffusers' SanaPipeline driving
  FlowMatchEulerDiscreteScheduler(shift=3.0) (REFERENCE.md section 4), same latents."""
  ref_pipe, model = converted
  euler = _components(ref_pipe, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
  euler.set_progress_bar_config(disable=True)
  noise = np.random.default_rng(6).standard_normal((2, LATENT_C, H // 8, W // 8)).astype(np.float32)
  ref = _diffusers_run(euler, noise, "latent").transpose(0, 2, 3, 1)
  pipe = SanaPipeline.from_folder(model)
  opts = SamplingOptions(
    height=H, width=W, steps=STEPS, guidance_scale=CFG, sampler="euler", resolution_binning=False
  )
  ours = pipe.generate(PROMPTS, [0, 1], opts, latents=noise.transpose(0, 2, 3, 1), output="latent")
  err = _rel(ours, ref)
  assert err <= 1e-4, err
  dpm = _diffusers_run(ref_pipe, noise, "latent").transpose(0, 2, 3, 1)
  assert _rel(ref, dpm) > 1e-2  # the solver choice shows at this bound


@pytest.mark.parametrize("solver", ["euler", "dpm_solver"])
def test_guidance_interval_same_latents_as_reference_loop(converted, one_torch_thread, solver):
  ref_pipe, model = converted
  sched = (
    diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    if solver == "euler"
    else diffusers.DPMSolverMultistepScheduler(
      use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
  )
  noise = np.random.default_rng(7).standard_normal((2, LATENT_C, H // 8, W // 8)).astype(np.float32)
  interval = (300.0, 850.0)
  ref, guided = _reference_loop(ref_pipe, sched, noise, interval)
  assert 0 < guided < STEPS, guided  # some steps guided, some not
  pipe = SanaPipeline.from_folder(model)
  x = noise.transpose(0, 2, 3, 1)
  opts = dict(
    height=H, width=W, steps=STEPS, guidance_scale=CFG, sampler=solver, resolution_binning=False
  )
  ours = pipe.generate(
    PROMPTS, [0, 1], SamplingOptions(**opts, guidance_interval=interval), latents=x, output="latent"
  )
  err = _rel(ours, ref.transpose(0, 2, 3, 1))
  assert err <= 1e-4, (solver, err)
  full, n = _reference_loop(ref_pipe, type(sched).from_config(sched.config), noise, (-1.0, 1e9))
  assert n == STEPS and _rel(full, ref) > 1e-3  # the interval changes the result
