"""ShapesEval: the GenEval-style shapes task and the small SANA model embedded for it.

  task          the task: shape/colour/count/position specifications, prompts, rendering
  tfds_builder  the TFDS (ArrayRecord) builder of rendered training images
  evaluator     the pixel-level detector and GenEval's scoring rules
  score         scoring a model folder: one image per prompt, and best-of-N
  model         building and exporting the embedded model folder (sana_jax/assets/shapes_model)
  encoder       pre-training of that model's tiny caption encoder

The old module paths (sana_jax.data.shapes, sana_jax.data.shapes_tfds, sana_jax.eval.shapes,
sana_jax.eval.score_model, sana_jax.shapes_model, sana_jax.shapes_encoder) are aliases of
these modules for one release; their `python -m` commands still work.
"""
