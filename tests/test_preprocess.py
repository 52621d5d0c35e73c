"""sana_jax.data.preprocess: the data and null caption it writes, sharded runs, the contract.

The model is test_sample_cli's tiny random pixel-space folder (image size 32, 3 channels,
tiny Gemma-2 with 10 caption tokens of width 28); references are built independently from
the same folder (PromptEncoder.from_folders, PixelAutoencoder, shapes.example).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sana_jax.data import latents_tfds
from sana_jax.data import preprocess
from tests import cli_contract
from tests.test_sample_cli import write_pixel_model


# The tiny model's word-level vocabulary does not know most shapes words: warned, expected.
pytestmark = pytest.mark.filterwarnings("ignore::sana_jax.models.prompts.PromptWarning")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  return write_pixel_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """7 images of three aspect ratios with captions; buckets 32x32, 32x64 and 64x32."""
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  sizes = [(40, 40), (30, 70), (80, 36), (33, 33), (25, 50), (64, 30), (50, 50)]
  words = [
    "a red circle",
    "a blue square",
    "a green star left of a red triangle",
    "an yellow star",
    "a red square above a blue circle",
    "a triangle",
    "a star",
  ]
  for i, ((h, w), c) in enumerate(zip(sizes, words)):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    (folder / f"im{i}.txt").write_text(c + "\n")
  return folder


BUCKETS = "32x32,32x64,64x32"


def _records(version_dir):
  sources = latents_tfds.open_dataset(version_dir)
  return {split: [src[i] for i in range(len(src))] for split, src in sorted(sources.items())}


def _references(model):
  from sana_jax.models.pixels import PixelAutoencoder
  from sana_jax.models.prompts import PromptConfig, PromptEncoder

  enc = PromptEncoder.from_folders(
    str(model / "tokenizer"),
    str(model / "text_encoder"),
    PromptConfig(max_length=10, chi=None, lowercase=True),
  )
  return enc, PixelAutoencoder(3)


def test_writes_training_data_and_null_caption(model, tmp_path, capsys, caplog):
  """Every record is the shapes scene of its index through the model's autoencoder, its
  caption through the model's text encoder; the null caption is the encoder's "" prompt.
  One progress bar counting to the examples encoded, no absl ERROR about open files."""
  from sana_jax.shapes_eval import task as shapes

  out = tmp_path / "data"
  assert (
    preprocess.main(
      [
        "--model",
        str(model),
        "--out",
        str(out),
        "--num",
        "6",
        "--seed",
        "3",
        "--name",
        "s",
        "--batch_size",
        "4",
      ]
    )
    == 0
  )
  printed = capsys.readouterr()
  version = latents_tfds.version_dir(out, "s")
  assert f"wrote dataset of 6 examples to {version}" in printed.out
  assert "encode: 100%" in printed.err and "6/6" in printed.err and "0/6" in printed.err
  assert "Generating" not in printed.err and "Shuffling" not in printed.err  # one bar
  assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
  assert "open file descriptors" not in caplog.text + printed.err
  # Nor TFDS's notes naming its temporary folder ("... Subsequent calls will reuse this
  # data.") or "Using custom data configuration".
  assert "reuse" not in printed.out + printed.err and "custom data" not in caplog.text
  recs = _records(version)
  assert list(recs) == ["train_32x32"] and len(recs["train_32x32"]) == 6
  enc, ae = _references(model)
  scenes = [shapes.example(i, 32, 3) for i in range(6)]
  prompts = [s["spec"]["prompt"] for s in scenes]
  want_lat = np.asarray(
    ae.encode(np.stack([s["image"] for s in scenes]).astype(np.float32) / 127.5 - 1.0)
  )
  want_emb, want_mask = enc.encode(prompts)
  for i, r in enumerate(recs["train_32x32"]):
    assert r["text"].decode() == prompts[i]
    np.testing.assert_allclose(r["latent"], want_lat[i], rtol=0, atol=1e-6)
    np.testing.assert_allclose(r["caption"], want_emb[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r["caption_mask"], want_mask[i])
  assert len({r["caption"].tobytes() for r in recs["train_32x32"]}) == len(set(prompts))
  null = np.load(version / latents_tfds.NULL_CAPTION_FILE)
  null_emb, null_mask = enc.encode_null(1)
  np.testing.assert_allclose(null["caption"], null_emb[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(null["mask"], null_mask[0])
  # The training input pipeline reads it.
  from sana_jax.data import input_pipeline

  assert input_pipeline.dataset_shapes(str(out))["buckets"] == [(32, 32)]
  # Nothing but the dataset is left in --out (no temporary folders, downloads/, .config).
  assert sorted(p.name for p in out.iterdir()) == ["sana_latents"]

  # The real command refuses to write over it (issue 16: it kept the old data, showed
  # "encode 0/50" and printed "wrote dataset"); --overwrite replaces it once complete.
  before = cli_contract.snapshot(out)
  refused = cli_contract.run_command(
    [
      "-m",
      "sana_jax.data.preprocess",
      "--model",
      str(model),
      "--out",
      str(out),
      "--name",
      "s",
      "--num",
      "4",
    ]
  )
  cli_contract.assert_refused(refused, "--out", "--overwrite", "'s'")
  cli_contract.assert_unchanged(before)
  assert (
    preprocess.main(
      [
        "--model",
        str(model),
        "--out",
        str(out),
        "--num",
        "4",
        "--seed",
        "3",
        "--name",
        "s",
        "--batch_size",
        "4",
        "--overwrite",
        "--no_progress",
      ]
    )
    == 0
  )
  recs = _records(version)["train_32x32"]
  assert [r["text"].decode() for r in recs] == prompts[:4]
  assert sorted(p.name for p in out.iterdir()) == ["sana_latents"]
  assert sorted(p.name for p in (out / "sana_latents").iterdir()) == ["s"]


def test_two_shards_hold_exactly_the_unsharded_examples(model, images, tmp_path, capsys):
  """--shard 0/2 and 1/2 (two hosts) join into one dataset equal, record for record, to one
  unsharded run: same splits, same order, same arrays; each image encoded once."""
  common = [
    "--model",
    str(model),
    "--source",
    "folder",
    "--images",
    str(images),
    "--buckets",
    BUCKETS,
    "--name",
    "f",
    "--batch_size",
    "4",
    "--no_progress",
  ]
  whole = tmp_path / "whole"
  assert preprocess.main([*common, "--out", str(whole)]) == 0
  ref = _records(latents_tfds.version_dir(whole, "f"))
  assert {k: len(v) for k, v in ref.items()} == {
    "train_32x32": 3,
    "train_32x64": 2,
    "train_64x32": 2,
  }
  # Each image in its nearest bucket, centre-cropped (pixel latents are the image / 127.5 - 1).
  texts = {s: [r["text"].decode() for r in v] for s, v in ref.items()}
  assert texts["train_32x64"] == ["a blue square", "a red square above a blue circle"]
  im0 = np.asarray(Image.open(images / "im0.png").resize((32, 32), Image.BICUBIC), np.float32)
  np.testing.assert_allclose(ref["train_32x32"][0]["latent"], im0 / 127.5 - 1, atol=1e-6)

  parts = tmp_path / "parts"
  assert preprocess.main([*common, "--out", str(parts), "--shard", "0/2"]) == 0
  first = capsys.readouterr().out
  assert "wrote part 0 of 2" in first and "missing: [1]" in first
  assert latents_tfds.existing_dataset(parts, "f") is None  # not a dataset until joined
  assert preprocess.main([*common, "--out", str(parts), "--shard", "1/2"]) == 0
  assert "joined all 2 parts" in capsys.readouterr().out
  got = _records(latents_tfds.version_dir(parts, "f"))
  assert list(got) == list(ref)
  for split in ref:
    assert [r["text"] for r in got[split]] == [r["text"] for r in ref[split]]
    for a, b in zip(got[split], ref[split]):
      for key in ("latent", "caption", "caption_mask"):
        np.testing.assert_array_equal(a[key], b[key])
  np.testing.assert_array_equal(
    np.load(latents_tfds.version_dir(parts, "f") / "null_caption.npz")["caption"],
    np.load(latents_tfds.version_dir(whole, "f") / "null_caption.npz")["caption"],
  )
  info = json.loads((latents_tfds.version_dir(parts, "f") / "dataset_info.json").read_text())
  assert all(len(s["shardLengths"]) >= 1 for s in info["splits"])
  assert sorted(p.name for p in parts.iterdir()) == ["sana_latents"]  # parts removed


def test_default_shard_under_jax_distributed_and_mismatched_parts(
  model, tmp_path, capsys, monkeypatch
):
  """Without --shard, a process of an initialised jax.distributed run writes the part of
  its process index; parts written with other settings are refused, not joined."""
  import jax
  from sana_jax import parallel

  monkeypatch.setattr(parallel, "maybe_initialize_distributed", lambda: True)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  out = tmp_path / "d"
  base = [
    "--model",
    str(model),
    "--out",
    str(out),
    "--num",
    "4",
    "--batch_size",
    "4",
    "--no_progress",
  ]
  assert preprocess.main([*base, "--seed", "1"]) == 0
  assert "wrote part 0 of 2" in capsys.readouterr().out
  assert preprocess.main([*base, "--shard", "1/2", "--seed", "2"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "seed" in err and "'1'" in err and "'2'" in err
  assert latents_tfds.existing_dataset(out, "shapes32") is None


def test_every_option_states_its_default():
  for action in preprocess.build_parser()._actions:  # pylint: disable=protected-access
    if action.dest == "help":
      continue
    assert action.help and ("default" in action.help or "required" in action.help), (
      f"{action.option_strings}: {action.help!r}"
    )


def _bad_inputs(model, images, tmp_path):
  """(argv, fragments the error must name) for each bad input."""
  existing = tmp_path / "existing"
  latents_tfds.write_dataset(
    lambda: iter(
      [
        {
          "latent": np.zeros((32, 32, 3)),
          "caption": np.zeros((10, 28)),
          "caption_mask": np.ones(10),
          "text": "x",
        }
      ]
    ),
    str(existing),
    "shapes32",
    buckets=[(32, 32)],
    channels=3,
    caption_len=10,
    caption_channels=28,
    null_caption=np.zeros((10, 28)),
    null_mask=np.ones(10),
  )
  empty = tmp_path / "empty"
  empty.mkdir()
  no_caption = tmp_path / "no_caption"
  no_caption.mkdir()
  Image.new("RGB", (8, 8)).save(no_caption / "a.png")
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "a.png").write_bytes(b"not a png")
  (broken / "a.txt").write_text("a star")
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  bare = tmp_path / "bare_model"
  bare.mkdir()
  no_te = tmp_path / "no_text_encoder"
  no_te.mkdir()
  (no_te / "pipeline.json").write_text((model / "pipeline.json").read_text())
  out = str(tmp_path / "out")
  m = ["--model", str(model)]
  folder = [*m, "--out", out, "--source", "folder", "--images", str(images)]
  return {
    "existing dataset": ([*m, "--out", str(existing), "--num", "5"], ["--out", "--overwrite"]),
    "num 0": ([*m, "--out", out, "--num", "0"], ["--num", "0"]),
    "num negative": ([*m, "--out", out, "--num", "-5"], ["--num", "-5"]),
    "num not int": ([*m, "--out", out, "--num", "many"], ["--num", "many"]),
    "shard index = count": ([*m, "--out", out, "--shard", "2/2"], ["--shard", "2/2"]),
    "shard count 0": ([*m, "--out", out, "--shard", "0/0"], ["--shard", "0/0"]),
    "shard garbage": ([*m, "--out", out, "--shard", "x"], ["--shard", "x"]),
    "more shards than examples": (
      [*m, "--out", out, "--num", "3", "--shard", "0/4"],
      ["--shard", "0/4", "3 examples"],
    ),
    "batch_size 0": ([*m, "--out", out, "--batch_size", "0"], ["--batch_size", "0"]),
    "model missing": (["--model", str(tmp_path / "nope"), "--out", out], ["--model", "nope"]),
    "model not a model folder": (
      ["--model", str(bare), "--out", out],
      ["--model", "pipeline.json"],
    ),
    "model without text encoder": (
      ["--model", str(no_te), "--out", out],
      ["--model", "text_encoder"],
    ),
    "out is a file": ([*m, "--out", str(a_file)], ["--out", "a_file"]),
    "bad name": ([*m, "--out", out, "--name", "a/b"], ["--name", "a/b"]),
    "folder without images": ([*m, "--out", out, "--source", "folder"], ["--images"]),
    "images missing": (
      [*m, "--out", out, "--source", "folder", "--images", str(tmp_path / "nope")],
      ["--images", "nope"],
    ),
    "images empty": (
      [*m, "--out", out, "--source", "folder", "--images", str(empty)],
      ["--images", "empty"],
    ),
    "image without caption": (
      [*m, "--out", out, "--source", "folder", "--images", str(no_caption)],
      ["a.png", "a.txt"],
    ),
    "unreadable image": (
      [*m, "--out", out, "--source", "folder", "--images", str(broken)],
      ["a.png", "not a readable image"],
    ),
    "bucket malformed": ([*folder, "--buckets", "32x"], ["--buckets", "32x"]),
    "bucket zero": ([*folder, "--buckets", "0x32"], ["--buckets", "0x32"]),
    "images with shapes": (
      [*m, "--out", out, "--images", str(images)],
      ["--images", "--source folder"],
    ),
    "buckets with shapes": (
      [*m, "--out", out, "--buckets", "32x32"],
      ["--buckets", "--source folder"],
    ),
    "unknown source": ([*m, "--out", out, "--source", "web"], ["--source", "web"]),
  }


CASES = [
  "existing dataset",
  "num 0",
  "num negative",
  "num not int",
  "shard index = count",
  "shard count 0",
  "shard garbage",
  "more shards than examples",
  "batch_size 0",
  "model missing",
  "model not a model folder",
  "model without text encoder",
  "out is a file",
  "bad name",
  "folder without images",
  "images missing",
  "images empty",
  "image without caption",
  "unreadable image",
  "bucket malformed",
  "bucket zero",
  "images with shapes",
  "buckets with shapes",
  "unknown source",
]


@pytest.mark.contract
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_before_any_model_loads(
  case, model, images, tmp_path, monkeypatch, capsys
):
  argv, fragments = _bad_inputs(model, images, tmp_path)[case]

  def no_model(*a, **k):
    raise AssertionError("a model was loaded before the arguments were checked")

  monkeypatch.setattr(preprocess, "_encoders", no_model)
  before = cli_contract.snapshot(tmp_path, model, images)
  result = cli_contract.call_main(preprocess.main, argv, capsys)
  cli_contract.assert_refused(result, *fragments)
  cli_contract.assert_unchanged(before)
