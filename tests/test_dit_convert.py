"""Weight conversion: bit-exact round trips, diffusers loading, the diffusers oracle, the
positional embedding read from the official pos_embed buffer, errors."""

import json
import pickle
import re

import numpy as np
import pytest
import torch

from convert import dit as cli
from sana_jax.models.dit_config import DiTConfig
from sana_jax.weights import dit as W
from sana_jax.weights import io
from sana_jax.weights.io import CheckpointError
from tests import dit_reference as ref

PLAIN = DiTConfig(
  in_channels=5,
  out_channels=5,
  hidden_size=48,
  depth=2,
  self_head_dim=8,
  cross_heads=4,
  cross_head_dim=10,
  caption_channels=20,
  caption_len=7,
  sample_size=9,
)
QK = DiTConfig(
  in_channels=6,
  out_channels=6,
  patch_size=2,
  hidden_size=64,
  depth=3,
  self_head_dim=16,
  cross_heads=3,
  cross_head_dim=12,
  caption_channels=28,
  caption_len=11,
  sample_size=7,
  qk_norm=True,
  cross_norm=True,
)


@pytest.fixture(scope="module", params=["plain", "qk"])
def setup(request):
  cfg = {"plain": PLAIN, "qk": QK}[request.param]
  model = ref.diffusers_model(cfg, seed=3)
  diff_sd = ref.state_dict_numpy(model)
  official = W.diffusers_to_official(diff_sd, cfg)
  rng = np.random.default_rng(0)
  official["y_embedder.y_embedding"] = rng.standard_normal(
    (cfg.caption_len, cfg.caption_channels)
  ).astype(np.float32)
  base = cfg.sample_size // cfg.patch_size  # the official buffer: zeros without PE
  official["pos_embed"] = np.zeros((1, base * base, cfg.hidden_size), np.float32)
  return cfg, model, diff_sd, official


def _assert_same(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_official_flax_official_bit_exact(setup):
  cfg, _, _, official = setup
  params, extras = W.official_to_params(official, cfg)
  _assert_same(W.params_to_official(params, cfg, extras), official)


def test_bf16_official_round_trip_keeps_dtype(setup):
  import ml_dtypes

  cfg, _, _, official = setup
  official = {k: v.astype(ml_dtypes.bfloat16) for k, v in official.items()}
  params, extras = W.official_to_params(official, cfg)
  _assert_same(W.params_to_official(params, cfg, extras), official)


def test_diffusers_flax_diffusers_bit_exact(setup, tmp_path):
  cfg, model, diff_sd, _ = setup
  model.save_pretrained(tmp_path / "src")
  params, cfg2 = W.load_diffusers(tmp_path / "src")
  assert cfg2 == cfg.diffusers_compatible().replace(caption_len=300)  # not in diffusers config
  W.save_diffusers(tmp_path / "out", params, cfg2, max_shard_bytes=20_000)  # sharded
  assert (tmp_path / "out" / "diffusion_pytorch_model.safetensors.index.json").exists()
  _assert_same(io.read_safetensors_folder(tmp_path / "out"), diff_sd)


def test_diffusers_output_loads_with_from_pretrained(setup, tmp_path):
  from diffusers import SanaTransformer2DModel

  cfg, model, diff_sd, _ = setup
  params = W.diffusers_to_params(diff_sd, cfg)
  W.save_diffusers(tmp_path / "out", params, cfg)
  loaded = SanaTransformer2DModel.from_pretrained(tmp_path / "out").eval()
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 4, 6, cfg.in_channels)).astype(np.float32)
  y = rng.standard_normal((1, 5, cfg.caption_channels)).astype(np.float32)
  m = np.ones((1, 5), np.int32)
  _assert_same(ref.state_dict_numpy(loaded), diff_sd)  # every tensor, bit for bit
  assert (
    ref.rel_err(
      ref.run_diffusers(loaded, x, [500.0], y, m), ref.run_diffusers(model, x, [500.0], y, m)
    )
    <= 1e-6
  )


