#!/usr/bin/env bash
# Runs on a lent GPU machine from the repo root with .gpu/ carried (see gpu-pack.sh):
#   tests  the CUDA op tests (float64 references), the sm_90a path and the device engine on every
#          fixture (test/cuda*.test.js), output in $OUT/cuda-tests.txt; then the fidelity table
#   bench  npm run bench -- kernels --device cuda against torch on the same GPU: $OUT/kernels-cuda.*
#   serve  expertd serve --device cuda on the qwen2_moe fixture, one completion through HTTP
#   sanitize  the CUDA op tests under compute-sanitizer (memcheck), output in $OUT/sanitize.txt
set -uo pipefail
mode="${1:-tests}"
out="${OUT:-/tmp/expertd-out}"
mkdir -p "$out" /tmp/expertd-node
xz -dc .gpu/node.xz >/tmp/expertd-node/node && chmod +x /tmp/expertd-node/node
tar -xJf .gpu/app.tar.xz
export PATH="/tmp/expertd-node:$PATH"
# cuBLASLt and NCCL ship in torch's pip wheels (nvidia-cublas, nvidia-nccl-cu13), not on the loader path.
lib() { python3 -c "import importlib, os, glob; m = importlib.import_module('$1'); d = os.path.dirname(m.__file__ or list(m.__path__)[0]); print((glob.glob(os.path.join(d, 'lib', '$2')) + [''])[0])" 2>/dev/null; }
export EXPERTD_CUBLASLT_SO="${EXPERTD_CUBLASLT_SO:-$(lib nvidia.cublas 'libcublasLt.so*')}"
export EXPERTD_NCCL_SO="${EXPERTD_NCCL_SO:-$(lib nvidia.nccl 'libnccl.so*')}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; node --version;
  echo "cublasLt: ${EXPERTD_CUBLASLT_SO:-none}  nccl: ${EXPERTD_NCCL_SO:-none}"; } | tee "$out/machine.txt"
node -e "import('./dist/src/native/index.js').then(m => console.log(JSON.stringify(m.loadNative().capabilities())))" | tee -a "$out/machine.txt"
case "$mode" in
  tests)
    tests=$(ls dist/test/cuda*.test.js)
    node --test --test-concurrency=1 $tests 2>&1 | tee "$out/cuda-tests.txt" | grep -E '^# (tests|pass|fail|skipped)|^not ok|^ +not ok'
    node dist/bench/index.js fidelity --gpu 2>&1 | tee "$out/fidelity.md" ;;
  bench)
    node dist/bench/index.js kernels --device cuda --python python3 --json "$out/kernels-cuda.json" \
      --plot "$out/kernels-cuda.png" 2>&1 | tee "$out/kernels-cuda.md" ;;
  serve)
    node bin/expertd.js serve --model test/fixtures/qwen2_moe --device cuda --port 8011 >"$out/serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 120); do curl -sf localhost:8011/health >/dev/null && break; sleep 1; done
    curl -s localhost:8011/v1/completions -H 'content-type: application/json' \
      -d '{"model":"qwen2_moe","prompt":"The quick brown fox","max_tokens":16,"temperature":0}' | tee "$out/completion.json"
    kill -TERM $pid; wait $pid; tail -5 "$out/serve.log" ;;
  sanitize)
    compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
      node --test --test-concurrency=1 dist/test/cuda.test.js dist/test/cuda-sm90.test.js 2>&1 |
      tee "$out/sanitize.txt" | grep -E '^# (tests|pass|fail)|ERROR SUMMARY|Invalid' | head -40 ;;
  *) echo "usage: gpu-run.sh tests|bench|serve|sanitize" >&2; exit 2 ;;
esac
