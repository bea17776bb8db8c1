#!/usr/bin/env bash
# The GPU runbook in one call, on a lent GPU machine from the repo root with .gpu/ carried (made by
# bench/gpu-pack.sh): run(command="bash bench/gpu-run.sh", carry=[".gpu"], timeout_s=480).
# Steps in order, each under `timeout` within one time budget, logs and JSON into $OUT as it goes:
#   gate      capabilities(), libraries, nvidia-smi, torch -> machine.json; no usable device: exit 3 at once
#   ops       the CUDA op tests against float64 (cuda.test, cuda-quant, op/glue args, library lookup, Gated DeltaNet) -> tests.txt
#   sm90      the sm_90a self-check, then every forced sm90 tile against float64 -> tests.txt
#   kernels   bench kernels --device cuda at 1, 16, 256, 4096 rows/expert, few reps, vs torch -> kernels-cuda.*
#   quant     bench kernels-quant: the quantized GroupGemm per format vs bf16 and torch (_scaled_mm) -> kernels-cuda.md
#   deltanet  bench kernels-deltanet: the chunked gated delta rule prefill (4096 tokens) and decode b1/b64 vs HF's torch functions and fla -> kernels-cuda.md
#   serve     bench gpu-serve: serve --device cuda vs --device cpu through the API -> gpu-serve.json
#   devstep   bench device-step: host time per decode step in cuda* calls, waits and JS (run.log)
#   logits    bench device-logits: the device's logits on the bench checkpoints vs the CPU f32 engine (run.log)
#   engine    the device engine tests (cuda-model, cuda-offload, cuda-serve) -> tests.txt
#   intckpt   GPTQ, AWQ and compressed-tensors int checkpoints whole on the device (their GPU tests; AWQ's
#             int4 with zero points) -> tests.txt
#   sanitize  compute-sanitizer memcheck on the op tests, with the time left -> sanitize.txt
# Emulator-only tests are skipped (EXPERTD_SKIP_EMULATOR=1). Every step's rc and seconds go to
# summary.json as it ends; the table printed last is what the device tool's reply shows.
#   --standin  on a machine without a GPU (here): no gate exit, the serve step's cuda daemon on the
#              CPU emulator with a short load; times the runbook end to end (see bench/README.md).
#   GPU_RUN_BUDGET_S (default 420): the whole run's seconds, under the call's timeout_s (480): with a
#              machine start that leaves room for one rerun of some steps in a 15-minute lease.
#   GPU_RUN_STEPS: a comma list to run only some steps (gate always runs).
set -euo pipefail  # for the setup; the steps below run with -e off, each judged by its rc
standin=0
[ "${1:-}" = "--standin" ] && standin=1
out="${OUT:-/tmp/expertd-gpu-out}"
budget="${GPU_RUN_BUDGET_S:-420}"
only="${GPU_RUN_STEPS:-}"
t0=$(date +%s)
mkdir -p "$out"
exec > >(tee -a "$out/run.log") 2>&1
tee_pid=$!
# Ends the run after tee has written everything (the device tool's reply shows the output's tail).
finish() {
  exec 1>&- 2>&-
  wait "$tee_pid" 2>/dev/null
  exit "$1"
}

# --- setup (set -e: a broken pack stops here, loudly)
if [ -f .gpu/node.xz ]; then
  mkdir -p /tmp/expertd-node
  xz -dc .gpu/node.xz >/tmp/expertd-node/node
  chmod +x /tmp/expertd-node/node
  export PATH="/tmp/expertd-node:$PATH"
  tar -xJf .gpu/app.tar.xz
  echo "gpu-run: pack of commit $(cat .gpu/commit 2>/dev/null || echo '?')$( [ -s .gpu/dirty ] && echo ' (with uncommitted changes)')"
elif [ ! -f dist/src/native/index.js ]; then
  # Without a pack the runbook runs from a built checkout (npx tsc -p . && npm run build:gpu).
  echo "gpu-run: no .gpu/ and no dist/ here: run bench/gpu-pack.sh first and carry .gpu" >&2
  exit 2
fi
command -v node >/dev/null
[ -f build-full/Release/expertd.node ] || { echo "gpu-run: build-full/Release/expertd.node is missing" >&2; exit 2; }
export EXPERTD_SKIP_EMULATOR=1
py=python3
[ "$standin" = 1 ] && [ -x "$HOME/ref/bin/python" ] && py="$HOME/ref/bin/python"
set +e

