"""Train-step tokens/s: our DeRTa step (jit, XLA CPU) vs the authors' torch/HF step.

  python bench/train_step.py [--repeats 5] [--layers 4] [--seq-len 512] [--batch 4]
  python bench/train_step.py --model=smollm2 [--repeats 3] [--seq-len 512] [--batch 2]

`--model=small` (the default): a 512-wide LLaMA with `--layers` layers; `--model=smollm2`:
the SmolLM2-135M architecture (30 layers, tied embeddings, vocab 49152), random weights.
Same weights on both sides (a random HF LLaMA saved and loaded with `load_hf`), fp32, CPU.
Theirs is what the authors' HF Trainer does: RTO labels replaced by the refusal id, the
model's shifted cross-entropy mean, backward, clip, torch AdamW, cosine-with-warmup step.
Ours is `train.make_train_step` with the chunked loss. Prints one JSON line with both
medians, the ratio (ours / theirs) and each side's first-step loss.
"""

import argparse
import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
from model_forward import median_seconds  # bench/ is on sys.path when run as a script
from transformers import LlamaConfig, LlamaForCausalLM, get_cosine_schedule_with_warmup

import derta_jax
from derta_jax import losses, optim
from derta_jax.training import step as train

REFUSAL_ID = 7
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0
LR, WEIGHT_DECAY, NUM_STEPS, WARMUP_RATIO, CLIP = 2e-5, 2e-5, 100, 0.03, 1.0


# HF config fields of each --model, and its flag defaults.
MODELS = {
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                  num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
}
MODEL_DEFAULTS = {
    "small": dict(layers=4, seq_len=512, batch=4, repeats=5),
    "smollm2": dict(layers=30, seq_len=512, batch=2, repeats=3),
}