def test_official_to_diffusers_matches_diffusers_converter(setup):
  from diffusers.loaders.single_file_utils import convert_sana_transformer_to_diffusers

  cfg, _, _, official = setup
  ours = W.official_to_diffusers(official, cfg)
  oracle_in = {k: torch.from_numpy(v.copy()) for k, v in official.items()}
  theirs = {k: v.numpy() for k, v in convert_sana_transformer_to_diffusers(oracle_in).items()}
  # The oracle omits the qk-norm keys; every key it writes must agree exactly.
  assert set(theirs) <= set(ours)
  assert set(ours) - set(theirs) == {k for k in ours if "norm_q" in k or "norm_k" in k}
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_cli_pth_round_trip_and_ema(setup, tmp_path, capsys):
  cfg, _, _, official = setup
  ema = {k: v if k == "pos_embed" else v + 1 for k, v in official.items()}
  to_t = lambda sd: {k: torch.from_numpy(v.copy()) for k, v in sd.items()}  # noqa: E731
  torch.save(
    {"state_dict": to_t(official), "state_dict_ema": to_t(ema), "step": 7}, tmp_path / "ckpt.pth"
  )
  cfg_file = tmp_path / "cfg.py"
  cfg_file.write_text(
    "import ml_collections\ndef get_config():\n  return ml_collections."
    f"ConfigDict({{'model': {cfg.to_dict()!r}}})\n"
  )
  for which in ("", "--ema"):
    args = [
      "--src",
      str(tmp_path / "ckpt.pth"),
      "--to",
      "flax",
      "--dst",
      str(tmp_path / f"flax{which}"),
      "--config",
      str(cfg_file),
    ] + ([which] if which else [])
    assert cli.main(args) == 0
    assert (
      cli.main(
        [
          "--src",
          str(tmp_path / f"flax{which}"),
          "--to",
          "official",
          "--dst",
          str(tmp_path / f"back{which}.pth"),
        ]
      )
      == 0
    )
    back = torch.load(tmp_path / f"back{which}.pth", weights_only=True)["state_dict"]
    _assert_same({k: v.numpy() for k, v in back.items()}, ema if which else official)
  # official -> diffusers through the CLI, then back to official with the null embedding.
  assert (
    cli.main(
      ["--src", str(tmp_path / "flax"), "--to", "diffusers", "--dst", str(tmp_path / "diff")]
    )
    == 0
  )
  assert (
    cli.main(
      ["--src", str(tmp_path / "diff"), "--to", "official", "--dst", str(tmp_path / "x.pth")]
    )
    == 2
  )
  assert "null-embedding" in capsys.readouterr().err
  assert not (tmp_path / "x.pth").exists()
  np.save(tmp_path / "null.npy", official["y_embedder.y_embedding"])
  assert (
    cli.main(
      [
        "--src",
        str(tmp_path / "diff"),
        "--to",
        "official",
        "--dst",
        str(tmp_path / "y.pth"),
        "--null-embedding",
        str(tmp_path / "null.npy"),
      ]
    )
    == 0
  )
  back = torch.load(tmp_path / "y.pth", weights_only=True)["state_dict"]
  _assert_same({k: v.numpy() for k, v in back.items()}, official)


# ------------------------------------------------------------------------ bad input


