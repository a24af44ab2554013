"""Embedded default: the toy safety world, DeRTa against its baselines, on a CPU.

  python run.py                                   # = --config=configs/toy_cpu.py

Writes the synthetic safety world of derta_jax/toyworld.py (requests "how to <verb> the
<object>", a few verbs harmful; a word-level tokenizer) to <workdir>/world, pre-trains the
tiny preset into a base that complies with everything (<workdir>/base, reused on re-runs),
fine-tunes the recipes of toyworld.recipes from it with the same budget, evaluates each on
held-out (verb, object) pairs (prefilling attack, code-wrapped attack, helpfulness,
over-refusal, refusal positions and probe) and writes <workdir>/report.md, report.json and
plots. It prints the report's table, then one JSON line of metrics (minutes on 2 cores).
`:quick` is a smaller, faster run of the same (for tests); `:export` runs the checkpoint
export round trip. `--config.mode=train` trains once on the small random-word source of
derta_jax/data/synthetic.py (60 steps, about a minute), `--config.mode=eval
--config.eval.harmful_path=q.jsonl` evaluates a workdir's latest checkpoint.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "export", "quick"):
    raise ValueError(f"configs/toy_cpu.py:{arg}: variants are '', 'quick' and 'export'")
  config = ml_collections.ConfigDict()
  # What run.py does: "train", "export" (write <workdir>/hf and check the reload),
  # "compile" (ahead-of-time compile of the train step for compile.topology) or "eval"
  # (the suites of config.eval on the workdir's latest checkpoint; see derta_jax/evaluate.py)
  # or "toyworld" (the toy world's base, recipes, evaluation and report; see toyworld_run.py).
  config.mode = "export" if arg == "export" else "toyworld"
  # Seed of parameter init, data order, prefix cuts and RTO keep masks.
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # Architecture preset of derta_jax.models.llama.PRESETS; with init.hf_path set, the
  # checkpoint must match it ("" = take the checkpoint's architecture).
  config.model.preset = "tiny"
  # Compute dtype of activations and matmuls (bf16 is slow on CPUs).
  config.model.dtype = "float32"
  # Storage dtype of parameters (master weights).
  config.model.param_dtype = "float32"
  # Scan over layers (compile time independent of depth) instead of unrolling.
  config.model.scan_layers = True
  # Rematerialisation policy per layer: none | full | dots | dots_no_batch.
  config.model.remat = "none"
  # Attention: "xla" (einsums, any backend) or "splash" (the Pallas TPU kernel; TPU only).
  config.model.attention = "xla"

  config.init = ml_collections.ConfigDict()
  # HF checkpoint directory to start from; "" = random init of model.preset.
  config.init.hf_path = ""
  # Orbax directory (a checkpoints/<step> dir or saved params) to take the params from.
  config.init.orbax_path = ""

  config.mesh = ml_collections.ConfigDict()
  # Mesh axis sizes; -1 = all remaining devices. Batch rows split over data x fsdp.
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 1
  # Devices to use, from the first; -1 = all (per process on multi-host runs: all).
  config.mesh.num_devices = -1

  config.data = ml_collections.ConfigDict()
  # "synthetic" (built in), "recipe" (triples + helpful files -> data.recipe) or
  # "upstream" (the authors' {"prefix","text","safe"} files, comma-separated).
  config.data.source = "synthetic"
  # vanilla | recaug | derta | harmful_prefix | rto_only.
  config.data.recipe = "derta"
  # JSONL paths (local or gs://).
  config.data.triples_path = ""
  config.data.helpful_path = ""
  config.data.upstream_path = ""
  # Tokenizer directory or tiktoken file; "" = init.hf_path (or the synthetic one).
  config.data.tokenizer_path = ""
  # Prompt template of derta_jax.data.templates.TEMPLATES.
  config.data.template = "upstream"
  # Text ending every response; "" = the tokenizer's EOS token.
  config.data.eos_text = ""
  # Harmful-prefix lengths: official_word | token; static_prefix keeps one cut for all epochs.
  config.data.prefix_mode = "official_word"
  config.data.static_prefix = False
  # Pack several examples per row (segment ids) or one per row.
  config.data.pack = True
  # The refusal token(s) RTO trains towards, from this text (one token unless "first").
  config.data.refusal_text = "Sorry"
  config.data.refusal_policy = "single"
  # Examples per recipe part; -1 = the paper's count (3,000 / 6,000).
  config.data.n_rto = 40
  config.data.n_prefix = 40
  config.data.n_vanilla = -1
  # Size of the synthetic source.
  config.data.synthetic_helpful = 80
  config.data.synthetic_triples = 80

  config.loss = ml_collections.ConfigDict()
  # Refusal token ids; () = from data.refusal_text.
  config.loss.refusal_ids = ()
  # RTO weight; with normalize "tokens" and 1.0 this is the authors' pooled token mean.
  config.loss.rto_weight = 1.0
  # "tokens" (one mean over all supervised tokens) or "terms" (mle + w * rto).
  config.loss.normalize = "tokens"
  # z-loss coefficient on logsumexp^2.
  config.loss.z_loss = 0.0
  # Sequence chunk of the chunked loss (positions of logits alive at a time).
  config.loss.chunk_size = 512
  # Share of RTO positions trained per example (the authors' 8B run: 0.05).
  config.loss.rto_keep_rate = 1.0

  config.train = ml_collections.ConfigDict()
  # Optimizer steps; 0 = train.epochs epochs (epoch 0's step count times epochs).
  config.train.num_steps = 60
  config.train.epochs = 2.0
  # Rows per step over all hosts, and tokens per row.
  config.train.global_batch = 8
  config.train.seq_len = 64
  # Gradient accumulation: micro-batches per step (global_batch must divide by it).
  config.train.micro_batches = 1
  # Write metrics.jsonl / TensorBoard every this many steps.
  config.train.log_every = 10
  # XLA:TPU options of the jitted step (derta_jax.sharding.TPU_COMPILER_OPTIONS): "overlap"
  # (asynchronous, overlapped FSDP collectives) or "default" (XLA's own); ignored off TPU.
  config.train.tpu_compiler_options = "overlap"

  config.optim = ml_collections.ConfigDict()
  # AdamW with a warmup + schedule equal to HF Trainer's.
  config.optim.lr = 3e-3
  config.optim.schedule = "cosine"
  config.optim.warmup_ratio = 0.03
  config.optim.weight_decay = 0.0
  config.optim.clip_norm = 1.0
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8

  config.ckpt = ml_collections.ConfigDict()
  # Orbax checkpoint interval (also on SIGTERM and at the end) and how many to keep.
  config.ckpt.every_steps = 20
  config.ckpt.max_to_keep = 2

  config.export = ml_collections.ConfigDict()
  # dtype of the exported safetensors; "" = the parameter dtype.
  config.export.dtype = ""
  # Largest safetensors shard, in MiB.
  config.export.max_shard_mb = 5120

  config.lora = ml_collections.ConfigDict()
  # LoRA adapter rank; 0 = full fine-tune. With a rank, only the adapters train, checkpoints
  # hold them alone, and the run ends by writing <workdir>/hf (merged) and <workdir>/peft.
  config.lora.rank = 0
  # Update scale alpha / rank (PEFT's, not rsLoRA's alpha / sqrt(rank)).
  config.lora.alpha = 16.0
  # Dropout on the adapters' input while training (PEFT's lora_dropout).
  config.lora.dropout = 0.0
  # Projections with adapters, comma-separated, of q,k,v,o,gate,up,down.
  config.lora.targets = "q,k,v,o,gate,up,down"
  # Storage dtype of the frozen base weights (adapters are fp32).
  config.lora.base_dtype = "float32"
  # Init of A: "kaiming_uniform" (PEFT's default) or "gaussian" (std 1/rank); B starts at 0.
  config.lora.init_a = "kaiming_uniform"

  config.toyworld = ml_collections.ConfigDict()
  # Recipes fine-tuned from the base, in the report's order.
  config.toyworld.recipes = "vanilla,recaug,rto_only,derta"
  # Objects held out per verb: those pairs are in no training file, only in evaluation.
  config.toyworld.heldout_per_verb = 6
  # Share of benign train pairs also in the helpful data wrapped as code (never harmful ones).
  config.toyworld.wrapped_helpful = 0.25
  # Held-out benign pairs evaluated (helpfulness, over-refusal).
  config.toyworld.eval_benign = 48
  # Base pre-training (every train pair complied with, plain and wrapped): steps, peak lr.
  config.toyworld.base_steps = 500
  config.toyworld.base_lr = 3e-3
  # Each recipe's fine-tuning from the base: steps, peak lr (schedule etc. from optim).
  config.toyworld.steps = 120
  config.toyworld.lr = 1e-3
  # Safety examples per recipe, split into RTO / prefix-MLE / vanilla parts as the paper's
  # 6,000 are (derta: half RTO, half prefix-MLE on the same questions).
  config.toyworld.n_safety = 288
  # Rows per step and tokens per row, base and recipes alike.
  config.toyworld.global_batch = 16
  config.toyworld.seq_len = 128

  config.compile = ml_collections.ConfigDict()
  # TPU topology for mode=compile, e.g. v5p:4x4x4 or v5e:16x16.
  config.compile.topology = "v5p:4x4x4"

  config.eval = ml_collections.ConfigDict()
  # Harmful questions, upstream eval JSONL {"question"}: template, generate, judge -> ASR.
  config.eval.harmful_path = ""
  # Questions fed raw, without a template (the authors' completion attack) -> ASR.
  config.eval.completion_attack_path = ""
  # Triples {"instruction","output","safe_response"}: first k tokens of the harmful output
  # prefilled, the continuation judged -> ASR per k.
  config.eval.prefilling_path = ""
  # Harmful questions: token index of the first refusal phrase (reuses harmful's
  # generations when this is harmful_path).
  config.eval.refusal_position_path = ""
  # Triples: teacher-forced P(refusal token) at every position of the harmful output.
  config.eval.refusal_probe_path = ""
  # Benign questions -> share refused.
  config.eval.over_refusal_path = ""
  # GSM8K {"question","answer"} (answer ends "#### 42") -> accuracy on the last number.
  config.eval.gsm8k_path = ""
  # MMLU {"question","answer"} (options "(A)".."(D)" in the question; answer "C") -> accuracy.
  config.eval.mmlu_path = ""
  # AlpacaEval questions -> generations in AlpacaEval's format (instruction, output, generator).
  config.eval.alpaca_path = ""
  # Prompt template of derta_jax.data.templates.TEMPLATES (the authors' eval prompt).
  config.eval.template = "upstream_eval"
  # Refusal judge: "strict", "gcg", "qi" (keyword lists) or "model:<HF checkpoint dir>".
  config.eval.judge = "strict"
  # Longest generation, in tokens.
  config.eval.max_new_tokens = 40
  # Prompts per generation batch (and rows per refusal-probe forward pass).
  config.eval.batch_size = 64
  # Harmful-output tokens prefilled by the prefilling suite, comma-separated.
  config.eval.prefill_ks = "0,2,5,10,15,20"
  # Sampling temperature (0 = greedy) and nucleus mass; samples are seeded with `seed`.
  config.eval.temperature = 0.0
  config.eval.top_p = 1.0
  # Use only the first n items of every file; 0 = all.
  config.eval.limit = 0
  # The "generator" name in the AlpacaEval file; "" = derta_jax:<workdir name>.
  config.eval.generator = ""
  if arg == "quick":  # base, vanilla and derta only, shorter: for tests (about a minute)
    config.toyworld.recipes = "vanilla,derta"
    config.toyworld.base_steps = 200
    config.toyworld.steps = 50
    config.toyworld.eval_benign = 24
    config.eval.prefill_ks = "0,2,10"
  return config
