"""Train-step tokens/s and MFU on one GPU: our DeRTa step vs transformers + torch eager.

  python bench/mfu_gpu.py [--batches 16,8,4,2,1] [--seq-len 2048] [--attention cudnn]
  python bench/mfu_gpu.py --layers 2 --hidden 128 --intermediate 256 --heads 4 \
      --kv-heads 2 --vocab 1024 --seq-len 64 --batches 4,2 --attention dot_product  # CPU

The LLaMA-3.2-1B shape by default (16 layers, hidden 2048, MLP 8192, 32 query and 8 kv
heads of 64, vocab 128256, tied embeddings), random weights. Both sides keep fp32 master
weights and compute in bf16: ours with `dtype="bfloat16"` and `attention` (cuDNN flash
attention by default), theirs under `torch.autocast(bfloat16)` with SDPA attention; both
clip and step AdamW. Each side runs in its own process (JAX and torch would otherwise
share the GPU's memory) and takes the largest of `--batches` that fits. Every position
is supervised (next-token loss).

MFU: model FLOPs (6 N per token plus 12 L T D for attention, the convention of
`derta_jax.training.compile.model_flops_per_step`) over step time, against the GPU's dense
bf16 peak (from its name; null when unknown, e.g. on CPU). Prints one JSON line.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

# Dense bf16 peaks (FLOP/s) by GPU name, most specific first.
PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
         ("A100", 312e12))
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory")


def _add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--side", choices=("both", "ours", "theirs"), default="both")
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--hidden", type=int, default=2048)
  parser.add_argument("--intermediate", type=int, default=8192)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--kv-heads", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=128256)
  parser.add_argument("--seq-len", type=int, default=2048)
  parser.add_argument("--batches", default="16,8,4,2,1", help="tried from first to last")
  parser.add_argument("--attention", default="cudnn", help="ours: LlamaConfig.attention")
  parser.add_argument("--fallback-attention", default="xla",
                      help="ours: used when --attention fails other than by memory; '' none")
  parser.add_argument("--remat", default="none", help="ours: LlamaConfig.remat")
  parser.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-ups")
  parser.add_argument("--ours-timeout", type=int, default=300, help="seconds")
  parser.add_argument("--theirs-timeout", type=int, default=300, help="seconds")


def num_params(args) -> int:
  """Parameters of the shape (tied embeddings counted once), as LlamaConfig.num_params."""
  d, h = args.hidden, args.hidden // args.heads
  block = d * h * (2 * args.heads + 2 * args.kv_heads) + 3 * d * args.intermediate + 2 * d
  return args.vocab * d + args.layers * block + d


def model_flops_per_token(args) -> float:
  return 6.0 * num_params(args) + 12.0 * args.layers * args.seq_len * args.hidden


def _is_oom(error: BaseException) -> bool:
  return any(m in str(error) or m in type(error).__name__ for m in OOM_MARKERS)


def _timed(step, steps: int) -> tuple[float, float]:
  """(median seconds per step, last loss) after two warm-up steps; `step` syncs."""
  step(), step()
  times, loss = [], None
  for _ in range(steps):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  return statistics.median(times), loss


def _ours(args, batch: int, attention: str) -> dict:
  """One batch size of our step: compiled, checked against the device's memory, timed."""
  import jax
  import jax.numpy as jnp

  from derta_jax import losses, optim
  from derta_jax.models import llama
  from derta_jax.training import step as train

  cfg = llama.preset("llama3_2_1b", n_layers=args.layers, d_model=args.hidden,
                     d_ff=args.intermediate, n_heads=args.heads, n_kv_heads=args.kv_heads,
                     head_dim=args.hidden // args.heads, vocab_size=args.vocab,
                     dtype="bfloat16", param_dtype="float32", attention=attention,
                     remat=args.remat)
  if cfg.num_params() != num_params(args):
    raise AssertionError(f"num_params: model {cfg.num_params()} != bench {num_params(args)}")
  tx, schedule = optim.make_optimizer(lr=1e-5, num_steps=1000, warmup_ratio=0.03,
                                      weight_decay=0.01, clip_norm=1.0)
  graphdef, state, _ = train.init_state(llama.init_model(cfg), tx)
  t = args.seq_len
  ids_BxT = jax.random.randint(jax.random.key(0), (batch, t + 1), 0, args.vocab, jnp.int32)
  ones_BxT = jnp.ones((batch, t), jnp.int32)
  data = dict(input_ids=ids_BxT[:, :-1], targets=ids_BxT[:, 1:], mle_mask=ones_BxT,
              rto_mask=jnp.zeros_like(ones_BxT), segment_ids=ones_BxT,
              positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t)))
  step = train.jit_train_step(
      train.make_train_step(graphdef, tx, schedule, losses.LossConfig(refusal_ids=(7,))),
      None, None)
  compiled = step.lower(state, data).compile()
  mem = compiled.memory_analysis()
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  need = None
  if mem is not None:
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
    if limit and need > limit:
      raise MemoryError(f"RESOURCE_EXHAUSTED: needs {need / 2**30:.1f} GiB of "
                        f"{limit / 2**30:.1f} GiB")
  holder = dict(state=state)

  def run():
    holder["state"], metrics = compiled(holder["state"], data)  # the state is donated
    return float(metrics["loss"])

  seconds, loss = _timed(run, args.steps)
  return dict(seconds=seconds, loss=loss, attention=attention, bytes_needed=need,
              bytes_limit=limit, backend=jax.default_backend())


