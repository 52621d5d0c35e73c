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