def _hf_model(layers, seq_len, kind="small"):
  """A random LLaMA whose weights give O(1) logits, so the loss check is not just log V."""
  torch.manual_seed(0)
  model = LlamaForCausalLM(LlamaConfig(
      num_hidden_layers=layers, max_position_embeddings=seq_len, bos_token_id=BOS_ID,
      eos_token_id=EOS_ID, pad_token_id=PAD_ID, **MODELS[kind]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, p.shape[-1] ** -0.5)
  return model


def _rows(batch, seq_len, vocab, seed=0):
  """Right-padded rows [BOS, prompt, response, EOS]; odd rows are RTO, even rows MLE.

  Returns (ids_BxT, prompt lengths, lengths, is_rto): the response of row r is
  positions [prompt[r], length[r]).
  """
  rng = np.random.default_rng(seed)
  ids_BxT = np.full((batch, seq_len), PAD_ID, np.int64)
  prompts = np.minimum(rng.integers(50, 71, batch), seq_len // 4)
  lengths = seq_len - rng.integers(0, seq_len // 8, batch)
  for r in range(batch):
    ids_BxT[r, :lengths[r]] = rng.integers(3, vocab, lengths[r])
    ids_BxT[r, 0], ids_BxT[r, lengths[r] - 1] = BOS_ID, EOS_ID
  return ids_BxT, prompts, lengths, np.arange(batch) % 2 == 1


def _our_batch(ids_BxT, prompts, lengths, is_rto):
  """The `derta_jax.data` row contract: position t predicts targets[t]."""
  b, t = ids_BxT.shape
  out = {k: np.zeros((b, t), np.int32)
         for k in ("targets", "mle_mask", "rto_mask", "segment_ids", "positions")}
  out["input_ids"] = ids_BxT.astype(np.int32)
  for r in range(b):
    n, supervised = lengths[r], slice(prompts[r] - 1, lengths[r] - 1)
    out["segment_ids"][r, :n] = 1
    out["positions"][r, :n] = np.arange(n)
    out["targets"][r, :n - 1] = ids_BxT[r, 1:n]
    out["rto_mask" if is_rto[r] else "mle_mask"][r, supervised] = 1
    if is_rto[r]:
      out["targets"][r, supervised] = REFUSAL_ID
  return {k: jnp.asarray(v) for k, v in out.items()}


def _their_batch(ids_BxT, prompts, lengths, is_rto):
  """HF labels: -100 on prompt and padding; every response label of an RTO row -> refusal."""
  labels_BxT = np.full_like(ids_BxT, -100)
  mask_BxT = np.zeros_like(ids_BxT)
  for r in range(ids_BxT.shape[0]):
    response = slice(prompts[r], lengths[r])
    labels_BxT[r, response] = REFUSAL_ID if is_rto[r] else ids_BxT[r, response]
    mask_BxT[r, :lengths[r]] = 1
  return dict(input_ids=torch.tensor(ids_BxT), attention_mask=torch.tensor(mask_BxT),
              labels=torch.tensor(labels_BxT))


def _ours(path, batch):
  """A function running one of our train steps -> its loss."""
  tx, schedule = optim.make_optimizer(lr=LR, num_steps=NUM_STEPS, schedule="cosine",
                                      warmup_ratio=WARMUP_RATIO, weight_decay=WEIGHT_DECAY,
                                      clip_norm=CLIP)
  graphdef, state, _ = train.init_state(derta_jax.load_hf(path), tx)
  loss_config = losses.LossConfig(refusal_ids=(REFUSAL_ID,), chunk_size=512)
  step = train.jit_train_step(train.make_train_step(graphdef, tx, schedule, loss_config),
                              None, None)
  holder = dict(state=state)

  def run():
    # The step donates the state: keep only the new one.
    holder["state"], metrics = step(holder["state"], batch)
    return float(metrics["loss"])

  return run


def _theirs(model, batch):
  """A function running one step of the authors' HF Trainer loop -> its loss."""
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  # HF Trainer's grouping: no weight decay on norm scales (LLaMA has no biases).
  groups = [
      dict(params=[p for n, p in model.named_parameters() if "norm" not in n],
           weight_decay=WEIGHT_DECAY),
      dict(params=[p for n, p in model.named_parameters() if "norm" in n], weight_decay=0.0)]
  opt = torch.optim.AdamW(groups, lr=LR, eps=1e-8)
  sched = get_cosine_schedule_with_warmup(
      opt, optim.warmup_steps_from_ratio(NUM_STEPS, WARMUP_RATIO), NUM_STEPS)

  def run():
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()

  return run


def add_model_args(parser: argparse.ArgumentParser) -> None:
  """The model and batch flags of the train-step benchmarks."""
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=4)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_model_args(parser)
  parser.add_argument("--model", choices=sorted(MODELS), default="small")
  # Unset flags take the model's defaults (MODEL_DEFAULTS).
  parser.set_defaults(**dict.fromkeys(MODEL_DEFAULTS["small"]))
  args = parser.parse_args()
  for key, value in MODEL_DEFAULTS[args.model].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.seq_len < 128:
    parser.error(f"--seq-len={args.seq_len} must be >= 128 to hold a prompt and a response")

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  model = _hf_model(args.layers, args.seq_len, args.model)
  rows = _rows(args.batch, args.seq_len, model.config.vocab_size)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    ours = _ours(tmp, _our_batch(*rows))
  theirs = _theirs(model, _their_batch(*rows))

  # Both start from the same weights, so their first losses must agree; the first steps
  # are the warm-up (JAX's compilation, torch's allocation of the AdamW state).
  first_ours, first_theirs = ours(), theirs()
  t_ours, t_theirs = median_seconds([ours, theirs], args.repeats)
  tokens = args.batch * args.seq_len
  print(json.dumps({
      "bench": "train_step",
      "model": args.model,
      "config": dict(layers=args.layers, d_model=model.config.hidden_size,
                     vocab=model.config.vocab_size, batch=args.batch, seq_len=args.seq_len,
                     params=model.num_parameters()),
      "tokens_per_step": tokens,
      "ours_tokens_per_s": round(tokens / t_ours, 1),
      "theirs_tokens_per_s": round(tokens / t_theirs, 1),
      "ratio": round(t_theirs / t_ours, 3),
      "first_loss_ours": first_ours, "first_loss_theirs": first_theirs,
      "loss_rel_diff": abs(first_ours - first_theirs) / abs(first_theirs),
      "repeats": args.repeats, "threads": threads,
  }))


if __name__ == "__main__":
  main()
