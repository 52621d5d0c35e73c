"""DC-AE parity with diffusers `AutoencoderDC` (random weights, fp32), converter strictness,
and input checks.

Small configs have stage widths, head dim, latent channels and image sides that all differ,
so a wrong transpose or channel order cannot pass. Norm scales/biases (ones/zeros at init)
and batch-norm statistics are randomised so their mapping is tested too.
"""

import json
import time

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sana_jax.models import autoencoder as ae  # noqa: E402
from sana_jax.weights import dcae  # noqa: E402

# ResBlock + EfficientViT stages, two multiscale kernels in one stage, stride-2 conv
# downsample, interpolate upsample, RMSNorm + SiLU. f8; 64x96 images -> 8x12 latents.
CFG_A = dict(
  in_channels=3,
  latent_channels=8,
  attention_head_dim=12,
  encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  encoder_block_out_channels=[12, 24, 48, 96],
  decoder_block_out_channels=[12, 24, 48, 96],
  encoder_layers_per_block=[1, 1, 2, 1],
  decoder_layers_per_block=[1, 2, 1, 2],
  encoder_qkv_multiscales=[[], [], [3, 5], [5]],
  decoder_qkv_multiscales=[[], [], [5], [3]],
  upsample_block_type="interpolate",
  downsample_block_type="Conv",
  scaling_factor=0.7,
)

# Other branches: first stage without layers (conv_in / conv_out are down/up blocks),
# pixel (un)shuffle resampling, batch norm + ReLU decoder stages, no in/out shortcut on
# one side, and the quadratic attention path (deepest stage has 4x3 = 12 <= 16 tokens).
CFG_B = dict(
  in_channels=3,
  latent_channels=12,
  attention_head_dim=16,
  encoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  decoder_block_types=["ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock"],
  encoder_block_out_channels=[8, 24, 48, 96],
  decoder_block_out_channels=[8, 24, 48, 96],
  encoder_layers_per_block=[0, 2, 1, 1],
  decoder_layers_per_block=[0, 1, 2, 1],
  encoder_qkv_multiscales=[[], [], [5], [3, 5]],
  decoder_qkv_multiscales=[[], [], [3], [5]],
  upsample_block_type="pixel_shuffle",
  downsample_block_type="pixel_unshuffle",
  decoder_norm_types=["batch_norm", "batch_norm", "rms_norm", "batch_norm"],
  decoder_act_fns=["relu", "relu", "silu", "silu"],
  encoder_out_shortcut=False,
  decoder_in_shortcut=True,
  scaling_factor=1.3,
)


