"""KV-cache decoding: transformers' greedy generate, full recomputation, sampling, meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import HF_CASES
from flax import nnx

import derta_jax
from derta_jax import sharding
from derta_jax.models import generate as gen

PROMPT_LENGTHS = (9, 1, 23, 4, 16)


def _prompts(vocab, lengths=PROMPT_LENGTHS, seed=0):
  rng = np.random.RandomState(seed)
  return [[1] + rng.randint(3, vocab, n - 1).tolist() for n in lengths]


def _hf_greedy(ref_model, prompt, max_new_tokens):
  with torch.no_grad():
    out = ref_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                               dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2,
                             pad_token_id=0)
  return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", ["llama3_gqa", "llama2_mha", "llama3_2_tied"])
def test_greedy_equals_transformers_generate(hf_checkpoint, case):
  path, ref_model = hf_checkpoint(**HF_CASES[case])
  model = derta_jax.load_hf(path)
  prompts = _prompts(96)
  ours = gen.generate(model, prompts, max_new_tokens=32, eos_id=2, bucket=8)
  theirs = [_hf_greedy(ref_model, p, 32) for p in prompts]
  assert ours == theirs
  # The comparison covers long outputs, not only early stops.
  assert max(len(t) for t in theirs) == 32
  # One row per batch and batches of two give the same tokens as one batch of all.
  assert gen.generate(model, prompts, max_new_tokens=32, eos_id=2, batch_size=2) == ours


def _full_recompute_greedy(model, prompt, n):
  """Greedy decoding that reruns the whole forward pass for every token (no cache). The row
  is right-padded to a fixed width: causal attention keeps padding out of earlier logits."""
  forward = nnx.jit(lambda m, ids: m(ids))
  tokens = list(prompt)
  for _ in range(n):
    padded = jnp.asarray([tokens + [0] * (len(prompt) + n - len(tokens))])
    tokens.append(int(jnp.argmax(forward(model, padded)[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_kv_cache_equals_full_recomputation():
  model = derta_jax.init_model(derta_jax.preset("tiny", init_std=0.2), seed=3)
  prompts = _prompts(256, (5, 17, 2))
  ours = gen.generate(model, prompts, max_new_tokens=12, eos_id=())
  assert ours == [_full_recompute_greedy(model, p, 12) for p in prompts]
  assert all(len(o) == 12 for o in ours)


def test_decode_logits_equal_full_forward():
  """The cache path's hidden states at every prefilled and decoded slot equal a forward."""
  model = derta_jax.init_model(derta_jax.preset("tiny"), seed=1)
  ids = jnp.asarray(_prompts(256, (12,))[0])[None]
  full = model.hidden_states(ids)
  cache = model.init_cache(1, 16)
  slots = jnp.arange(16)
  mask = (slots[None, None] <= jnp.arange(8)[None, :, None])
  prefill, cache = model.decode(ids[:, :8], jnp.arange(8)[None], mask, cache, 0)
  steps = [prefill]
  for t in range(8, 12):
    h, cache = model.decode(ids[:, t:t + 1], jnp.asarray([[t]]), (slots <= t)[None, None],
                            cache, t)
    steps.append(h)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_per_seed():
  model = derta_jax.init_model(derta_jax.preset("tiny", init_std=0.1), seed=0)
  prompts = _prompts(256, (6, 11, 3))
  kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, eos_id=())
  a = gen.generate(model, prompts, seed=7, **kw)
  assert a == gen.generate(model, prompts, seed=7, **kw)
  assert a != gen.generate(model, prompts, seed=8, **kw)
  # A prompt's sample depends on its index and the seed, not on its batch mates.
  assert gen.generate(model, prompts, seed=7, batch_size=1, **kw) == a
  # Sampling differs from greedy at temperature 1; a tiny nucleus is greedy again.
  greedy = gen.generate(model, prompts, max_new_tokens=16, eos_id=())
  assert a != greedy
  assert gen.generate(model, prompts, seed=7, max_new_tokens=16, temperature=1.0, top_p=1e-6,
                      eos_id=()) == greedy


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draws = np.asarray(jax.jit(jax.vmap(lambda k: gen._next_token(logits, k[None], 1.0, 0.75)[0]))(
      keys))
  # Mass before token 2 is 0.8 >= 0.75, so only tokens 0 and 1 can be drawn.
  assert set(draws.tolist()) == {0, 1}


def test_stops_at_eos_and_includes_it():
  model = derta_jax.init_model(derta_jax.preset("tiny", init_std=0.2), seed=3)
  prompts = _prompts(256, (5, 9))
  free = gen.generate(model, prompts, max_new_tokens=10, eos_id=())
  stop = free[0][3]
  out = gen.generate(model, prompts, max_new_tokens=10, eos_id=stop)
  assert out[0] == free[0][:free[0].index(stop) + 1]
  assert out[1] == (free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_sharded_model_generates_the_same(hf_checkpoint):
  path, _ = hf_checkpoint(**HF_CASES["llama3_gqa"])
  prompts = _prompts(96)
  single = gen.generate(derta_jax.load_hf(path), prompts, max_new_tokens=16, eos_id=2)
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  model = derta_jax.load_hf(path, mesh=mesh)
  with jax.set_mesh(mesh):
    assert gen.generate(model, prompts, max_new_tokens=16, eos_id=2) == single


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[]]), "prompt 0 is empty"),
    (dict(prompts=[[1, 999]]), "outside the vocabulary"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(kwargs, message):
  model = derta_jax.init_model(derta_jax.preset("tiny"))
  args = dict(prompts=[[1, 5]], max_new_tokens=4) | kwargs
  with pytest.raises(ValueError, match=message):
    gen.generate(model, args.pop("prompts"), **args)
