// native/cuda/deltanet.cu's gated delta rule (the host function, the chunked and the recurrent
// kernels, as written) run on host threads (test/helpers/cu-threads: a std::thread per CUDA thread,
// barriers for __syncthreads and the shuffles) against the emulator, bit for bit: without a GPU this
// is what ties the kernel source to test/helpers/cuda-emu.ts, whose numbers the other tests check.
// Needs g++ with C++20 (skips without it). exp() is glibc's here and V8's in the emulator: both
// double, rounded to f32, so they agree in every case below; a GPU's may differ in a last bit.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { packageRoot } from '../src/native/index.js';
import { createCudaEmulator } from './helpers/cuda-emu.js';
import { rng, uniform } from './helpers/ops-ref.js';

const root = packageRoot();

function gxxSkip(): string | false {
  const r = spawnSync('g++', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? false : 'no g++ here (the kernel source is compiled for host threads)';
}

/** Splits s at the commas outside parentheses. */
function splitTop(s: string): string[] {
  const parts: string[] = [];
  let depth = 0, at = 0;
  for (let i = 0; i < s.length; i++) {
    if (s[i] === '(') depth++;
    else if (s[i] === ')') depth--;
    else if (s[i] === ',' && depth === 0) {
      parts.push(s.slice(at, i).trim());
      at = i + 1;
    }
  }
  parts.push(s.slice(at).trim());
  return parts;
}

/**
 * deltanet.cu after its CUDA include, with every kernel<<<grid, threads, smem, stream>>>(args) as a
 * host_launch call and the dynamic shared memory as the host block's.
 */
export function hostSource(cu: string): string {
  const inc = '#include "cuda_common.h"';
  const from = cu.indexOf(inc);
  assert.ok(from >= 0, `deltanet.cu no longer includes cuda_common.h: update ${path.basename(import.meta.url)}`);
  const s = cu.slice(from + inc.length).replace(/extern __shared__ float sh\[\];/g, 'float* sh = g_shared;');
  let out = '', i = 0, launches = 0;
  for (;;) {
    const l = s.indexOf('<<<', i);
    if (l < 0) break;
    const name = /(\w+)\s*$/.exec(s.slice(i, l));
    assert.ok(name, 'a <<< launch without a kernel name before it');
    const r = s.indexOf('>>>(', l);
    const cfg = splitTop(s.slice(l + 3, r));
    assert.equal(cfg.length, 4, `launch of ${name[1]}: expected <<<grid, threads, smem, stream>>>`);
    let depth = 1, j = r + 4;
    for (; depth > 0; j++) {
      if (s[j] === '(') depth++;
      else if (s[j] === ')') depth--;
    }
    out += s.slice(i, i + name.index) + `host_launch(${cfg[0]}, ${cfg[1]}, ${cfg[2]}, [&] { ${name[1]}(${s.slice(r + 4, j - 1)}); })`;
    i = j;
    launches++;
  }
  assert.ok(launches >= 3, `found ${launches} kernel launches in deltanet.cu`);
  return out + s.slice(i);
}

interface Case { Hk: number; Hv: number; Dk: number; Dv: number; l2: boolean; lens: number[]; chunk: number; slots: number[];
  poolSlots: number; seqLens?: number[] }

const CASES: Case[] = [
  { Hk: 1, Hv: 2, Dk: 32, Dv: 40, l2: true, lens: [130], chunk: 64, slots: [0], poolSlots: 1 },
  { Hk: 2, Hv: 4, Dk: 16, Dv: 40, l2: true, lens: [1, 130, 1], chunk: 64, slots: [3, 0, 2], poolSlots: 4 },
  { Hk: 2, Hv: 4, Dk: 16, Dv: 40, l2: true, lens: [1, 130, 1], chunk: 64, slots: [3, 0, 2], poolSlots: 4, seqLens: [1, 1, 1] },
  { Hk: 1, Hv: 3, Dk: 20, Dv: 33, l2: true, lens: [85, 0, 41], chunk: 40, slots: [1, 2, 0], poolSlots: 3 },
  { Hk: 2, Hv: 2, Dk: 24, Dv: 16, l2: false, lens: [30, 7], chunk: 12, slots: [1, 0], poolSlots: 2 },
  { Hk: 1, Hv: 1, Dk: 256, Dv: 8, l2: true, lens: [70], chunk: 32, slots: [0], poolSlots: 1 },
];

test('deltanet.cu on host threads == the emulator, bit for bit (chunked, tails, decodes, mixed batch, seqLens)', { skip: gxxSkip() }, () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-cu-threads-'));
  try {
    writeFileSync(path.join(dir, 'deltanet_host.inc'), hostSource(readFileSync(path.join(root, 'native/cuda/deltanet.cu'), 'utf8')));
    const exe = path.join(dir, 'driver');
    const helpers = path.join(root, 'test/helpers/cu-threads');
    execFileSync('g++', ['-std=c++20', '-O1', '-ffp-contract=off', '-pthread', `-I${dir}`, `-I${helpers}`,
      `-I${path.join(root, 'native/include')}`, path.join(helpers, 'driver.cc'), '-o', exe], { stdio: ['ignore', 'ignore', 'pipe'] });
    const cu = createCudaEmulator();
    const up = (a: Float32Array | Int32Array) => {
      const b = cu.cudaBuffer(Math.max(16, a.byteLength));
      cu.cudaCopyToDevice(b, 0, a);
      return b;
    };
    CASES.forEach((c, n) => {
      const { Hk, Hv, Dk, Dv, l2, lens, chunk, poolSlots } = c;
      const T = lens.reduce((a, b) => a + b, 0), B = lens.length;
      const r = rng(3900 + n);
      const kAmp = l2 ? 1 : Math.sqrt(3 / Dk);
      const q = uniform(T * Hk * Dk, r, l2 ? 1 : 2 * kAmp), k = uniform(T * Hk * Dk, r, kAmp), v = uniform(T * Hv * Dv, r);
      const g = Float32Array.from({ length: T * Hv }, () => -r() * 1.5), beta = Float32Array.from({ length: T * Hv }, () => r());
      const per = Hv * Dk * Dv, pool0 = uniform(poolSlots * per, r, 0.5);
      const slots = Int32Array.from(c.slots), starts = new Int32Array(B + 1);
      lens.forEach((len, b) => { starts[b + 1] = starts[b]! + len; });
      const longest = c.seqLens ? Math.max(...c.seqLens) : T;
      const head = Int32Array.of(T, Hk, Hv, Dk, Dv, l2 ? 1 : 0, chunk, B, longest, poolSlots);
      const input = Buffer.concat([head, q, k, v, g, beta, pool0, slots, starts].map((a) => Buffer.from(a.buffer, a.byteOffset, a.byteLength)));
      writeFileSync(path.join(dir, 'in.bin'), input);
      execFileSync(exe, [path.join(dir, 'in.bin'), path.join(dir, 'out.bin')], { stdio: ['ignore', 'ignore', 'pipe'] });
      const res = readFileSync(path.join(dir, 'out.bin'));
      const host = new Float32Array(res.buffer.slice(res.byteOffset, res.byteOffset + res.byteLength));
      const pb = up(pool0), ob = up(new Float32Array(T * Hv * Dv).fill(NaN));
      const bufs = [up(q), up(k), up(v), up(g), up(beta), up(slots), up(starts)];
      cu.cudaGatedDeltaRule(bufs[0]!, bufs[1]!, bufs[2]!, bufs[3]!, bufs[4]!, pb, bufs[5]!, bufs[6]!, B, ob,
        { T, Hk, Hv, Dk, Dv, l2normQk: l2, chunk }, null, c.seqLens ? Int32Array.from(c.seqLens) : undefined);
      const emuOut = new Float32Array(T * Hv * Dv), emuPool = new Float32Array(poolSlots * per);
      cu.cudaCopyToHost(emuOut, ob, 0);
      cu.cudaCopyToHost(emuPool, pb, 0);
      const tag = `case ${n} (Hk ${Hk} Hv ${Hv} Dk ${Dk} Dv ${Dv} l2 ${l2} lens ${lens.join(',')} chunk ${chunk}` +
        `${c.seqLens ? ` seqLens ${c.seqLens.join(',')}` : ''})`;
      assert.deepEqual(host.subarray(0, T * Hv * Dv), emuOut, `${tag}: out`);
      assert.deepEqual(host.subarray(T * Hv * Dv), emuPool, `${tag}: state pool`);
      for (const b of [...bufs, pb, ob]) b.dispose();
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
