"""The embedded default model: it loads, a 2-step sample runs, the evaluator scores it.

Quality is measured by `python -m sana_jax.eval.score_model` (see README), not here.
"""

import numpy as np

from sana_jax import bundle
from sana_jax.data import shapes
from sana_jax.eval import shapes as evaluator
from sana_jax.pipeline import SanaPipeline
from sana_jax.shapes_model import DEFAULT_MODEL


def test_shipped_model_samples_and_scores():
  folder, settings = bundle.check_folder(DEFAULT_MODEL)
  size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
  assert size < 8 * 2**20, f"the shipped model should stay a few MB, is {size / 2**20:.1f} MB"
  pipe = SanaPipeline.from_folder(folder)
  specs = shapes.eval_prompts()[::50][:6]  # one prompt of each category
  images = pipe.generate([s["prompt"] for s in specs], list(range(len(specs))),
                         options_steps(2))
  assert images.shape == (len(specs), settings["image_size"], settings["image_size"], 3)
  assert images.dtype == np.uint8
  results = [evaluator.evaluate(im, s) for im, s in zip(images, specs)]
  rep = evaluator.report(list(zip(specs, results)))
  assert rep["images"] == len(specs) and 0.0 <= rep["overall"] <= 1.0


def options_steps(n):
  from sana_jax.pipeline import SamplingOptions
  return SamplingOptions(steps=n)


def test_context_probe_tells_context_free_from_mixing_encoders(tmp_path):
  # The numbers docs/shapes_model.md reports: the shipped frozen random encoder is nearly
  # context-free; a 4-layer one with its token table scaled by 1/8 mixes in word order.
  from sana_jax.shapes_model import context_probe, init, shapes_config
  shipped = context_probe(DEFAULT_MODEL)
  assert shipped["same_word_cos"] > 0.99 and shipped["position bag_sim"] > 0.99, shipped
  config = shapes_config()
  config.text_encoder.num_layers, config.text_encoder.embed_scale = 4, 0.125
  init(tmp_path / "mixing", config)
  mixing = context_probe(tmp_path / "mixing")
  assert mixing["same_word_cos"] < 0.8 and mixing["position bag_sim"] < 0.95, mixing
  for probe in (shipped, mixing):
    assert probe["distinct_word_cos"] < 0.5, probe


def test_init_is_deterministic_and_matches_the_shipped_encoder(tmp_path):
  from sana_jax.shapes_model import init
  from sana_jax.weights import gemma
  init(tmp_path / "m")
  fresh, fresh_cfg = gemma.load_params(str(tmp_path / "m" / "text_encoder"))
  shipped, shipped_cfg = gemma.load_params(str(DEFAULT_MODEL / "text_encoder"))
  assert fresh_cfg == shipped_cfg
  flat_f = dict(jax_tree_leaves_with_path(fresh))
  flat_s = dict(jax_tree_leaves_with_path(shipped))
  assert flat_f.keys() == flat_s.keys()
  for k in flat_f:
    # Not bit-exact: XLA's compile flags (the suite's conftest lowers the CPU optimisation
    # level) move the random normal draw by an ulp.
    np.testing.assert_allclose(np.asarray(flat_f[k]), np.asarray(flat_s[k]), rtol=1e-6,
                               atol=1e-6, err_msg=k)


def jax_tree_leaves_with_path(tree):
  import jax
  return [(jax.tree_util.keystr(p), v) for p, v in jax.tree_util.tree_leaves_with_path(tree)]
