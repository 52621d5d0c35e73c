"""ShapesEval data: specs and captions, the renderer, the evaluation prompt set and its
disjointness from training captions, and the TFDS ArrayRecord builder (read back with
tfds.data_source, no TensorFlow)."""

import collections
import importlib.util
import itertools
import json
import os
import sys

import numpy as np
import pytest

from sana_jax.shapes_eval import task as S

NUMBER_WORDS = {
  1: ("one", "1", "a", "single"),
  2: ("two", "2"),
  3: ("three", "3"),
  4: ("four", "4"),
}


def test_constants():
  assert len(S.SHAPES) >= 4 and len(set(S.SHAPES)) == len(S.SHAPES)
  assert len(S.COLORS) >= 6
  assert S.CATEGORIES == (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
  )
  rgb = np.array(list(S.COLORS.values()), np.float64)
  dists = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
  assert min(dists) > 120, dists  # well separated
  assert np.linalg.norm(rgb - np.array(S.BACKGROUND), axis=1).min() > 150


@pytest.mark.parametrize("category", S.CATEGORIES)
def test_sample_spec_is_geneval_metadata_and_caption_is_faithful(category):
  rng = np.random.default_rng(0)
  wordings = set()
  for _ in range(300):
    spec = S.sample_spec(category, rng)
    assert spec["tag"] == category
    assert set(spec) <= {"tag", "include", "exclude", "prompt"}
    json.loads(json.dumps(spec))  # plain JSON
    words = spec["prompt"].split()
    for req in spec["include"]:
      assert req["class"] in S.SHAPES and 1 <= req["count"] <= 4
      assert set(req) <= {"class", "count", "color", "position"}
      assert req["class"] in words or S._plural(req["class"]) in words, spec
      if "color" in req:
        assert req["color"] in words, spec
      assert any(w in words for w in NUMBER_WORDS[req["count"]]), spec
    # Colours named in the prompt are exactly the spec's colours.
    assert {w for w in words if w in S.COLORS} == {
      r["color"] for r in spec["include"] if "color" in r
    }
    if category == "counting":
      (req,) = spec["include"]
      assert spec["exclude"] == [{"class": req["class"], "count": req["count"] + 1}]
      assert req["count"] in S.COUNTING_RANGE
    if category == "position":
      rel, ref = spec["include"][1]["position"]
      assert ref == 0 and rel in S.RELATIONS
      first = spec["prompt"].index(spec["include"][1]["class"])
      assert first < spec["prompt"].index(spec["include"][0]["class"]), spec  # "<obj> <rel> <ref>"
    if category in ("two_object", "position", "color_attr"):
      assert spec["include"][0]["class"] != spec["include"][1]["class"]
    if category == "color_attr":
      assert spec["include"][0]["color"] != spec["include"][1]["color"]
    wordings.add(S.normalize_prompt(spec["prompt"]))
  assert len(wordings) > 40  # varied templates