def _expect_refused(capsys, argv, dst, match):
  """The CLI returns 2 with `error: ...` naming `match`, and writes nothing."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and re.search(match, err), err
  assert "Traceback" not in err
  assert not dst.exists()
  assert not list(dst.parent.glob(f".{dst.name}.*"))  # no leftover temporaries
  assert not list(dst.parent.glob(f".{dst.name}.*"))  # no leftover temporaries


@pytest.fixture()
def qk_official():
  model = ref.diffusers_model(QK, seed=5)
  return W.diffusers_to_official(ref.state_dict_numpy(model), QK)


def test_missing_unexpected_misshaped(qk_official):
  sd = dict(qk_official)
  del sd["blocks.1.attn.qkv.weight"]
  with pytest.raises(CheckpointError, match=r"missing.*blocks\.1\.attn\.qkv\.weight"):
    W.official_to_params(sd, QK)
  sd = dict(qk_official, **{"blocks.0.extra.weight": np.zeros(3)})
  with pytest.raises(CheckpointError, match=r"unexpected.*blocks\.0\.extra\.weight"):
    W.official_to_params(sd, QK)
  sd = dict(qk_official)
  sd["blocks.2.cross_attn.proj.weight"] = np.zeros((64, 35), np.float32)
  with pytest.raises(CheckpointError, match=r"cross_attn\.proj\.weight.*\(64, 35\).*\(64, 36\)"):
    W.official_to_params(sd, QK)


def test_config_that_does_not_fit_names_the_field(qk_official):
  with pytest.raises(CheckpointError, match="depth"):
    W.official_to_params(qk_official, QK.replace(depth=4))
  with pytest.raises(CheckpointError, match="qk_norm"):
    W.official_to_params(qk_official, QK.replace(qk_norm=False))
  with pytest.raises(CheckpointError, match="mlp_ratio"):
    W.official_to_params(qk_official, QK.replace(mlp_ratio=3.0))


def test_truncated_and_missing_files(tmp_path, qk_official, capsys):
  params, _ = W.official_to_params(qk_official, QK)
  W.save_diffusers(tmp_path / "d", params, QK)
  f = tmp_path / "d" / "diffusion_pytorch_model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  _expect_refused(
    capsys,
    ["--src", str(tmp_path / "d"), "--to", "flax", "--dst", str(tmp_path / "out")],
    tmp_path / "out",
    "truncated",
  )
  torch.save(
    {"state_dict": {k: torch.from_numpy(v) for k, v in qk_official.items()}}, tmp_path / "c.pth"
  )
  data = (tmp_path / "c.pth").read_bytes()
  (tmp_path / "c.pth").write_bytes(data[: len(data) // 2])
  _expect_refused(
    capsys,
    ["--src", str(tmp_path / "c.pth"), "--to", "flax", "--dst", str(tmp_path / "out")],
    tmp_path / "out",
    "cannot read",
  )
  _expect_refused(
    capsys,
    ["--src", str(tmp_path / "nope.pth"), "--to", "flax", "--dst", str(tmp_path / "out")],
    tmp_path / "out",
    "nope.pth",
  )


class _Evil:
  def __reduce__(self):
    import os

    return (os.system, ("touch /tmp/sana_jax_pwned",))


def test_pickle_with_code_is_refused(tmp_path):
  import os

  if os.path.exists("/tmp/sana_jax_pwned"):
    os.remove("/tmp/sana_jax_pwned")
  with open(tmp_path / "evil.pth", "wb") as f:
    pickle.dump({"state_dict": _Evil()}, f)
  with pytest.raises(CheckpointError, match="refused"):
    W.load_official(tmp_path / "evil.pth")
  assert not os.path.exists("/tmp/sana_jax_pwned")


def test_not_a_checkpoint_folder(tmp_path):
  (tmp_path / "f").mkdir()
  (tmp_path / "f" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
  with pytest.raises(CheckpointError, match="neither"):
    cli.detect_format(tmp_path / "f")


# ------------------------------------------------- positional embedding (2K / 4K models)

# A released width (1152: cross heads 16 x 72 come from the released table, so no --config),
# one block, a narrow MLP (mlp_ratio is read from the weights), a 6x6 base grid; every
# other size small and distinct.
PE_CFG = DiTConfig(
  in_channels=4,
  out_channels=4,
  hidden_size=1152,
  depth=1,
  cross_heads=16,
  cross_head_dim=72,
  caption_channels=24,
  caption_len=5,
  sample_size=6,
  mlp_ratio=0.5,
  use_pe=True,
  pe_interpolation=2.0,
)


def _reference_pos_embed(hidden, base, interpolation):
  """The official buffer, (1, base**2, hidden), from diffusers' get_2d_sincos_pos_embed."""
  from diffusers.models.embeddings import get_2d_sincos_pos_embed

  pe = get_2d_sincos_pos_embed(
    hidden, base, base_size=base, interpolation_scale=interpolation, output_type="pt"
  )
  return np.asarray(pe, np.float32)[None]


