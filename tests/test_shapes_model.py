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


def test_context_probe_tells_the_random_encoder_from_the_pretrained_one(tmp_path):
  # The numbers docs/shapes_model.md reports: a frozen random Gemma is nearly context-free
  # (swapped prompts are the same bag of vectors); the shipped, pre-trained one is not.
  from sana_jax.shapes_model import context_probe, init, shapes_config
  shipped = context_probe(DEFAULT_MODEL)
  assert shipped["same_word_cos"] < 0.9, shipped
  assert shipped["position bag_sim"] < 0.93 and shipped["colour binding bag_sim"] < 0.9, shipped
  config = shapes_config()
  config.text_encoder.pretrain.steps = 0
  init(tmp_path / "random", config)
  random = context_probe(tmp_path / "random")
  assert random["same_word_cos"] > 0.99 and random["position bag_sim"] > 0.99, random
  assert random["distinct_word_cos"] < 0.5, random


def test_pretraining_makes_word_order_readable_through_position_free_attention():
  # Same budget, same readout: training only the readout on the frozen random encoder
  # leaves most captions unreadable; training the encoder too makes them readable.
  from sana_jax import shapes_encoder
  from sana_jax.models import prompts, text_encoder
  from sana_jax.shapes_model import prompt_config, shapes_config, text_encoder_config
  config = shapes_config()
  tcfg = text_encoder_config(config)
  tok = prompts.load_tokenizer(str(DEFAULT_MODEL / "tokenizer"))
  pc = prompt_config(config.prompt.to_dict())
  measured = {}
  for train_encoder in (False, True):
    cfg = shapes_encoder.PretrainConfig(steps=300, batch=64, num_prompts=3000,
                                        train_encoder=train_encoder)
    _, measured[train_encoder] = shapes_encoder.pretrain(
        tcfg, text_encoder.init_params(tcfg, 0), tok, pc, cfg, progress=False)
  frozen, trained = measured[False], measured[True]
  assert trained["caption_accuracy"] > 0.8 and trained["context_accuracy"] > 0.8, measured
  assert frozen["caption_accuracy"] < trained["caption_accuracy"] - 0.4, measured
  assert frozen["context_accuracy"] < 0.6, measured
