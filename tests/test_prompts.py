"""Prompt encoding: parity with diffusers SanaPipeline.encode_prompt, tokenizer helpers."""

import inspect
import os

import numpy as np
import pytest
import torch
from diffusers import SanaPipeline
from transformers import AutoTokenizer
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2Model

from sana_jax.data.tokenizer import build_word_level_tokenizer, words_of
from sana_jax.models import prompts as P
from sana_jax.weights import gemma as gw

DIFFUSERS_CHI = tuple(
  inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
)
PROMPTS = [
  "A red circle on the left",  # short: padded
  "  a blue square above " + "a green triangle and " * 12 + "a cat",  # longer than 24
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Tiny random Gemma-2 (sliding window 7 < every sequence) and a word-level tokenizer
  over the CHI + prompt words, saved to a folder and loaded back by our loader."""
  folder = str(tmp_path_factory.mktemp("tok"))
  vocab = words_of(
    list(DIFFUSERS_CHI) + list(P.COMPLEX_HUMAN_INSTRUCTION) + [p.lower() for p in PROMPTS]
  )
  build_word_level_tokenizer(vocab[:-3], folder)  # a few words stay <unk>
  tok = P.load_tokenizer(folder)
  cfg = HFConfig(
    vocab_size=len(tok) + 7,
    hidden_size=42,
    intermediate_size=56,
    num_hidden_layers=3,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=10,
    sliding_window=7,
    query_pre_attn_scalar=10,
    attn_logit_softcapping=4.0,
  )
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  model = Gemma2Model(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, 0.3 if "norm" in name else 0.2)
  mcfg = gw.config_from_hf(cfg.to_dict())
  params = gw.hf_to_params({k: v.numpy() for k, v in model.state_dict().items()}, mcfg)
  pipe = SanaPipeline(tokenizer=tok, text_encoder=model, vae=None, transformer=None, scheduler=None)
  return dict(tok=tok, model=model, mcfg=mcfg, params=params, pipe=pipe, folder=folder)


def rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("max_length", [24, 300])
def test_parity_with_diffusers_encode_prompt(setup, max_length):
  with torch.no_grad():
    pe, pm, ne, nm = setup["pipe"].encode_prompt(
      PROMPTS,
      do_classifier_free_guidance=True,
      negative_prompt="",
      device=torch.device("cpu"),
      max_sequence_length=max_length,
      complex_human_instruction=list(DIFFUSERS_CHI),
    )
  cfg = P.PromptConfig(max_length=max_length, chi=DIFFUSERS_CHI, lowercase=True)
  enc = P.PromptEncoder.from_params(setup["tok"], setup["mcfg"], setup["params"], cfg)

  emb, mask = enc.encode(PROMPTS)
  assert emb.shape == (2, max_length, 42) and mask.shape == (2, max_length)
  np.testing.assert_array_equal(mask, pm.numpy())
  assert rel(emb, pe.numpy()) <= 1e-5
  if max_length == 24:  # the long prompt was truncated, the short one padded
    assert mask[1].all() and not mask[0].all()
  else:
    assert not mask.all(axis=1).any()

  null, null_mask = enc.encode_null(2)
  assert null.shape == (2, max_length, 42)
  np.testing.assert_array_equal(null_mask, nm.numpy())
  assert null_mask.sum(1).tolist() == [1, 1]  # just <bos>
  assert rel(null, ne.numpy()) <= 1e-5


def test_lengths_and_selection(setup):
  tok = setup["tok"]
  cfg = P.PromptConfig(max_length=24, chi=DIFFUSERS_CHI)
  n_chi = len(tok.encode("\n".join(DIFFUSERS_CHI)))
  ids, mask = P.tokenize(tok, PROMPTS, cfg)
  assert ids.shape == mask.shape == (2, n_chi + 24 - 2)
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(P.select_index(10, 4), [0, 7, 8, 9])
  ids, mask = P.tokenize(tok, [""], cfg, use_chi=False)
  assert ids.shape == (1, 24) and ids[0, 0] == tok.bos_token_id and mask.sum() == 1
  with pytest.raises(ValueError, match="cannot keep 5 positions of a 4-token"):
    P.select_index(4, 5)


def test_default_chi_is_official_text():
  # Official yaml == diffusers' default except the quotes around "Enhanced prompt".
  official = tuple(s.replace("'Enhanced prompt'", '"Enhanced prompt"') for s in DIFFUSERS_CHI)
  assert P.COMPLEX_HUMAN_INSTRUCTION == official
  assert P.PromptConfig().chi == official and P.PromptConfig().max_length == 300


def test_official_mode_keeps_case(setup):
  tok = setup["tok"]
  lower = P.tokenize(tok, ["A Red circle"], P.PromptConfig(chi=None, lowercase=True))[0]
  keep = P.tokenize(tok, ["A Red circle"], P.PromptConfig(chi=None, lowercase=False))[0]
  assert tok.unk_token_id in keep[0] and tok.unk_token_id not in lower[0]


def test_prompt_encoder_from_folders(setup, tmp_path):
  setup["model"].save_pretrained(tmp_path / "hf")
  gw.save_params(setup["params"], setup["mcfg"], str(tmp_path / "ours"))
  cfg = P.PromptConfig(max_length=24, chi=DIFFUSERS_CHI)
  a = P.PromptEncoder.from_folders(setup["folder"], str(tmp_path / "hf"), cfg)
  b = P.PromptEncoder.from_folders(setup["folder"], str(tmp_path / "ours"), cfg)
  ea, ma = a.encode(PROMPTS[:1])
  eb, mb = b.encode(PROMPTS[:1])
  np.testing.assert_array_equal(ma, mb)
  np.testing.assert_allclose(ea, eb, rtol=0, atol=1e-6)


def test_word_level_tokenizer_folder(tmp_path):
  words = ["red", "green", "circle", "square", "left", "of", "the", "a", ","]
  build_word_level_tokenizer(words, str(tmp_path / "t"), lowercase=True)
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
  assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert len(tok) == 4 + len(words)
  enc = tok(["A red circle, left of the Green square", "blue"], padding="max_length", max_length=12)
  assert enc["input_ids"][0][:10] == [2, 11, 4, 6, 12, 8, 9, 10, 5, 7]
  assert enc["input_ids"][1][:3] == [2, 3, 0] and sum(enc["attention_mask"][1]) == 2
  with pytest.raises(ValueError, match="would split or change"):
    build_word_level_tokenizer(["red-ish", "two words"])


def test_load_tokenizer_errors(tmp_path):
  """Each way a tokenizer folder can be wrong has its own error type and message naming
  the folder; nothing is written into it."""
  from tokenizers import Tokenizer, models
  from transformers import PreTrainedTokenizerFast

  missing = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match=f"tokenizer folder '{missing}' does not exist"):
    P.load_tokenizer(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(
    FileNotFoundError,
    match=f"tokenizer folder '{empty}' holds no tokenizer .none of "
    "tokenizer.json, tokenizer_config.json",
  ):
    P.load_tokenizer(str(empty))
  assert not os.listdir(empty)
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match=f"tokenizer folder '{broken}' could not be loaded"):
    P.load_tokenizer(str(broken))
  assert os.listdir(broken) == ["tokenizer.json"]
  no_pad = tmp_path / "no_pad"  # a real tokenizer without a pad token
  PreTrainedTokenizerFast(
    tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "red": 1}, unk_token="<unk>"))
  ).save_pretrained(str(no_pad))
  with pytest.raises(ValueError, match=f"tokenizer in '{no_pad}' has no pad token"):
    P.load_tokenizer(str(no_pad))


def test_prompt_problems_name_cut_prompts_and_unknown_words(setup, tmp_path):
  """A prompt past max_length is named with the words cut (exactly the tokens tokenize()
  drops), an unknown word by name; the encoder warns once per problem."""
  import warnings

  words = ["a", "blue", "square", "above", "green", "triangle", "and", "cat", "red", "circle"]
  build_word_level_tokenizer(words, str(tmp_path / "t"), lowercase=True)
  tok = P.load_tokenizer(str(tmp_path / "t"))
  cfg = P.PromptConfig(max_length=8, chi=None, lowercase=True)
  long = "A blue square above a green triangle and a cat"  # <bos> + 10 words
  msgs = P.prompt_problems(tok, [long, "a red hexagon", "a red circle"], cfg)
  ids, _ = P.tokenize(tok, [long], cfg, use_chi=False)
  assert tok.decode(ids[0], skip_special_tokens=True) == "a blue square above a green triangle"
  assert msgs == [
    f"prompt {long!r} is longer than the 8 caption tokens the model reads (max_length); "
    "cut: 'and a cat'",
    "prompt 'a red hexagon': the tokenizer does not know 'hexagon' (read as '<unk>')",
  ]
  with_chi = P.PromptConfig(max_length=8, chi=("a blue square", "and a red"), lowercase=True)
  assert "cut: 'and a cat'" in P.prompt_problems(tok, [long], with_chi)[0]  # after the CHI
  assert P.prompt_problems(tok, ["a red circle"], cfg) == []
  enc = P.PromptEncoder.from_params(tok, setup["mcfg"], setup["params"], cfg)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    enc.encode([long, "a red hexagon", long])
    enc.encode(["a red hexagon"])
  assert [str(w.message) for w in caught if w.category is P.PromptWarning] == msgs


def test_tiny_shapes_encoder(tmp_path):
  """The tiny word-level setup other parts use: shapes captions, no CHI."""
  from sana_jax.models import text_encoder as te

  captions = ["a red circle left of a blue square", "a green triangle above a red square"]
  build_word_level_tokenizer(words_of(captions), str(tmp_path / "tok"))
  tok = P.load_tokenizer(str(tmp_path / "tok"))
  cfg = te.gemma2_tiny(len(tok))
  enc = P.PromptEncoder.from_params(
    tok, cfg, te.init_params(cfg, 1), P.PromptConfig(max_length=12, chi=None)
  )
  emb, mask = enc.encode(captions)
  assert emb.shape == (2, 12, 64) and mask.sum(1).tolist() == [9, 8]
  assert np.isfinite(emb).all() and not np.allclose(emb[0], emb[1])
