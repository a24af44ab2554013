"""Embedded default: the toy safety world, DeRTa against its baselines, on a CPU.

  python run.py                                   # = --config=configs/toy_cpu.py

Writes the synthetic safety world of derta_jax/toyworld/world.py (requests "how to <verb>
the <object>", a few verbs harmful; a word-level tokenizer) to <workdir>/world, pre-trains
the tiny preset into a base that complies with everything (<workdir>/base, reused on
re-runs), fine-tunes the recipes of toyworld.recipes from it with the same budget,
evaluates each on held-out (verb, object) pairs (prefilling attack, code-wrapped attack,
helpfulness, over-refusal, refusal positions and probe) and writes <workdir>/report.md,
report.json and plots. It prints the report's table, where the report is and one summary
line (about a minute and a half on 2 cores). `:quick` is a smaller, faster run of the same
(for tests); `:export` runs the checkpoint export round trip. `--config.mode=train` trains
once on the small random-word source of derta_jax/data/synthetic.py (60 steps, about a
minute), `--config.mode=eval --config.eval.harmful_path=q.jsonl` evaluates a workdir's
latest checkpoint. Every field is described in configs/base.py.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "export", "quick"):
    raise ValueError(f"configs/toy_cpu.py:{arg}: variants are '', 'quick' and 'export'")
  config = base.get_config()
  config.mode = "export" if arg == "export" else "toyworld"
  # mode=train on the synthetic source: 60 steps at a toy's learning rate, checkpoints
  # every 20, and a safety mix small enough for its 80 triples.
  config.train.num_steps = 60
  config.optim.lr = 3e-3
  config.ckpt.every_steps = 20
  config.ckpt.max_to_keep = 2
  config.data.n_rto = 40
  config.data.n_prefix = 40
  # The toy's responses are a few words long.
  # The toy's responses are made-up words: a refusal phrase or none is all there is to read.
  config.eval.judge = "strict"
  config.eval.max_new_tokens = 40
  config.eval.batch_size = 64
  config.eval.prefill_ks = "0,2,5,10,15,20"
  # Circuit breakers reroute both blocks of the two-layer preset (and retain both).
  config.loss.cb_reroute_layers = (0, 1)
  if arg == "quick":  # base, vanilla and derta only, shorter: for tests (about a minute)
    config.toyworld.recipes = "vanilla,derta"
    config.toyworld.base_steps = 200
    config.toyworld.steps = 50
    config.toyworld.eval_benign = 24
    config.eval.prefill_ks = "0,2,10"
  return config