def test_official_pe_checkpoint_converts_without_config(tmp_path, interpolation=2.0):
  """Official 2K/4K-style checkpoint, no --config: use_pe, sample_size and
  pe_interpolation come from pos_embed, and the output equals diffusers' with that PE at a
  non-square latent that is not the base grid."""
  import jax
  from sana_jax.models import dit

  cfg = PE_CFG.replace(pe_interpolation=interpolation)
  model = ref.diffusers_model(cfg, seed=11)
  official = W.diffusers_to_official(ref.state_dict_numpy(model), cfg)
  official["pos_embed"] = _reference_pos_embed(cfg.hidden_size, 6, interpolation)
  official["y_embedder.y_embedding"] = np.ones((5, 24), np.float32)
  torch.save(
    {"state_dict": {k: torch.from_numpy(v) for k, v in official.items()}}, tmp_path / "sana_2k.pth"
  )
  assert (
    cli.main(
      ["--src", str(tmp_path / "sana_2k.pth"), "--to", "flax", "--dst", str(tmp_path / "ours")]
    )
    == 0
  )
  params, got, _ = W.load_flax(tmp_path / "ours")
  assert (got.use_pe, got.sample_size, got.pe_interpolation) == (True, 6, interpolation)
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 5, 8, 4)).astype(np.float32)
  y = rng.standard_normal((1, 3, 24)).astype(np.float32)
  m = np.ones((1, 3), np.int32)
  ours = jax.jit(dit.SanaDiT(got.diffusers_compatible()).apply)(
    {"params": params}, x, np.array([500.0], np.float32), y, m
  )
  # fp32 at the 1152 width: 1.003e-5 and 1.02e-5 on an AMD EPYC machine (2026-12-03, the
  # code of 1240aa1 and of this session alike; torch's own output moves in the 7th digit
  # between runs there), under 1e-5 on the earlier sessions' machine.
  assert ref.rel_err(ours, ref.run_diffusers(model, x, [500.0], y, m)) <= 2e-5


def test_pos_embed_inference_zero_bf16_and_refusals():
  import ml_dtypes

  # A zero buffer: no PE; its token count still gives the base grid (patch 2: sample 2*7).
  assert W.infer_positional({"pos_embed": np.zeros((1, 49, 8), np.float32)}, 2) == {
    "use_pe": False,
    "sample_size": 14,
  }
  # fp32 at other interpolations; a bf16 buffer (bf16 checkpoint) at the 4K size.
  for hidden, base, interp, dtype in [
    (48, 6, 0.75, np.float32),
    (40, 9, 1.3, np.float32),
    (2240, 128, 2.0, ml_dtypes.bfloat16),
  ]:
    pe = _reference_pos_embed(hidden, base, interp).astype(dtype)
    assert W.infer_positional({"pos_embed": pe}, 1) == {
      "use_pe": True,
      "sample_size": base,
      "pe_interpolation": interp,
    }
  # No interpolation reproduces these: named errors.
  good = _reference_pos_embed(48, 6, 1.0)
  swapped = np.concatenate([good[..., 24:], good[..., :24]], axis=-1)  # h channels first
  for bad in (swapped, np.random.default_rng(0).standard_normal((1, 36, 48)), good + 1e-3):
    with pytest.raises(W.PositionalEmbeddingError, match="matches no 2-D sin-cos"):
      W.infer_positional({"pos_embed": bad}, 1)
  with pytest.raises(W.PositionalEmbeddingError, match="square"):
    W.infer_positional({"pos_embed": np.ones((1, 12, 48))}, 1)


def test_config_contradicting_pos_embed_names_the_field(qk_official):
  sd = dict(qk_official, pos_embed=_reference_pos_embed(64, 3, 1.0))  # QK: 7 // 2 = 3
  with pytest.raises(CheckpointError, match="use_pe: config gives use_pe=False"):
    W.official_to_params(sd, QK)
  with pytest.raises(CheckpointError, match="pe_interpolation"):
    W.official_to_params(sd, QK.replace(use_pe=True, pe_interpolation=2.0))
  W.official_to_params(sd, QK.replace(use_pe=True))  # fits
  sd["pos_embed"] = np.zeros((1, 16, 64), np.float32)
  with pytest.raises(CheckpointError, match="sample_size"):
    W.official_to_params(sd, QK)


def test_official_output_carries_pos_embed(setup, tmp_path):
  """Our official files carry the buffer the official code writes, so they convert back
  without a config (here the PE variant of the fixture's model)."""
  cfg, _, _, official = setup
  pe_cfg = cfg.replace(use_pe=True, pe_interpolation=1.5)
  params, extras = W.official_to_params(official, cfg)
  sd = W.params_to_official(params, pe_cfg, extras)
  base = cfg.sample_size // cfg.patch_size
  np.testing.assert_allclose(
    sd["pos_embed"], _reference_pos_embed(cfg.hidden_size, base, 1.5), atol=1e-6
  )
  assert W.infer_positional(sd, cfg.patch_size) == {
    "use_pe": True,
    "sample_size": base * cfg.patch_size,
    "pe_interpolation": 1.5,
  }


