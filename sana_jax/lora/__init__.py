"""LoRA adapters of the DiT outside the model: the diffusers/PEFT file format (export and
import, `sana_jax.lora.diffusers`) and folding an adapter into the base kernels
(`sana_jax.lora.merge`).

The adapters themselves live in the model (`DiTConfig.lora_rank / lora_alpha /
lora_targets`; leaves `lora_a` (L, in, [g,] r) and `lora_b` (L, [g,] r, out) beside each
targeted block kernel). docs/fine_tuning.md describes the whole workflow.
"""

from sana_jax.lora.errors import (  # noqa: F401
  LoraError,
  LoraFormatError,
  LoraGeometryError,
  LoraKeyError,
  LoraRankError,
  LoraShapeError,
)
