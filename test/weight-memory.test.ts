// The packed weights' host allocator (native/include/expertd/weight_memory.h): 2 MiB-aligned
// mappings advised MADV_HUGEPAGE, shared 32 MiB chunks for small weights and a mapping of its own
// for each weight of 8 MiB or more. What it holds, that it gives everything back, that a loop of
// loads and disposals does not grow it, and that GEMMs read the same bits from either allocator.
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { test } from 'node:test';

import { loadNative } from '../src/native/index.js';

const n = loadNative();
const MiB = 1 << 20;
const linux = process.platform === 'linux';

function source(rows: number, k: number, seed: number): Float32Array {
  let s = seed;
  return new Float32Array(rows * k).map(() => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32) - 0.5);
}

function withHeap<T>(fn: () => T): T {
  process.env.EXPERTD_HUGE_PAGES = '0';
  try {
    return fn();
  } finally {
    delete process.env.EXPERTD_HUGE_PAGES;
  }
}

test('weights come from shared chunks, big ones from their own mapping, and all of it goes back on dispose', { skip: !linux && 'Linux only (mmap)' }, () => {
  const before = n.weightMemory();
  const small = [0, 1, 2, 3].map((i) => n.packWeight(source(256, 512, i + 1), 'f32', 256, 512, 'int4', 32));
  const big = n.packWeight(source(4096, 2048, 9), 'f32', 4096, 2048);  // f32 kept: 32 MiB
  const held = n.weightMemory();
  // int4 g32: codes (256 x 512 / 2) and bf16 scales (256 x 16 x 2) per weight, two allocations each.
  assert.equal(held.liveAllocations - before.liveAllocations, 4 * 2 + 1);
  assert.equal(held.liveBytes - before.liveBytes, 4 * (256 * 256 + 256 * 16 * 2) + 4096 * 2048 * 4);
  assert.equal(held.dedicated - before.dedicated, 1);
  assert.ok(held.chunks >= 1);
  assert.ok(held.mappedBytes >= held.liveBytes);
  for (const w of small) w.dispose();
  big.dispose();
  const after = n.weightMemory();
  assert.deepEqual({ ...after, hugePages: before.hugePages }, before);
});

test('loading and disposing weights over and over maps no more memory', { skip: !linux && 'Linux only (mmap)' }, () => {
  const before = n.weightMemory();
  const src = source(512, 1024, 3);
  let peak = 0;
  for (let round = 0; round < 20; round++) {
    // 40 weights of 256 KiB + scales: more than one chunk per round.
    const ws = Array.from({ length: 40 }, () => n.packWeight(src, 'f32', 512, 1024, 'int8', 0));
    const keep = n.packWeight(src, 'f32', 16, 64);  // a small weight that outlives its round
    for (const w of ws) w.dispose();
    peak = Math.max(peak, n.weightMemory().mappedBytes);
    keep.dispose();
  }
  const after = n.weightMemory();
  assert.equal(after.mappedBytes, before.mappedBytes, 'every chunk was unmapped');
  assert.equal(after.liveAllocations, before.liveAllocations);
  assert.ok(peak - before.mappedBytes <= 2 * 32 * MiB, `peak ${peak} mapped`);
});

test('transparent huge pages are asked for where the kernel offers them', { skip: !linux && 'Linux only (mmap)' }, (t) => {
  const mode = '/sys/kernel/mm/transparent_hugepage/enabled';
  const setting = existsSync(mode) ? /\[(\w+)\]/.exec(readFileSync(mode, 'utf8'))?.[1] : undefined;
  if (!setting || setting === 'never') {
    t.skip(`transparent huge pages are ${setting ?? 'absent'} here: madvise(MADV_HUGEPAGE) is refused`);
    return;
  }
  const w = n.packWeight(source(64, 64, 5), 'f32', 64, 64);
  assert.equal(n.weightMemory().hugePages, true);
  w.dispose();
});

test('GEMMs read the same bits from huge-page weights and from the C heap (EXPERTD_HUGE_PAGES=0)', () => {
  const rows = 96, k = 320, m = 3;
  const src = source(rows, k, 11);
  const x = source(m, k, 12);
  for (const [format, group] of [[undefined, 0], ['int8', 0], ['int4', 32], ['fp8', 128]] as const) {
    const before = n.weightMemory().liveAllocations;
    const heap = withHeap(() => format ? n.packWeight(src, 'f32', rows, k, format, group) : n.packWeight(src, 'f32', rows, k));
    assert.equal(n.weightMemory().liveAllocations, before, 'EXPERTD_HUGE_PAGES=0 allocates on the C heap');
    const huge = format ? n.packWeight(src, 'f32', rows, k, format, group) : n.packWeight(src, 'f32', rows, k);
    for (const fast of [false, true]) {
      const ya = new Float32Array(m * rows), yb = new Float32Array(m * rows);
      n.denseGemm(x, m, heap, ya, null, false, fast);
      n.denseGemm(x, m, huge, yb, null, false, fast);
      assert.deepEqual(yb, ya, `${format ?? 'bf16'} fast=${fast}`);
    }
    heap.dispose();
    huge.dispose();
  }
});
