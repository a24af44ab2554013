"""Embedded default: DeRTa fine-tuning of a tiny LLaMA on CPU, in float32.

  python run.py                                   # = --config=configs/toy_cpu.py

Trains the tiny preset from random init for 60 steps on a small synthetic DeRTa mix
(random-word requests; harmful and safe responses; helpful pairs; a word-level tokenizer
written to <workdir>/tokenizer), checkpointing with Orbax and resuming if run again, then
exports <workdir>/hf. It prints one JSON line with the final loss (about a minute on 2
cores). `:export` runs the checkpoint export round trip instead. The synthetic safety world
with its evaluation replaces this data in issue #7.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "export"):
    raise ValueError(f"configs/toy_cpu.py:{arg}: variants are '' and 'export'")
  config = ml_collections.ConfigDict()
  # What run.py does: "train", "export" (write <workdir>/hf and check the reload) or
  # "compile" (ahead-of-time compile of the train step for compile.topology).
  config.mode = "export" if arg == "export" else "train"
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

  config.compile = ml_collections.ConfigDict()
  # TPU topology for mode=compile, e.g. v5p:4x4x4 or v5e:16x16.
  config.compile.topology = "v5p:4x4x4"
  return config
