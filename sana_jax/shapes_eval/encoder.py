"""Pre-training of the shapes model's tiny caption encoder: word order made readable.

The DiT reads the caption only through cross-attention, which sees the caption tokens as
an unordered set: word order must already be inside each token's vector. A random Gemma
does not put it there (`shapes_model probe`), and the real SANA gets it from a trained
Gemma-2. This module trains the tiny Gemma-2-architecture encoder for that property alone:
a readout that, like the DiT, attends to the encoder's outputs **without** any position on
the caption side must recover the word at every position (one learned query per position,
multi-head attention over the masked outputs, a linear layer onto the vocabulary). It can
only succeed if the outputs carry which word sits where, e.g. which colour belongs to which
shape and which shape is left of which. The readout is thrown away; the encoder is then
frozen and shipped like SANA's Gemma.

  prompts -> tokenizer -> Gemma2Encoder (trained) -> (B, L, D)
                                 -> position-free readout -> word at each position (CE)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from sana_jax.models import text_encoder


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 3000
  batch: int = 128
  lr: float = 3e-3
  num_prompts: int = 20000  # training captions, drawn like the training data's
  readout_heads: int = 4
  readout_width: int = 64
  context_words: int = 6  # each token also names the words before it (linear heads)
  seed: int = 0
  train_encoder: bool = True  # False: only the readout learns (the frozen-encoder baseline)


def training_captions(num: int, seed: int) -> list[str]:
  """`num` captions from the training grammar (categories cycled, evaluation prompts
  excluded), as the DiT's training data draws them."""
  from sana_jax.shapes_eval import task as shapes

  rng = np.random.default_rng([seed, 7])
  return [
    shapes.sample_spec(shapes.CATEGORIES[i % len(shapes.CATEGORIES)], rng)["prompt"]
    for i in range(num)
  ]


def init_readout(key: jax.Array, length: int, width: int, vocab: int, cfg: PretrainConfig):
  kq, kk, kv, ko, kc = jax.random.split(key, 5)
  w = cfg.readout_width
  return {
    "context": jax.random.normal(kc, (cfg.context_words, width, vocab)) / np.sqrt(width),
    "queries": jax.random.normal(kq, (length, w)),
    "w_k": jax.random.normal(kk, (width, w)) / np.sqrt(width),
    "w_v": jax.random.normal(kv, (width, w)) / np.sqrt(width),
    "w_o": jax.random.normal(ko, (w, vocab)) / np.sqrt(w),
  }


def readout_logits(readout: dict, h: jax.Array, mask: jax.Array, heads: int) -> jax.Array:
  """Position-free attention readout: (B, L, D) outputs, (B, L) mask -> (B, L, V) logits.

  The keys and values are the token vectors alone (no position), as in the DiT's
  cross-attention; query k is a learned vector per output position.
  """
  b, length, _ = h.shape
  q = readout["queries"].reshape(length, heads, -1)
  k = (h @ readout["w_k"]).reshape(b, length, heads, -1)
  v = (h @ readout["w_v"]).reshape(b, length, heads, -1)
  scores = jnp.einsum("qhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  scores = jnp.where(mask[:, None, None, :] > 0, scores, -1e9)
  out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
  return out.reshape(b, length, -1) @ readout["w_o"]


def context_logits(readout: dict, h: jax.Array) -> jax.Array:
  """(B, L, D) -> (B, K, L, V): logits of the word k + 1 positions before each token."""
  return jnp.einsum("bld,kdv->bklv", h, readout["context"])


def _losses(params, ids, mask, enc_cfg, heads):
  """(readout CE, context CE, readout caption accuracy, context word accuracy)."""
  h = text_encoder.encode(enc_cfg, params["encoder"], ids, mask)
  logits = readout_logits(params["readout"], h, mask, heads)
  m = mask.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
  correct = (jnp.argmax(logits, -1) == ids) | (mask == 0)
  # Word k + 1 before position l; positions without one (l <= k) or padded are masked.
  k_words = params["readout"]["context"].shape[0]
  shifted = jnp.stack([jnp.roll(ids, k + 1, axis=1) for k in range(k_words)], axis=1)
  pos = jnp.arange(ids.shape[1])
  cm = m[:, None, :] * (pos[None, :] > jnp.arange(k_words)[:, None])[None]
  clog = context_logits(params["readout"], h)
  cce = optax.softmax_cross_entropy_with_integer_labels(clog, shifted)
  cacc = jnp.sum((jnp.argmax(clog, -1) == shifted) * cm) / jnp.sum(cm)
  return (
    jnp.sum(ce * m) / jnp.sum(m),
    jnp.sum(cce * cm) / jnp.sum(cm),
    jnp.mean(jnp.all(correct, axis=-1)),
    cacc,
  )


def _loss(params, ids, mask, enc_cfg, heads, train_encoder=True):
  if not train_encoder:
    params = {**params, "encoder": jax.lax.stop_gradient(params["encoder"])}
  readout_ce, context_ce, acc, cacc = _losses(params, ids, mask, enc_cfg, heads)
  return readout_ce + context_ce, (acc, cacc)


def pretrain(
  enc_cfg: text_encoder.Gemma2Config,
  enc_params: dict,
  tokenizer,
  prompt_cfg,
  cfg: PretrainConfig = PretrainConfig(),
  progress: bool = True,
):
  """Trains `enc_params` (a Gemma2Encoder tree) with the position-free readout.

  Returns (encoder params, {"readout_loss", "context_loss", "caption_accuracy",
  "context_accuracy"} on 512 held-out captions): caption_accuracy is the fraction of
  captions whose every word the readout recovers, context_accuracy the fraction of
  preceding words the context heads name.
  """
  from sana_jax.models import prompts

  captions = training_captions(cfg.num_prompts + 512, cfg.seed)
  ids, mask = prompts.tokenize(tokenizer, captions, prompt_cfg, use_chi=False)
  ids_tr, mask_tr, ids_ho, mask_ho = ids[:-512], mask[:-512], ids[-512:], mask[-512:]
  key = jax.random.PRNGKey(cfg.seed)
  params = {
    "encoder": enc_params,
    "readout": init_readout(key, ids.shape[1], enc_cfg.hidden_size, enc_cfg.vocab_size, cfg),
  }
  tx = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      optax.warmup_cosine_decay_schedule(0.0, cfg.lr, min(200, cfg.steps // 10 + 1), cfg.steps),
      weight_decay=0.0,
    ),
  )
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, ids, mask):
    (loss, (acc, cacc)), grads = jax.value_and_grad(_loss, has_aux=True)(
      params, ids, mask, enc_cfg, cfg.readout_heads, cfg.train_encoder
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, acc, cacc

  rng = np.random.default_rng([cfg.seed, 11])
  bar = tqdm.trange(cfg.steps, desc="pretrain caption encoder", disable=not progress)
  for _ in bar:
    sel = rng.integers(0, len(ids_tr), cfg.batch)
    params, opt_state, loss, acc, cacc = step(params, opt_state, ids_tr[sel], mask_tr[sel])
    if bar.n % 100 == 0:
      bar.set_postfix(
        loss=f"{float(loss):.3f}", acc=f"{float(acc):.2f}", context=f"{float(cacc):.2f}"
      )
  rce, cce, acc, cacc = jax.jit(lambda p, i, m: _losses(p, i, m, enc_cfg, cfg.readout_heads))(
    params, ids_ho, mask_ho
  )
  return params["encoder"], {
    "readout_loss": float(rce),
    "context_loss": float(cce),
    "caption_accuracy": float(acc),
    "context_accuracy": float(cacc),
  }
