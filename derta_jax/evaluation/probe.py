"""The refusal probe: teacher-forced P(refusal | q, r̂_<t) at every position t of a harmful
response r̂, the quantity RTO trains. One forward pass per batch, no generation.

P(refusal) is the softmax mass of the refusal id set on the logits at the position that
predicts response token t (position len(prompt) - 1 + t, BOS counted in the prompt).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from derta_jax import losses
from derta_jax.data import templates
from derta_jax.evaluation import text

BUCKET = 64  # rows pad to a multiple of this many tokens: one compile per bucket


@functools.partial(jax.jit, static_argnames=("graphdef", "refusal_ids"))
def _refusal_probs(graphdef, state, input_ids_BxT, *, refusal_ids: tuple[int, ...]):
  """P(next token in the refusal set) at every position [B, T]; [T, V] logits of one row
  exist at a time, never [B, T, V]."""
  model = nnx.merge(graphdef, state)
  hidden_BxTxD = model.hidden_states(input_ids_BxT)
  unembed_DxV = model.unembed_DxV().astype(model.config.compute_dtype)

  def row(hidden_TxD):
    logits_1xTxV = jnp.einsum("TD,DV->TV", hidden_TxD, unembed_DxV,
                              preferred_element_type=jnp.float32)[None]
    return jnp.exp(losses.refusal_logprobs(logits_BxTxV=logits_1xTxV,
                                           refusal_ids=refusal_ids)[0])

  return jax.lax.map(row, hidden_BxTxD)


def probe_sequences(tokenizer, template: str, triples, max_len: int):
  """Per triple: (prompt ids with BOS, harmful output ids cut to fit max_len, cut or not)."""
  out = []
  for t in triples:
    prompt = templates.apply_template(template, t.instruction)
    head = [tokenizer.bos_id, *tokenizer.encode(prompt)]
    harmful = text.response_ids(tokenizer, prompt, t.output)
    room = max(max_len - len(head), 0)
    out.append((head, harmful[:room], len(harmful) > room))
  return out


def refusal_curves(model, sequences, *, refusal_ids: Sequence[int], batch_size: int,
                   pad_id: int) -> list[np.ndarray]:
  """Per (prompt ids, response ids, ...) sequence, P(refusal) at each response position."""
  graphdef, state = nnx.split(model)
  refusal = losses.refusal_tuple(refusal_ids, model.config.vocab_size)
  curves = []
  starts = range(0, len(sequences), batch_size)
  for start in tqdm(starts, desc="eval refusal_probe", unit="batch", disable=len(starts) < 2):
    chunk = sequences[start:start + batch_size]
    width = -(-max(len(p) + len(r) for p, r, *_ in chunk) // BUCKET) * BUCKET
    # Padding goes after the tokens, where causal attention keeps it unseen; unused rows
    # stay padding so every batch of a bucket has one shape.
    ids_BxT = np.full((batch_size, width), pad_id, np.int32)
    for b, (p, r, *_) in enumerate(chunk):
      ids_BxT[b, :len(p) + len(r)] = p + r
    probs_BxT = np.asarray(_refusal_probs(graphdef, state, jnp.asarray(ids_BxT),
                                          refusal_ids=refusal))
    curves += [probs_BxT[b, len(p) - 1:len(p) - 1 + len(r)]
               for b, (p, r, *_) in enumerate(chunk)]
  return curves


def mean_curve(curves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(mean over the curves that reach t, how many reach t) for t = 0 .. longest - 1."""
  longest = max(len(c) for c in curves)
  sums, counts = np.zeros(longest), np.zeros(longest, np.int64)
  for c in curves:
    sums[:len(c)] += c
    counts[:len(c)] += 1
  return sums / np.maximum(counts, 1), counts
