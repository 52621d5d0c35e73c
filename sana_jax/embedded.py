"""Paths of what ships inside the package: the embedded ShapesEval model and its prompts.

A leaf module (no imports from sana_jax) so that any layer may name the default model
folder without importing the ShapesEval task or the code that builds the model.
"""

import pathlib

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = ASSETS / "shapes_model"  # a sana_jax model folder (see shapes_eval.model)
SHAPES_EVAL_PROMPTS = ASSETS / "shapes_eval_prompts.jsonl"
