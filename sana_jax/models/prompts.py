"""Prompt encoding as SANA does it (REFERENCE.md section 3).

Conditional prompts: the complex human instruction (CHI) lines joined with "\\n", the
prompt appended directly; tokenised with right padding / truncation to
    max_length_all = len(tokenizer.encode(chi)) + max_length - 2
then encoded, and positions [0] + [-(max_length - 1) .. -1] of embeddings and mask kept
-> (B, max_length, D) float32 and (B, max_length) int32.
Null / negative caption: no CHI, padded to max_length, all positions kept.

The encoder is any callable `(input_ids (B, L) int32, mask (B, L) int32) -> (B, L, D)`,
e.g. `functools.partial(text_encoder.make_encode_fn(config), params)`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Callable, Sequence

import numpy as np

# The official SANA yaml text (double quotes around "Enhanced prompt"); diffusers'
# SanaPipeline default differs only by using single quotes there.
COMPLEX_HUMAN_INSTRUCTION: tuple[str, ...] = (
  'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual '
  "descriptions suitable for image generation. Evaluate the level of detail in the user "
  "prompt:",
  "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, "
  "textures, and spatial relationships to create vivid and concrete scenes.",
  "- If the prompt is already detailed, refine and enhance the existing details slightly "
  "without overcomplicating.",
  "Here are examples of how to transform or refine prompts:",
  "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a "
  "round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of "
  "blooming red flowers.",
  "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
  "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
  "double-decker bus passing by towering glass skyscrapers.",
  "Please generate only the enhanced description for the prompt below and avoid "
  "including any additional commentary or evaluations:",
  "User Prompt: ",
)

EncodeFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """max_length: caption tokens kept (300 in SANA). chi: instruction lines, or None /
  () for plain prompts. lowercase: diffusers lower-cases prompts (not the CHI), the
  official code only strips them. null_prompt: the unconditional caption."""

  max_length: int = 300
  chi: tuple[str, ...] | None = COMPLEX_HUMAN_INSTRUCTION
  lowercase: bool = False
  strip: bool = True
  null_prompt: str = ""

  def __post_init__(self):
    if self.chi is not None:
      object.__setattr__(self, "chi", tuple(self.chi))
    if self.max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {self.max_length}")


# Files a transformers tokenizer folder holds at least one of.
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "tokenizer.model",
  "vocab.json",
  "spiece.model",
)


class PromptWarning(UserWarning):
  """A prompt the model does not read whole: cut to max_length, or unknown words."""


def load_tokenizer(path: str):
  """transformers tokenizer from a local folder (never the network), right padding.

  Raises FileNotFoundError if the folder does not exist or holds none of
  TOKENIZER_FILES, ValueError if transformers cannot load it or it has no pad token."""
  from transformers import AutoTokenizer

  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist")
  if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise FileNotFoundError(
      f"tokenizer folder {path!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})"
    )
  try:
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"tokenizer folder {path!r} could not be loaded: {first}") from e
  if tok.pad_token is None:
    raise ValueError(f"tokenizer in {path!r} has no pad token; SANA pads to max_length")
  tok.padding_side = "right"
  return tok


def _preprocess(prompts: Sequence[str] | str, cfg: PromptConfig) -> list[str]:
  if isinstance(prompts, str):
    prompts = [prompts]
  out = []
  for p in prompts:
    if cfg.lowercase:
      p = p.lower()
    out.append(p.strip() if cfg.strip else p)
  return out


def chi_text(cfg: PromptConfig) -> str:
  return "\n".join(cfg.chi) if cfg.chi else ""


def tokenize(
  tokenizer, prompts: Sequence[str] | str, cfg: PromptConfig, use_chi: bool = True
) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and mask, (B, L_all) int32 each, right padded.

  L_all = len(encode(chi)) + max_length - 2 with the CHI, else max_length.
  """
  prompts = _preprocess(prompts, cfg)
  tokenizer.padding_side = "right"
  if use_chi and cfg.chi:
    chi = chi_text(cfg)
    prompts = [chi + p for p in prompts]
    length = len(tokenizer.encode(chi)) + cfg.max_length - 2
  else:
    length = cfg.max_length
  enc = tokenizer(
    prompts,
    padding="max_length",
    max_length=length,
    truncation=True,
    add_special_tokens=True,
    return_tensors="np",
  )
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def prompt_problems(tokenizer, prompts: Sequence[str] | str, cfg: PromptConfig) -> list[str]:
  """One message per prompt that the model does not read as written: longer than the
  tokens `tokenize` keeps (the rest is cut; the message names the dropped words), or with
  words the tokenizer maps to its unknown token (named). Empty for clean prompts."""
  if isinstance(prompts, str):
    prompts = [prompts]
  texts = _preprocess(prompts, cfg)
  chi = chi_text(cfg) if cfg.chi else ""
  n_prefix = len(tokenizer.encode(chi)) if chi else 0
  limit = (n_prefix + cfg.max_length - 2) if chi else cfg.max_length
  unk = getattr(tokenizer, "unk_token_id", None)
  out = []
  for original, text in zip(prompts, texts):
    ids = tokenizer(chi + text, add_special_tokens=True)["input_ids"]
    if len(ids) > limit:
      dropped = tokenizer.decode(ids[limit:], skip_special_tokens=True).strip()
      out.append(
        f"prompt {original!r} is longer than the {cfg.max_length} caption "
        f"tokens the model reads (max_length); cut: {dropped!r}"
      )
    if unk is None:
      continue
    try:
      enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
      words = [text[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # slow tokenizers
      enc = tokenizer(text, add_special_tokens=False)
      words = ["?" for i in enc["input_ids"] if i == unk]
    if words:
      names = ", ".join(repr(w) for w in dict.fromkeys(words))
      out.append(
        f"prompt {original!r}: the tokenizer does not know {names} (read as "
        f"{tokenizer.unk_token!r})"
      )
  return out


def select_index(length_all: int, max_length: int) -> np.ndarray:
  """[0] + the last (max_length - 1) positions of a length_all sequence."""
  if length_all < max_length:
    raise ValueError(f"cannot keep {max_length} positions of a {length_all}-token sequence")
  return np.concatenate([[0], np.arange(length_all - max_length + 1, length_all)])


def encode_prompts(
  encode_fn: EncodeFn, tokenizer, prompts: Sequence[str] | str, cfg: PromptConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Conditional captions -> embeddings (B, max_length, D) float32, mask (B, max_length)."""
  ids, mask = tokenize(tokenizer, prompts, cfg, use_chi=True)
  emb = np.asarray(encode_fn(ids, mask), dtype=np.float32)
  idx = select_index(ids.shape[1], cfg.max_length)
  return emb[:, idx], mask[:, idx]


def encode_negative(
  encode_fn: EncodeFn, tokenizer, prompts: Sequence[str] | str, cfg: PromptConfig
) -> tuple[np.ndarray, np.ndarray]:
  """Negative captions: no CHI, max_length tokens, all kept -> (B, M, D), (B, M)."""
  ids, mask = tokenize(tokenizer, prompts, cfg, use_chi=False)
  return np.asarray(encode_fn(ids, mask), dtype=np.float32), mask


def encode_null(
  encode_fn: EncodeFn, tokenizer, cfg: PromptConfig, batch_size: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """The null caption (cfg.null_prompt, "" in SANA) repeated batch_size times."""
  return encode_negative(encode_fn, tokenizer, [cfg.null_prompt] * batch_size, cfg)


@dataclasses.dataclass
class PromptEncoder:
  """Tokenizer + Gemma-2 params + config, with one jitted encoder.

  Example:
      enc = PromptEncoder.from_folders(tokenizer_dir, weights_dir)
      emb, mask = enc.encode(["a red circle"])          # (1, 300, 2304), (1, 300)
      null_emb, null_mask = enc.encode_null(1)
  """

  tokenizer: object
  encode_fn: EncodeFn
  config: PromptConfig = PromptConfig()
  warned: set = dataclasses.field(default_factory=set, repr=False, compare=False)

  @classmethod
  def from_params(cls, tokenizer, model_config, params, config: PromptConfig = PromptConfig()):
    import functools

    import jax

    from sana_jax.models.text_encoder import make_encode_fn

    params = jax.tree.map(jax.numpy.asarray, params)
    return cls(tokenizer, functools.partial(make_encode_fn(model_config), params), config)

  @classmethod
  def from_folders(
    cls,
    tokenizer_path: str,
    weights_path: str,
    config: PromptConfig = PromptConfig(),
    **model_overrides,
  ):
    """weights_path: our format (params.safetensors + config.json) or a transformers
    Gemma-2 folder (config.json + model.safetensors[.index.json])."""
    import dataclasses as dc

    from sana_jax.weights import gemma

    if os.path.isfile(os.path.join(weights_path, gemma.PARAMS_FILE)):
      params, mcfg = gemma.load_params(weights_path)
    else:
      params, mcfg = gemma.load_hf_folder(weights_path)
    mcfg = dc.replace(mcfg, **model_overrides)
    return cls.from_params(load_tokenizer(tokenizer_path), mcfg, params, config)

  MAX_WARNINGS = 10  # prompts named one by one; past that, one line says more exist

  def warn(self, prompts) -> list[str]:
    """Issues a PromptWarning for each of prompt_problems(prompts) this encoder has
    not warned about before (once per message over its lifetime, the first
    MAX_WARNINGS named, then one line saying further ones are not); returns them."""
    if len(self.warned) > self.MAX_WARNINGS:
      return []
    new = [
      m
      for m in dict.fromkeys(prompt_problems(self.tokenizer, prompts, self.config))
      if m not in self.warned
    ]
    for m in new:
      self.warned.add(m)
      if len(self.warned) > self.MAX_WARNINGS:
        m = (
          f"more than {self.MAX_WARNINGS} prompts are cut or have unknown words; "
          "further ones are not named"
        )
      warnings.warn(m, PromptWarning, stacklevel=3)
      if len(self.warned) > self.MAX_WARNINGS:
        break
    return new

  def encode(self, prompts):
    """Conditional captions (see encode_prompts); warns once about cut prompts and
    unknown words (PromptWarning)."""
    self.warn(prompts)
    return encode_prompts(self.encode_fn, self.tokenizer, prompts, self.config)

  def encode_negative(self, prompts):
    return encode_negative(self.encode_fn, self.tokenizer, prompts, self.config)

  def encode_null(self, batch_size: int = 1):
    return encode_null(self.encode_fn, self.tokenizer, self.config, batch_size)