def test_render_shapes_dtype_determinism():
  spec = S.sample_spec("counting", np.random.default_rng(3))
  for size in (32, 64, 128):
    a = S.render(spec, size, np.random.default_rng(5))
    b = S.render(spec, size, np.random.default_rng(5))
    c = S.render(spec, size, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == (size, size, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Plain background on the border ring and most of the image.
    assert (a[0] == 255).all() and (a[-1] == 255).all()
    assert (a == 255).all(-1).mean() > 0.4
  with pytest.raises(ValueError, match="image_size"):
    S.render(spec, 8, np.random.default_rng(0))
  with pytest.raises(ValueError, match="class"):
    S.render({"tag": "x", "include": [{"class": "dog", "count": 1}]}, 32, np.random.default_rng(0))


def test_layout_sizes_gaps_and_relations():
  """Objects lie inside the image, >= 7 px, apart from each other; relations hold by a margin."""
  for i in range(300):
    rng = np.random.default_rng(i)
    spec = S.sample_spec(S.CATEGORIES[i % 6], rng)
    size = (32, 64, 128)[i % 3]
    objs = S.layout(spec, size, rng)
    assert len(objs) == sum(r["count"] for r in spec["include"])
    for o in objs:
      x0, y0, x1, y1 = o["box"]
      assert 1 <= x0 and x1 <= size - 1 and 1 <= y0 and y1 <= size - 1
      assert x1 - x0 >= S.MIN_SIZE_PX and x1 - x0 == pytest.approx(y1 - y0)
    for a, b in itertools.combinations([o["box"] for o in objs], 2):
      gap = max(a[0] - b[2], b[0] - a[2], a[1] - b[3], b[1] - a[3])
      assert gap >= 2.0
    if spec["tag"] == "position":
      rel = spec["include"][1]["position"][0]
      assert S.relation_strength(objs[1]["box"], objs[0]["box"])[rel] >= 0.75
    for o, req in zip(objs, spec["include"]):
      if "color" in req and spec["tag"] != "counting":
        assert o["color"] == req["color"]


def test_shape_pixels_follow_geometry():
  """The rendered coverage of each class has its analytic area (pi/4, 1, 1/2, cross)."""
  expected = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "cross": 2 * S.CROSS_ARM - S.CROSS_ARM**2,
  }
  for shape, frac in expected.items():
    cov = S.coverage(shape, 30.3, 29.6, 40.0, 40.0, 0, 0, 64, 64, ss=8)
    assert cov.sum() == pytest.approx(frac * 1600, rel=0.01), shape


def test_eval_prompt_file_is_balanced_unique_and_reproducible():
  with open(S.EVAL_PROMPTS_PATH) as f:
    shipped = [json.loads(line) for line in f]
  assert shipped == S.make_eval_prompts()  # regenerate with --write-eval-prompts
  assert shipped == S.eval_prompts()
  counts = collections.Counter(s["tag"] for s in shipped)
  assert counts == {c: S.EVAL_PER_CATEGORY for c in S.CATEGORIES}
  assert 200 <= len(shipped) <= 600
  keys = [S.normalize_prompt(s["prompt"]) for s in shipped]
  assert len(set(keys)) == len(keys)
  # Content varies inside each category too (e.g. every shape appears in single_object).
  assert {s["include"][0]["class"] for s in shipped if s["tag"] == "single_object"} == set(S.SHAPES)
  assert {s["include"][0]["count"] for s in shipped if s["tag"] == "counting"} == set(
    S.COUNTING_RANGE
  )


def test_training_captions_are_disjoint_from_eval_prompts():
  banned = {S.normalize_prompt(s["prompt"]) for s in S.eval_prompts()}
  hits_without_exclusion = 0
  for ci, cat in enumerate(S.CATEGORIES):
    rng = np.random.default_rng([11, ci])
    rng_free = np.random.default_rng([11, ci])
    for _ in range(1500):
      assert S.normalize_prompt(S.sample_spec(cat, rng)["prompt"]) not in banned
      free = S.sample_spec(cat, rng_free, exclude_eval_prompts=False)
      hits_without_exclusion += S.normalize_prompt(free["prompt"]) in banned
  # The exclusion does real work: the same grammar hits eval prompts when unfiltered.
  assert hits_without_exclusion > 50
  # And the training stream the TFDS builder writes uses the filtered sampler.
  for i in range(600):
    assert S.normalize_prompt(S.example(i, 32)["caption"]) not in banned


def test_validation_prompts_are_disjoint_from_eval_prompts():
  banned = {S.normalize_prompt(s["prompt"]) for s in S.eval_prompts()}
  val = S.make_eval_prompts(20, S.VALIDATION_SEED, exclude_eval_prompts=True)
  assert [s["tag"] for s in val] == [c for c in S.CATEGORIES for _ in range(20)]
  assert not {S.normalize_prompt(s["prompt"]) for s in val} & banned


def test_grid_cli(tmp_path):
  out = tmp_path / "grid.png"
  S.main(["--grid", str(out), "--image-size", "32", "--per-category", "2"])
  from PIL import Image

  im = Image.open(out)
  assert im.mode == "RGB" and im.size[0] > 2 * 64 and im.size[1] > 6 * 64


# ----------------------------------------------------------------------------- TFDS


def _build(data_dir, image_size=32, num_train=60, seed=1):
  from sana_jax.shapes_eval import tfds_builder as shapes_tfds

  cfg = shapes_tfds.make_config(image_size, num_train, seed)
  builder = shapes_tfds.ShapesEval(config=cfg, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def _record_files(data_dir):
  out = {}
  for root, _, files in os.walk(data_dir):
    for f in files:
      if ".array_record" in f:
        with open(os.path.join(root, f), "rb") as fh:
          out[f] = fh.read()
  return out


def test_tfds_builder_writes_array_record_readable_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds
  from sana_jax.shapes_eval import tfds_builder as shapes_tfds

  _build(tmp_path / "a")
  files = _record_files(tmp_path / "a")
  assert sorted(files) == [
    "shapes_eval-eval.array_record-00000-of-00001",
    "shapes_eval-train.array_record-00000-of-00001",
  ]
  ds = tfds.data_source("shapes_eval/32px_n60_s1", data_dir=str(tmp_path / "a"))
  train, evals = ds["train"], ds["eval"]
  assert len(train) == 60 and len(evals) == len(S.eval_prompts())

  # Record i is example i of the pure-numpy generator (stored in key order).
  seen = collections.Counter()
  for i in range(len(train)):
    rec = shapes_tfds.decode(train[i])
    ex = S.example(i, 32, seed=1)
    assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
    np.testing.assert_array_equal(rec["image"], ex["image"])
    assert rec["spec"] == ex["spec"]
    assert rec["caption"] == ex["caption"] == rec["spec"]["prompt"]
    assert rec["category"] == ex["category"] == rec["spec"]["tag"]
    seen[rec["category"]] += 1
  assert seen == {c: 10 for c in S.CATEGORIES}  # balanced

  # The eval split renders the evaluation prompts, in order; the evaluator passes them.
  from sana_jax.shapes_eval import evaluator as E

  eval_specs = S.eval_prompts()
  for i in range(len(evals)):
    rec = shapes_tfds.decode(evals[i])
    assert rec["spec"] == eval_specs[i]
    if i % 10 == 0:
      assert E.evaluate(rec["image"], rec["spec"]).correct
  train_keys = {S.normalize_prompt(shapes_tfds.decode(train[i])["caption"]) for i in range(60)}
  assert not train_keys & {S.normalize_prompt(s["prompt"]) for s in eval_specs}

  if importlib.util.find_spec("tensorflow") is None:
    assert "tensorflow" not in sys.modules  # the whole round trip ran without TensorFlow


def test_tfds_builder_is_deterministic(tmp_path):
  a = _record_files(_build(tmp_path / "a").data_dir)
  b = _record_files(_build(tmp_path / "b").data_dir)
  c = _record_files(_build(tmp_path / "c", seed=2).data_dir)
  assert a == b  # same seed, same bytes
  assert (
    a["shapes_eval-train.array_record-00000-of-00001"]
    != c["shapes_eval-train.array_record-00000-of-00001"]
  )


def test_tfds_registered_configs():
  from sana_jax.shapes_eval import tfds_builder as shapes_tfds

  sizes = {c.name: c.image_size for c in shapes_tfds.ShapesEval.BUILDER_CONFIGS}
  assert sizes == {"32px": 32, "64px": 64, "128px": 128}
  b = shapes_tfds.ShapesEval(config="128px", data_dir="/nonexistent-not-written")
  assert b.info.features["image"].shape == (128, 128, 3)
  assert b.builder_config.num_train == shapes_tfds.DEFAULT_NUM_TRAIN


def test_all_specs_and_vocabulary_cover_the_grammar():
  vocab = set(S.vocabulary())
  assert {"circle", "crosses", "purple", "left", "above", "three", "4"} <= vocab
  for ci, cat in enumerate(S.CATEGORIES):
    support = {json.dumps(s, sort_keys=True) for s in S.all_specs(cat)}
    rng = np.random.default_rng([5, ci])
    for _ in range(400):
      spec = S.sample_spec(cat, rng)
      assert set(spec["prompt"].split()) <= vocab, spec["prompt"]
      content = {k: v for k, v in spec.items() if k != "prompt"}
      assert json.dumps(content, sort_keys=True) in support
  for spec in S.eval_prompts():
    assert set(spec["prompt"].split()) <= vocab
  assert len(S.all_specs("color_attr")) == 4 * 3 * 6 * 5
