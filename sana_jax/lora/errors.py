"""Named errors for LoRA files that cannot be used. All are CheckpointError (a ValueError)."""

from sana_jax.weights.io import CheckpointError


class LoraError(CheckpointError):
  """A LoRA file or adapter tree that cannot be used."""


class LoraFormatError(LoraError):
  """Not a safetensors file, or a safetensors file that is not a LoRA (no lora_A/lora_B keys,
  unsupported variants such as DoRA or LoRA biases, malformed adapter metadata)."""


class LoraKeyError(LoraError):
  """Keys that name no adapter of a SANA transformer block, or an A without its B."""


class LoraRankError(LoraError):
  """lora_A and lora_B of one module disagree on the rank (or the metadata's rank does)."""


class LoraShapeError(LoraError):
  """A tensor of the wrong number of dimensions or trailing 1x1 of a conv."""


class LoraGeometryError(LoraError):
  """A LoRA made for another model: its in/out widths or its depth differ from the config."""
