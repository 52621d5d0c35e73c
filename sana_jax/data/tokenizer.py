"""Small word-level tokenizers built locally (tests, the shapes task).

`build_word_level_tokenizer(vocab, path)` writes a folder that
`transformers.AutoTokenizer.from_pretrained(path)` (and `sana_jax.models.prompts.
load_tokenizer`) loads: a `tokenizers` WordLevel model with Gemma's special-token ids
(<pad>=0, <eos>=1, <bos>=2, <unk>=3), whitespace/punctuation pre-tokenisation, a <bos>
prepended like Gemma's tokenizer, right padding.
"""

from __future__ import annotations

import os
from typing import Iterable

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0..3, as in Gemma


def _pre_tokenizer(lowercase: bool):
  from tokenizers import normalizers, pre_tokenizers

  norm = normalizers.Lowercase() if lowercase else None
  return norm, pre_tokenizers.Whitespace()


def words_of(texts: Iterable[str], lowercase: bool = False) -> list[str]:
  """Distinct words (in first-seen order) the pre-tokenizer splits `texts` into."""
  norm, pre = _pre_tokenizer(lowercase)
  seen: dict[str, None] = {}
  for t in texts:
    t = norm.normalize_str(t) if norm else t
    for w, _ in pre.pre_tokenize_str(t):
      seen.setdefault(w, None)
  return list(seen)


def build_word_level_tokenizer(
  vocab: list[str], path: str | None = None, lowercase: bool = False, model_max_length: int = 8192
):
  """Word-level `PreTrainedTokenizerFast` over `vocab`; saved to `path` if given.

  vocab: words; ids are 4 + position (duplicates dropped). Each word must survive
  pre-tokenisation unchanged (no spaces; letters/digits/_ or punctuation only), else a
  ValueError names it. Unknown words map to <unk>.
  """
  from tokenizers import Tokenizer, models, processors
  from transformers import PreTrainedTokenizerFast

  norm, pre = _pre_tokenizer(lowercase)
  ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  bad = []
  for w in vocab:
    if w in ids:
      continue
    pieces = [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(w) if norm else w)]
    if pieces != [w]:
      bad.append(f"{w!r} -> {pieces}")
    ids[w] = len(ids)
  if bad:
    raise ValueError(
      f"vocabulary words the tokenizer would split or change (lowercase={lowercase}): {bad}"
    )
  tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
  if norm is not None:
    tok.normalizer = norm
  tok.pre_tokenizer = pre
  tok.post_processor = processors.TemplateProcessing(
    single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", ids["<bos>"])]
  )
  fast = PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token="<bos>",
    eos_token="<eos>",
    pad_token="<pad>",
    unk_token="<unk>",
    padding_side="right",
    model_max_length=model_max_length,
  )
  if path is not None:
    os.makedirs(path, exist_ok=True)
    fast.save_pretrained(path)
  return fast