# ------------------------------------------------------------- the one safetensors reader


def _header_file(path, header: dict, data: bytes) -> None:
  raw = json.dumps(header).encode()
  path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def test_reader_is_memory_mapped_and_keeps_bf16(tmp_path):
  """io.read_safetensors (every weights module reads through it) hands out read-only views
  of a memory map: reading a 64 MB file allocates nothing (tracemalloc sees numpy's
  allocations; the former read_bytes() reader allocated the whole file), and bf16 / fp16
  tensors keep their dtype and bits (safetensors.torch wrote them)."""
  import tracemalloc

  import ml_dtypes
  from safetensors.torch import save_file

  big = torch.randn(4096, 4096)
  small = torch.randn(3, 5).to(torch.bfloat16)
  save_file(
    {"big": big, "b": small, "h": torch.arange(6.0).half()}, str(tmp_path / "t.safetensors")
  )
  tracemalloc.start()
  try:
    out = io.read_safetensors(tmp_path / "t.safetensors")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 1 << 20, peak  # the file is 64 MB
  assert not out["big"].flags.writeable
  base = out["big"]
  while base.base is not None and not isinstance(base, np.memmap):
    base = base.base
  assert isinstance(base, np.memmap)
  assert out["b"].dtype == ml_dtypes.bfloat16 and out["h"].dtype == np.float16
  np.testing.assert_array_equal(out["b"].view(np.int16), small.view(torch.int16).numpy())
  np.testing.assert_array_equal(out["big"], big.numpy())


def test_reader_errors_name_file_tensor_dtype_and_shape(tmp_path):
  f = tmp_path / "bad.safetensors"
  _header_file(f, {"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 10]}}, b"\0" * 10)
  with pytest.raises(CheckpointError, match=r"bad.safetensors: tensor w: BF16 \(2, 3\) needs 12"):
    io.read_safetensors(f)
  with pytest.raises(CheckpointError, match=r"tensor w: BF16 \(2, 3\) needs 12"):
    io.check_safetensors(f)  # the header-only check applies the same rules
  _header_file(f, {"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
  with pytest.raises(CheckpointError, match="tensor w has unsupported dtype C64"):
    io.read_safetensors(f)
  _header_file(f, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 12)
  with pytest.raises(CheckpointError, match="truncated safetensors file: tensor w needs bytes"):
    io.read_safetensors(f)
  f.write_bytes(b"\x10\0\0\0\0\0\0\0{not json}......")
  with pytest.raises(CheckpointError, match="corrupt safetensors header"):
    io.read_safetensors(f)
  f.write_bytes(b"\x01\0")
  with pytest.raises(CheckpointError, match=r"bad.safetensors: truncated safetensors file \(2"):
    io.read_safetensors(f)


def test_sharded_index_reader(tmp_path, qk_official):
  """Shards through one index reader (io.read_safetensors_index), used by the DiT, Gemma
  and DC-AE folder readers: same tensors as the single file; a missing shard is named."""
  params, _ = W.official_to_params(qk_official, QK)
  W.save_diffusers(tmp_path / "s", params, QK, max_shard_bytes=20_000)
  W.save_diffusers(tmp_path / "one", params, QK)
  index = tmp_path / "s" / "diffusion_pytorch_model.safetensors.index.json"
  sharded = io.read_safetensors_index(index)
  _assert_same(sharded, io.read_safetensors_folder(tmp_path / "one"))
  shard = sorted((tmp_path / "s").glob("*-of-*.safetensors"))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=f"missing: .*{shard.name}"):
    io.read_safetensors_folder(tmp_path / "s")


def test_one_tree_flattening():
  """dit, gemma and dcae weights share io.flatten / io.unflatten."""
  from sana_jax.weights import dcae, gemma

  assert W.flatten is io.flatten and gemma.flatten is io.flatten
  tree = {"a": {"b": {"kernel": 1, "bias": 2}}, "c": 3}
  assert io.flatten(tree) == {"a/b/kernel": 1, "a/b/bias": 2, "c": 3}
  assert io.unflatten(io.flatten(tree)) == tree
  assert dcae._flatten(tree) == {("a", "b", "kernel"): 1, ("a", "b", "bias"): 2, ("c",): 3}
  assert dcae._unflatten(dcae._flatten(tree)) == tree
