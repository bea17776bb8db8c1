// The addon loads, reports capabilities, and both builds compile the same CPU/addon sources.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';

test('capabilities describe the build and the machine', () => {
  const caps = loadNative().capabilities();
  assert.ok(['amx', 'avx512bf16', 'avx512', 'avx2', 'neon', 'scalar'].includes(caps.simd));
  assert.ok(caps.threads >= 1 && caps.threads <= Math.max(1, caps.hardwareThreads));
  assert.ok(['portable', 'full'].includes(caps.build));
  assert.equal(typeof caps.cudaCompiled, 'boolean');
  assert.ok(caps.cudaDevices >= 0);
  if (caps.simd === 'avx512bf16') assert.ok(caps.isa.avx512bf16 && caps.bf16Dot);
  // AMX tiles run the fast bf16 GEMMs exactly when the level says amx (and the CPU has them).
  assert.equal(caps.amxTiles, caps.simd === 'amx');
  if (caps.amxTiles) assert.ok(caps.isa.amxBf16 && caps.bf16Dot);
});

test('binding.gyp and native/CMakeLists.txt compile the same CPU and addon sources', () => {
  const root = packageRoot();
  const gyp = JSON.parse(readFileSync(path.join(root, 'binding.gyp'), 'utf8')) as {
    targets: { sources: string[] }[];
  };
  const gypSources = gyp.targets[0]!.sources.map((s) => path.normalize(s)).sort();
  const cmake = readFileSync(path.join(root, 'native/CMakeLists.txt'), 'utf8');
  const block = /set\(EXPERTD_CPU_SOURCES([\s\S]*?)\)/.exec(cmake);
  assert.ok(block, 'EXPERTD_CPU_SOURCES not found in CMakeLists.txt');
  const cmakeSources = block[1]!.split(/\s+/).filter(Boolean)
    .map((s) => path.normalize(s.replace('${EXPERTD_ROOT}/', ''))).sort();
  assert.deepEqual(cmakeSources, gypSources);
  assert.ok(gypSources.length > 10);
});

test('setNumThreads and setSimdLevel validate their arguments', () => {
  const n = loadNative();
  assert.throws(() => n.setNumThreads(-1), { name: 'RangeError', message: 'threads is -1, expected 0..1024' });
  assert.throws(() => n.setSimdLevel('avx9' as never), {
    name: 'TypeError', message: "level is 'avx9', expected 'auto', 'scalar', 'avx2', 'avx512', 'avx512bf16', 'noamx' or 'amx'",
  });
  const before = n.capabilities().threads;
  assert.equal(n.setNumThreads(1), 1);
  assert.equal(n.setNumThreads(0), n.capabilities().hardwareThreads || 1);
  n.setNumThreads(before);
});