def _theirs(args, batch: int) -> dict:
  """One batch size of the HF model's step in torch eager, autocast to bf16."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  config = LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads,
      num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads,
      max_position_embeddings=args.seq_len, rope_theta=500000.0, tie_word_embeddings=True,
      attn_implementation="sdpa")
  with torch.device(device):  # initialised where it runs
    model = LlamaForCausalLM(config).train()
  params = list(model.parameters())
  opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
  ids_BxT = torch.randint(0, args.vocab, (batch, args.seq_len), device=device)

  def run():
    with torch.autocast(device, dtype=torch.bfloat16):
      loss = model(input_ids=ids_BxT, labels=ids_BxT).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()  # waits for the GPU

  if sum(p.numel() for p in params) != num_params(args):
    raise AssertionError(f"num_params: HF model {sum(p.numel() for p in params)} != bench "
                         f"{num_params(args)}")
  seconds, loss = _timed(run, args.steps)
  return dict(seconds=seconds, loss=loss, attention="sdpa", backend=device,
              device_name=torch.cuda.get_device_name() if device == "cuda" else None)


def _side(args) -> dict:
  """The largest batch of `--batches` that runs on this side, with what the others did."""
  tried = {}
  attentions = [args.attention] + ([args.fallback_attention]
                                   if args.fallback_attention not in ("", args.attention) else [])
  for attention in attentions if args.side == "ours" else ["sdpa"]:
    for batch in [int(b) for b in args.batches.split(",")]:
      oom = False
      try:
        result = _ours(args, batch, attention) if args.side == "ours" else _theirs(args, batch)
      except Exception as e:  # noqa: BLE001 (a failed batch size is a measurement)
        tried[f"{attention}:{batch}"] = f"{type(e).__name__}: {str(e)[:300]}"
        oom = _is_oom(e)
      else:
        tokens = batch * args.seq_len
        return dict(result, batch=batch, tokens_per_s=tokens / result["seconds"], tried=tried)
      _free_memory()  # the failed attempt's arrays, once its traceback is gone
      if not oom:
        break  # smaller batches would fail alike; the next attention, if any
  return dict(error="no batch size ran", tried=tried)


def _free_memory() -> None:
  gc.collect()
  if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
    sys.modules["torch"].cuda.empty_cache()


def _gpu_name() -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None


def _run_side(side: str, argv: list[str], timeout: int) -> dict:
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  cmd = [sys.executable, __file__, *argv, f"--side={side}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {timeout} s")
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    return dict(error=f"exit {proc.returncode}", stderr_tail=proc.stderr[-1500:])
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  _add_args(parser)
  args = parser.parse_args()
  if args.side != "both":
    print(json.dumps(_side(args)))
    return
  argv = [a for a in sys.argv[1:] if not a.startswith("--side")]
  ours = _run_side("ours", argv, args.ours_timeout)
  theirs = _run_side("theirs", argv, args.theirs_timeout)
  name = _gpu_name()
  peak = next((p for key, p in PEAKS if name and key in name), None)
  for side in (ours, theirs):
    if "tokens_per_s" in side:
      flops_per_s = model_flops_per_token(args) * side["tokens_per_s"]
      side["model_tflops_per_s"] = round(flops_per_s / 1e12, 2)
      side["mfu"] = round(flops_per_s / peak, 4) if peak else None
      side["tokens_per_s"] = round(side["tokens_per_s"], 1)
  both = "tokens_per_s" in ours and "tokens_per_s" in theirs
  print(json.dumps({
      "bench": "mfu_gpu", "gpu": name, "peak_bf16_tflops": peak and peak / 1e12,
      "config": dict(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                     heads=args.heads, kv_heads=args.kv_heads, vocab=args.vocab,
                     seq_len=args.seq_len, params=num_params(args), remat=args.remat),
      "ours": ours, "theirs": theirs,
      "ratio": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3) if both else None,
  }))


if __name__ == "__main__":
  main()