def _randomise_affine(model, seed=0):
  """Norm weights/biases away from 1/0, batch-norm running stats random."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn(p.shape, generator=g))
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model


def _torch_model(cfg, seed=0):
  torch.manual_seed(seed)
  return _randomise_affine(diffusers.AutoencoderDC(**cfg).eval(), seed)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("cfg,image_hw", [(CFG_A, (64, 96)), (CFG_B, (32, 24))], ids=["A", "B"])
def test_small_parity_encode_decode(cfg, image_hw, tmp_path):
  ref = _torch_model(cfg)
  ref.save_pretrained(tmp_path)  # goes through the folder loader
  _, params, config = dcae.load_autoencoder(tmp_path)
  assert config.scaling_factor == cfg["scaling_factor"]
  x = np.random.RandomState(1).uniform(-1, 1, (2,) + image_hw + (3,)).astype(np.float32)
  with torch.no_grad():
    z_ref = _nhwc(ref.encode(_nchw(x)).latent)
    x_ref = _nhwc(ref.decode(_nchw(z_ref)).sample)
  f = config.spatial_compression_ratio
  assert z_ref.shape == (2, image_hw[0] // f, image_hw[1] // f, cfg["latent_channels"])

  z = ae.encode(config, params, x)  # scaled latents
  assert _rel(np.asarray(z) / config.scaling_factor, z_ref) < 1e-5
  assert _rel(ae.decode(config, params, z_ref * config.scaling_factor), x_ref) < 1e-5
  if config.upsample_block_type == "interpolate":
    # The literal nearest-2x + conv form agrees with the folded (sub-pixel) default.
    literal = config.replace(upsample_impl="repeat")
    assert _rel(ae.decode(literal, params, z_ref * config.scaling_factor), x_ref) < 1e-5


def test_converter_round_trip_and_f32c32_shapes():
  ref = _torch_model(CFG_A)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  config = ae.DCAEConfig.from_diffusers(dict(ref.config))
  back = dcae.to_diffusers_state_dict(dcae.convert_state_dict(sd, config, as_jax=False))
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

  # f32c32: every diffusers tensor name and shape, against diffusers on the meta device.
  cfg = ae.dcae_f32c32_config()
  with torch.device("meta"):
    full = diffusers.AutoencoderDC(**cfg.to_diffusers())
  theirs = {k: tuple(v.shape) for k, v in full.state_dict().items()}
  ours = {k: v[1] for k, v in dcae.expected_torch_shapes(cfg).items()}
  assert ours == theirs
  n = lambda part: sum(np.prod(s) for k, s in theirs.items() if k.startswith(part))
  assert round(n("decoder") / 1e6) == 159 and round((n("encoder") + n("decoder")) / 1e6) == 312
  assert ae.num_params(ae.param_shapes(cfg)) == n("encoder") + n("decoder")
  assert cfg == ae.DCAEConfig.from_diffusers(dict(full.config))


@pytest.mark.slow
def test_f32c32_decoder_parity_256px():
  """The full SANA DC-AE decoder (159M params), one 256 px decode, against diffusers."""
  from diffusers.models.autoencoders.autoencoder_dc import Decoder

  t0 = time.time()
  cfg = ae.dcae_f32c32_config()
  torch.manual_seed(0)
  ref = _randomise_affine(
    Decoder(
      in_channels=3,
      latent_channels=32,
      attention_head_dim=32,
      block_type=cfg.decoder_block_types,
      block_out_channels=cfg.decoder_block_out_channels,
      layers_per_block=cfg.decoder_layers_per_block,
      qkv_multiscales=cfg.decoder_qkv_multiscales,
      norm_type="rms_norm",
      act_fn="silu",
      upsample_block_type="interpolate",
      in_shortcut=True,
      conv_act_fn="relu",
    ).eval()
  )
  sd = {f"decoder.{k}": v.numpy() for k, v in ref.state_dict().items()}
  params = dcae.convert_state_dict(sd, cfg, parts=("decoder",))
  del sd
  z = np.random.RandomState(0).randn(1, 8, 8, 32).astype(np.float32)
  with torch.no_grad():
    x_ref = _nhwc(ref(_nchw(z)))
  del ref
  out = np.asarray(ae.decode(cfg, params, z * cfg.scaling_factor))
  assert out.shape == (1, 256, 256, 3)
  err = _rel(out, x_ref)
  print(f"f32c32 256 px decode: max rel err {err:.2e}, {time.time() - t0:.0f} s")
  assert err <= 1e-4


def test_wrong_checkpoint_for_config(tmp_path):
  ref = _torch_model(CFG_A)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  config = ae.DCAEConfig.from_diffusers(CFG_A)

  # Another latent width: conv_in / conv_out mis-shaped, named with both shapes.
  other = config.replace(latent_channels=16)
  with pytest.raises(
    ValueError,
    match=r"mis-shaped.*decoder\.conv_in\.weight: checkpoint "
    r"\(96, 8, 3, 3\), expected \(96, 16, 3, 3\)",
  ):
    dcae.convert_state_dict(sd, other)

  # A missing and an unexpected tensor are both listed.
  bad = dict(sd)
  del bad["encoder.down_blocks.2.1.attn.to_qkv_multiscale.1.proj_out.weight"]
  bad["decoder.up_blocks.0.7.conv1.weight"] = np.zeros((3, 3, 3, 3), np.float32)
  with pytest.raises(ValueError) as e:
    dcae.convert_state_dict(bad, config)
  msg = str(e.value)
  assert "1 missing: encoder.down_blocks.2.1.attn.to_qkv_multiscale.1.proj_out.weight" in msg
  assert "1 unexpected: decoder.up_blocks.0.7.conv1.weight" in msg

  # A folder whose config.json does not describe its weights (one fewer decoder layer).
  ref.save_pretrained(tmp_path)
  c = json.loads((tmp_path / "config.json").read_text())
  c["decoder_layers_per_block"] = [1, 1, 1, 2]
  (tmp_path / "config.json").write_text(json.dumps(c))
  with pytest.raises(ValueError, match=r"unexpected: decoder\.up_blocks\.1\.2\."):
    dcae.load_autoencoder(tmp_path)
  # Not an AutoencoderDC folder at all.
  c["_class_name"] = "AutoencoderKL"
  (tmp_path / "config.json").write_text(json.dumps(c))
  with pytest.raises(ValueError, match="AutoencoderKL"):
    dcae.load_autoencoder(tmp_path)


def test_bad_inputs():
  config = ae.DCAEConfig.from_diffusers(CFG_A)
  params = ae.init_params(config, jax.random.PRNGKey(0))
  module = ae.AutoencoderDC(config)
  with pytest.raises(ValueError, match="multiples of 8"):
    ae.encode(config, params, np.zeros((1, 60, 96, 3), np.float32))
  with pytest.raises(ValueError, match="multiples of 8"):
    module.apply({"params": params}, np.zeros((1, 64, 90, 3), np.float32), method=module.encode)
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    ae.encode(config, params, np.zeros((1, 64, 64, 4), np.float32))
  with pytest.raises(ValueError, match=r"\(B, h, w, 8\).*\(1, 4, 4, 32\)"):
    ae.decode(config, params, np.zeros((1, 4, 4, 32), np.float32))
  with pytest.raises(ValueError, match=r"\(B, h, w, 8\)"):
    module.apply({"params": params}, np.zeros((4, 4, 8), np.float32), method=module.decode)
  with pytest.raises(ValueError, match="not supported"):
    ae.DCAEConfig.from_diffusers(dict(CFG_A, decoder_block_types="EViTS5_GLU"))
  with pytest.raises(ValueError, match="one per stage"):
    ae.DCAEConfig.from_diffusers(dict(CFG_A, decoder_norm_types=["rms_norm"] * 3))


def test_sharded_folder_cli_and_round_trip(tmp_path):
  """Sharded diffusers folder under a pipeline root -> ours (CLI) -> diffusers (CLI)."""
  import importlib.util
  import pathlib

  spec = importlib.util.spec_from_file_location(
    "convert_dcae", pathlib.Path(__file__).parents[1] / "convert" / "dcae.py"
  )
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)

  ref = _torch_model(CFG_B)
  ref.save_pretrained(tmp_path / "pipe" / "vae", max_shard_size="100KB")
  assert (tmp_path / "pipe" / "vae" / "diffusion_pytorch_model.safetensors.index.json").exists()
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}

  assert cli.main(["--src", str(tmp_path / "pipe"), "--dst", str(tmp_path / "ours")]) == 0
  _, params, config = dcae.load_autoencoder(tmp_path / "ours")
  assert config == ae.DCAEConfig.from_diffusers(CFG_B)
  back = dcae.to_diffusers_state_dict(params)
  assert set(back) == {k for k in sd if not k.endswith("num_batches_tracked")}
  for k in back:
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)

  assert (
    cli.main(["--src", str(tmp_path / "ours"), "--dst", str(tmp_path / "diff"), "--to-diffusers"])
    == 0
  )
  again = diffusers.AutoencoderDC.from_pretrained(tmp_path / "diff").eval()
  for k, v in again.state_dict().items():
    if not k.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(v.numpy(), sd[k], err_msg=k)

  # Our format is strict as well; decoder-only loading skips the encoder.
  _, dec_only, _ = dcae.load_autoencoder(tmp_path / "ours", parts=("decoder",))
  assert set(dec_only) == {"decoder"}
  cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
  cfg["latent_channels"] = 24
  (tmp_path / "ours" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"mis-shaped: decoder/conv_in/kernel"):
    dcae.load_autoencoder(tmp_path / "ours")