steps_json=""
failed=0
summary() {
  printf '{"standin": %s, "budgetS": %s, "elapsedS": %s, "steps": [%s]}\n' \
    "$standin" "$budget" "$(( $(date +%s) - t0 ))" "${steps_json#,}" >"$out/summary.json"
}
# step NAME CAP_S CMD...: runs CMD under timeout min(CAP_S, what the budget has left - 15 s).
step() {
  local name=$1 cap=$2
  shift 2
  if [ -n "$only" ] && [ "$name" != gate ] && [[ ",$only," != *",$name,"* ]]; then return 0; fi
  local left=$(( budget - ($(date +%s) - t0) - 15 ))
  local limit=$(( cap < left ? cap : left ))
  local status rc s1=$(date +%s)
  if [ "$limit" -lt 20 ]; then
    status="skipped: no time left (${left} s)"
    rc=0
  else
    echo "=== gpu-run: $name (timeout ${limit} s) ==="
    # A fresh bash runs the step (the functions below are exported), so that timeout can end it whole.
    timeout --kill-after=10 "$limit" bash -c '"$@"' step "$@"
    rc=$?
    if [ $rc = 0 ]; then status=ok
    elif [ $rc = 124 ] || [ $rc = 137 ]; then status="timed out after ${limit} s"; failed=1
    else status="failed (rc $rc)"; failed=1
    fi
  fi
  local secs=$(( $(date +%s) - s1 ))
  echo "=== gpu-run: $name: $status in ${secs} s ==="
  steps_json="$steps_json,{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"timeoutS\": $limit}"
  summary
}
tests() {  # TAP into tests.txt; the tally and failures on the console
  local label=$1
  shift
  echo "### $label" >>"$out/tests.txt"
  node --test --test-concurrency=1 "$@" 2>&1 | tee -a "$out/tests.txt" | grep -E '^# (tests|pass|fail|skipped)|^not ok|^ +not ok'
  return "${PIPESTATUS[0]}"
}

