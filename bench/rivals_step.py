"""What each objective costs per train step: DeRTa vs its rivals on the same model and rows.

  python bench/rivals_step.py [--model=small|smollm2] [--repeats 5] [--seq-len 256] [--batch 8]

One random-weight LLaMA (`--model` as in bench/train_step.py), fp32 on the CPU. Each
objective trains its own recipe's rows, packed by the real pipeline from the synthetic
random-word source (derta: RTO + harmful prefix; dpo: preference pairs; qi: token-level
harmful prefixes; door: harmful prefix + harmful responses; circuit_breaker: refusals +
harmful responses), `--batch` rows of `--seq-len` tokens. DeRTa and the full-fine-tune
rivals train every weight; the rivals also run the frozen reference (the initial weights,
a separate never-donated step argument) in the same jitted step. Circuit breakers train
rank-16 LoRA adapters, their reference being the base with the adapters off.

Prints one JSON line: per objective the median step seconds (steps interleaved, so machine
noise hits all alike), supervised-token throughput, the compiled step's argument and
temporary bytes (`memory_analysis()`), and each one's step time over DeRTa's.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import jax
from model_forward import median_seconds  # bench/ is on sys.path when run as a script

from derta_jax import data, losses, optim
from derta_jax.data import pipeline, synthetic
from derta_jax.losses import objectives
from derta_jax.models import llama, lora
from derta_jax.training import step as train

# d_model, n_layers, n_heads, n_kv_heads, d_ff, vocab, tied, head_dim.
MODELS = {"small": (512, 4, 8, 4, 1376, 32000, False, 64),
          "smollm2": (576, 30, 9, 3, 1536, 49152, True, 64)}
RECIPES = {"derta": "derta", "dpo": "dpo", "qi": "qi", "door": "door",
           "circuit_breaker": "circuit_breaker"}


def _config(kind: str) -> llama.LlamaConfig:
  d, n, h, kv, ff, v, tied, hd = MODELS[kind]
  return llama.LlamaConfig(vocab_size=v, d_model=d, n_layers=n, n_heads=h, n_kv_heads=kv,
                           d_ff=ff, head_dim=hd, max_position_embeddings=2048,
                           tie_embeddings=tied, bos_id=1, eos_ids=(2,))


def _batch(objective: str, tokenizer, seq_len: int, rows: int):
  helpful, triples = synthetic.make_sources(seed=0, n_helpful=200, n_triples=200)
  examples = data.build_recipe(RECIPES[objective], triples=triples, helpful=helpful, seed=0,
                               counts={p: 100 for p in dict(data.RECIPES[objective])},
                               tokenizer=tokenizer, eos_text="")
  pipe = pipeline.Pipeline(examples, tokenizer, seq_len=seq_len, global_batch=rows, seed=0,
                           refusal_ids=(3,), process_index=0, process_count=1)
  return pipe.batch(0)


def _step(objective: str, config: llama.LlamaConfig, batch, n_layers: int):
  """(run one step, compiled memory analysis)."""
  model = llama.init_model(config, seed=0)
  frozen = {}
  if objective == "circuit_breaker":
    model = lora.attach(model, lora.LoraConfig(rank=16, alpha=16.0), seed=0)
    frozen["base"] = train.frozen_base(model)[0]
  elif objective != "derta":
    frozen["reference"] = train.reference_weights(model)[0]
  tx, schedule = optim.make_optimizer(lr=1e-5, num_steps=100, schedule="constant")
  graphdef, state, _ = train.init_state(model, tx)
  cfg = losses.LossConfig(refusal_ids=(3,), objective=objective, total_steps=100,
                          cb_reroute_layers=(n_layers // 3, 2 * n_layers // 3),
                          cb_retain_layers=tuple(range(n_layers)))
  fn = train.jit_train_step(train.make_train_step(graphdef, tx, schedule, cfg), None, None)
  args = (batch, frozen) if frozen else (batch,)
  memory = fn.lower(state, *args).compile().memory_analysis()
  holder = [state]

  def run():
    holder[0], metrics = fn(holder[0], *args)
    jax.block_until_ready(metrics["loss"])

  return run, memory


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=sorted(MODELS), default="small")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seq-len", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--objectives", default=",".join(objectives.OBJECTIVES))
  args = parser.parse_args()
  config = _config(args.model)
  names = [n.strip() for n in args.objectives.split(",") if n.strip()]
  if "derta" not in names:
    parser.error("--objectives must include derta (the ratios are over its step time)")
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = data.load_tokenizer(synthetic.write_tokenizer(Path(tmp) / "words"))
    runs, memory, tokens = {}, {}, {}
    for name in names:
      batch = _batch(name, tokenizer, args.seq_len, args.batch)
      supervised = sum(int(batch[k].sum()) for k in objectives.MASKS + ("rto_mask",)
                       if k != "safety_mask")
      runs[name], memory[name] = _step(name, config, batch, config.n_layers)
      tokens[name] = supervised
      runs[name]()  # warm-up
  seconds = dict(zip(names, median_seconds([runs[n] for n in names], args.repeats),
                     strict=True))
  print(json.dumps({
      "bench": "rivals_step", "model": args.model, "device": jax.devices()[0].device_kind,
      "cpus": os.cpu_count(),
      "config": dict(layers=config.n_layers, d_model=config.d_model, vocab=config.vocab_size,
                     batch=args.batch, seq_len=args.seq_len, params=config.num_params()),
      "objectives": {n: dict(
          step_seconds=round(seconds[n], 4),
          supervised_tokens=tokens[n],
          argument_mb=round(memory[n].argument_size_in_bytes / 2**20, 1),
          temp_mb=round(memory[n].temp_size_in_bytes / 2**20, 1),
          step_time_over_derta=round(seconds[n] / seconds["derta"], 3)) for n in names},
  }))


if __name__ == "__main__":
  main()