# --- gate: a GPU run with no usable device ends here, with the CUDA error (no fake green)
gate() {
  node --input-type=module -e "
    import { loadNative, noCudaDeviceReason } from './dist/src/native/index.js';
    import { execFileSync } from 'node:child_process';
    const n = loadNative();
    const caps = n.capabilities();
    const run = (cmd, args) => { try { return execFileSync(cmd, args, { encoding: 'utf8', timeout: 60000, stdio: ['ignore', 'pipe', 'pipe'] }).trim(); } catch (e) { return 'unavailable: ' + String(e.message).split('\n')[0]; } };
    const info = {
      capabilities: caps, noDevice: noCudaDeviceReason(caps),
      libraries: caps.cudaCompiled ? n.cudaLibraries() : null,
      gemmPaths: caps.cudaCompiled ? n.cudaGemmPaths() : null,
      devices: caps.cudaDevices > 0 ? Array.from({ length: caps.cudaDevices }, (_, i) => n.cudaDeviceInfo(i)) : [],
      nvidiaSmi: run('nvidia-smi', ['--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw,pstate', '--format=csv,noheader']),
      torch: run('$py', ['-c', 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())']),
      node: process.version,
    };
    (await import('node:fs')).writeFileSync('$out/machine.json', JSON.stringify(info, null, 2) + '\n');
    console.log('capabilities:', caps.build, 'build,', caps.cudaDevices, 'device(s)', caps.cudaError ? '(' + caps.cudaError + ')' : '');
    console.log('devices:', info.devices.map((d) => d.name + ' cc ' + d.computeCapability).join(', ') || 'none');
    console.log('cuBLASLt:', info.libraries?.cublasLt.path ?? 'none (' + (info.libraries?.cublasLt.tried.join('; ') ?? '-') + ')');
    console.log('NCCL:', info.libraries?.nccl.path ?? 'none');
    console.log('nvidia-smi:', info.nvidiaSmi, '| torch:', info.torch, '| node', process.version);
    if (info.noDevice) { console.error('gpu-run: ' + info.noDevice); process.exit($standin === 1 ? 0 : 3); }
  "
}
export -f tests gate
export out py standin
step gate 60 gate
if [ "$failed" != 0 ]; then
  echo "gpu-run: the gate failed: no usable CUDA device, nothing else runs (see machine.json)"
  finish 3
fi

step ops 90 tests ops dist/test/cuda.test.js dist/test/cuda-quant.test.js dist/test/cuda-op-args.test.js dist/test/cuda-glue-args.test.js dist/test/cuda-libs.test.js dist/test/cuda-deltanet.test.js
step sm90 60 tests sm90 dist/test/cuda-sm90.test.js
if [ "$standin" = 1 ]; then
  step kernels 150 node dist/bench/index.js kernels --device cuda --rows 1,16,256,4096 --reps 5 --warmup 2 --python "$py" --json "$out/kernels-cuda.json"
  step quant 60 node dist/bench/index.js kernels-quant --standin --shape tiny:64:32:8:4 --rows 1,16 --reps 3 --warmup 1
  step deltanet 60 node dist/bench/index.js kernels-deltanet --standin --shape 2:4:32:32 --tokens 256 --batches 1,4 --reps 2 --warmup 1
  # The CPU emulator stands in for the device, on a tiny fixture: the plumbing timed, not the model.
  step serve 150 env EXPERTD_CUDA_STANDIN="$PWD/dist/test/helpers/cuda-emu.js" \
    node dist/bench/index.js gpu-serve --model-dir test/fixtures/qwen2_moe --prompt-len 64 --max-tokens 8 --json "$out/gpu-serve.json"
else
  step kernels 120 bash -c "set -o pipefail; node dist/bench/index.js kernels --device cuda --rows 1,16,256,4096 --reps 5 --warmup 2 --python '$py' --json '$out/kernels-cuda.json' | tee '$out/kernels-cuda.md'"
  # Its table goes after the kernels step's in kernels-cuda.md (8 files at most come back).
  step quant 90 bash -c "set -o pipefail; node dist/bench/index.js kernels-quant --rows 1,16,256 --reps 10 --warmup 2 --python '$py' | tee -a '$out/kernels-cuda.md'"
  step deltanet 60 bash -c "set -o pipefail; node dist/bench/index.js kernels-deltanet --reps 10 --warmup 3 --python '$py' | tee -a '$out/kernels-cuda.md'"
  step serve 120 node dist/bench/index.js gpu-serve --json "$out/gpu-serve.json"
fi
# Where a decode step's host time goes (launch-bound or not: what CUDA graphs would remove).
if [ "$standin" = 1 ]; then
  step devstep 60 node dist/bench/index.js device-step --standin --batches 1,8 --steps 4 --prompt-len 16
else
  step devstep 60 node dist/bench/index.js device-step --model mixtral-like --batches 1,8 --steps 32 --prompt-len 128
fi
# The device's logits on the bench checkpoints against the CPU f32 engine (is a greedy difference a
# near-tie or a fault?), bf16 and --quantize fp8 (dequantised and FP8-activation GroupGemm).
if [ "$standin" = 1 ]; then
  step logits 90 node dist/bench/index.js device-logits --models mixtral-like --formats bf16 --tokens 4
else
  # mixtral-like bf16 + fp8, 12 tokens: 93 s on the H200 machine (2026-12-04), most of it the CPU engines.
  step logits 150 node dist/bench/index.js device-logits --models mixtral-like --formats bf16,fp8 --tokens 12
fi
step engine 90 tests engine dist/test/cuda-model.test.js dist/test/cuda-offload.test.js dist/test/cuda-serve.test.js
# Int-code checkpoints (GPTQ, compressed-tensors W8A8 / W4A16) whole on the device: only their GPU tests.
step intckpt 60 tests intckpt --test-name-pattern='on the device \(gpu' dist/test/gptq.test.js dist/test/awq.test.js dist/test/compressed-tensors.test.js
if command -v compute-sanitizer >/dev/null; then
  step sanitize 150 bash -c "set -o pipefail; compute-sanitizer --tool memcheck --target-processes all --print-limit 20 node --test --test-concurrency=1 dist/test/cuda.test.js dist/test/cuda-sm90.test.js dist/test/cuda-deltanet.test.js 2>&1 | tee '$out/sanitize.txt' | grep -E '^# (tests|pass|fail)|ERROR SUMMARY|Invalid' | head -40"
elif [ -z "$only" ] || [[ ",$only," == *",sanitize,"* ]]; then
  steps_json="$steps_json,{\"step\": \"sanitize\", \"status\": \"skipped: no compute-sanitizer\", \"rc\": 0, \"seconds\": 0, \"timeoutS\": 0}"
  summary
fi

summary
echo
echo "| step | status | seconds |"
echo "|:--|:--|--:|"
node -e "for (const s of JSON.parse(require('fs').readFileSync('$out/summary.json', 'utf8')).steps) console.log('| ' + s.step + ' | ' + s.status + ' | ' + s.seconds + ' |')"
echo "gpu-run: $(( $(date +%s) - t0 )) s in all (budget ${budget} s); files in $out"
finish $failed
