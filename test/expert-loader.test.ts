// The native ExpertLoader (the offloader's copy thread): slot fills equal packGateUp/packWeight of
// the same bytes bit for bit (per-expert, fused and gpt-oss layouts, bf16 and f32), jobs run by priority
// (FIFO among equals, wait() raises a queued job to the top), cancel drops only queued jobs, read
// errors come back from wait() as text with the process alive, bad arguments raise exact errors.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, type DType, type ExpertLoadJob, type PackedWeight } from '../src/native/index.js';
import { mulberry32 } from '../src/engine/rng.js';
import { fileSeed } from './helpers/seed.js';

const n = loadNative();

const seedBase = fileSeed(0, 'base added to each case seed');
const rng = (seed: number) => mulberry32(seedBase + seed);

interface Fixture { file: string; I: number; H: number; dtype: DType; E: number; bytes: number; data: Uint8Array }

/** A file of E experts, each gate [I, H] | up [I, H] | down [H, I] back to back, after a 40-byte header. */
function fixture(I: number, H: number, dtype: DType, E: number, seed: number): Fixture {
  const r = rng(seed);
  const es = dtype === 'f32' ? 4 : 2;
  const bytes = I * H * es;
  const data = new Uint8Array(40 + E * 3 * bytes);
  if (dtype === 'f32') {
    const f = new Float32Array(data.buffer, 40, E * 3 * I * H);
    for (let i = 0; i < f.length; i++) f[i] = r() * 2 - 1;
  } else {
    for (let i = 40; i < data.length; i++) data[i] = Math.floor(r() * 256);
    // Keep bf16 values finite (exponent never all ones) so that comparisons are plain.
    for (let i = 41; i < data.length; i += 2) data[i] = data[i]! & 0x7e;
  }
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-loader-')), 'experts.bin');
  fs.writeFileSync(file, data);
  return { file, I, H, dtype, E, bytes, data };
}

function view(fx: Fixture, offset: number): Float32Array | Uint16Array {
  const count = fx.I * fx.H;
  const buf = fx.data.slice(offset, offset + fx.bytes).buffer;
  return fx.dtype === 'f32' ? new Float32Array(buf, 0, count) : new Uint16Array(buf, 0, count);
}

function ranges(fx: Fixture, e: number): Pick<ExpertLoadJob, 'gate' | 'up' | 'down'> {
  const base = 40 + e * 3 * fx.bytes;
  return {
    gate: { path: fx.file, offset: base, sizeBytes: fx.bytes },
    up: { path: fx.file, offset: base + fx.bytes, sizeBytes: fx.bytes },
    down: { path: fx.file, offset: base + 2 * fx.bytes, sizeBytes: fx.bytes },
  };
}

function slot(fx: Fixture): { gateUp: PackedWeight; down: PackedWeight } {
  return { gateUp: n.allocPackedWeight(fx.dtype, 'gate_up', 2 * fx.I, fx.H), down: n.allocPackedWeight(fx.dtype, 'plain', fx.H, fx.I) };
}

/** Every element of a vs b, compared as f32 bit patterns. */
function sameWeights(a: PackedWeight, b: PackedWeight, label: string): void {
  assert.equal(a.n, b.n);
  assert.equal(a.k, b.k);
  const f = new Float32Array(2);
  const u = new Uint32Array(f.buffer);
  for (let r = 0; r < a.n; r++)
    for (let c = 0; c < a.k; c++) {
      f[0] = n.packedWeightAt(a, r, c);
      f[1] = n.packedWeightAt(b, r, c);
      if (u[0] !== u[1]) assert.fail(`${label}: element (${r}, ${c}) is ${f[0]}, expected ${f[1]}`);
    }
}

// gpt-oss's layout: the expert's gate_up [H, 2I] (gate = even columns, up = odd) and down [I, H] as
// the checkpoint has them, rearranged on the copy thread; the reference transposes by index here.
test("loader: layout 'gpt_oss' fills slots equal to packGateUp/packWeight of the transposed, de-interleaved bytes", () => {
  for (const [I, H, dtype] of [[16, 32, 'bf16'], [12, 40, 'f32']] as const) {
    const fx = fixture(I, H, dtype, 3, I * 300 + H);
    const loader = new n.ExpertLoader();
    for (let e = 0; e < fx.E; e++) {
      const dst = slot(fx);
      const base = 40 + e * 3 * fx.bytes;
      const t = loader.submit({
        layout: 'gpt_oss', dtype, dst, priority: 0,
        gateUp: { path: fx.file, offset: base, sizeBytes: 2 * fx.bytes },
        down: { path: fx.file, offset: base + 2 * fx.bytes, sizeBytes: fx.bytes },
      });
      assert.equal(loader.wait(t), null);
      const a = view(fx, base), b = view(fx, base + fx.bytes), d = view(fx, base + 2 * fx.bytes);
      const guAt = (h: number, c: number) => { const i = h * 2 * I + c; return i < I * H ? a[i]! : b[i - I * H]!; };
      const make = (count: number) => (dtype === 'f32' ? new Float32Array(count) : new Uint16Array(count));
      const gate = make(I * H), up = make(I * H), down = make(H * I);
      for (let i = 0; i < I; i++)
        for (let h = 0; h < H; h++) {
          gate[i * H + h] = guAt(h, 2 * i);
          up[i * H + h] = guAt(h, 2 * i + 1);
          down[h * I + i] = d[i * H + h]!;
        }
      const want = n.packGateUp(gate, up, dtype, I, H);
      const wantDown = n.packWeight(down, dtype, H, I);
      sameWeights(dst.gateUp, want, `gpt_oss ${dtype} ${I}x${H} expert ${e} gate_up`);
      sameWeights(dst.down, wantDown, `gpt_oss ${dtype} ${I}x${H} expert ${e} down`);
      for (const w of [want, wantDown, dst.gateUp, dst.down]) w.dispose();
    }
    assert.equal(loader.stats().bytesRead, fx.E * 3 * fx.bytes);
    loader.dispose();
  }
});

test('loader fills slots equal to packGateUp/packWeight of the same bytes, bit for bit', () => {
  for (const [I, H, dtype] of [[16, 32, 'bf16'], [24, 40, 'bf16'], [17, 33, 'bf16'], [20, 12, 'f32']] as const) {
    const fx = fixture(I, H, dtype, 3, I * 100 + H);
    const loader = new n.ExpertLoader();
    for (let e = 0; e < fx.E; e++) {
      const dst = slot(fx);
      // Poison the slot so that an unwritten element shows.
      const nan = dtype === 'f32' ? new Float32Array(I * H).fill(NaN) : new Uint16Array(I * H).fill(0x7fc0);
      n.repackInto(dst.gateUp, nan, dtype, nan);
      n.repackInto(dst.down, nan, dtype);
      const t = loader.submit({ ...ranges(fx, e), dtype, dst, priority: 0 });
      assert.equal(loader.wait(t), null);
      const base = 40 + e * 3 * fx.bytes;
      const want = n.packGateUp(view(fx, base), view(fx, base + fx.bytes), dtype, I, H);
      const wantDown = n.packWeight(view(fx, base + 2 * fx.bytes), dtype, H, I);
      sameWeights(dst.gateUp, want, `${dtype} ${I}x${H} expert ${e} gate_up`);
      sameWeights(dst.down, wantDown, `${dtype} ${I}x${H} expert ${e} down`);
      for (const w of [want, wantDown, dst.gateUp, dst.down]) w.dispose();
    }
    const st = loader.stats();
    assert.equal(st.jobsDone, fx.E);
    assert.equal(st.bytesRead, fx.E * 3 * fx.bytes);
    assert.ok(st.busySeconds >= st.readSeconds && st.readSeconds > 0);
    assert.equal(loader.inFlight, 0);
    loader.dispose();
    assert.equal(loader.disposed, true);
  }
});

test('loader runs jobs by priority, FIFO among equals; wait() raises a queued job; cancel drops queued jobs only', () => {
  const fx = fixture(16, 32, 'bf16', 1, 5);
  const loader = new n.ExpertLoader();
  const dst = slot(fx);
  const job = (priority: number, delayUs: number): number => loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst, priority, delayUs });
  // A long first job holds the thread while the others queue behind it.
  const blocker = job(0, 200_000);
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 50); // let the thread pick it up
  const a = job(1, 40_000);
  const b = job(3, 40_000);
  const c = job(2, 40_000);
  const d = job(3, 40_000);
  const x = job(-5, 40_000);
  assert.equal(loader.inFlight, 6);
  assert.equal(loader.poll(blocker), false);
  assert.equal(loader.cancel(x), true, 'a queued job can be cancelled');
  assert.throws(() => loader.wait(x), (e: Error) => e instanceof RangeError && /ticket \d+ is not pending/.test(e.message));
  assert.equal(loader.cancel(blocker), false, 'the running job cannot be cancelled');
  assert.equal(loader.wait(b), null);
  // b ran right after the blocker; d (same priority, later) next: a and c have not finished.
  assert.equal(loader.poll(a), false);
  assert.equal(loader.poll(c), false);
  assert.equal(loader.wait(a), null, 'waiting raises a to the top: it runs before c');
  assert.equal(loader.poll(c), false);
  assert.equal(loader.poll(d), true, 'd (priority 3) ran before a was raised');
  assert.equal(loader.wait(d), null);
  assert.equal(loader.wait(c), null);
  assert.equal(loader.wait(blocker), null);
  assert.equal(loader.inFlight, 0);
  const st = loader.stats();
  assert.equal(st.jobsDone, 5);
  assert.ok(st.simulatedSeconds >= 0.3, `simulated ${st.simulatedSeconds}`);
  loader.dispose();
  dst.gateUp.dispose();
  dst.down.dispose();
});

test('loader errors come back from wait() as text; weights stay alive through dispose', () => {
  const fx = fixture(16, 32, 'bf16', 1, 9);
  const loader = new n.ExpertLoader();
  const dst = slot(fx);
  const missing = loader.submit({ ...ranges(fx, 0), gate: { path: `${fx.file}.missing`, offset: 0, sizeBytes: fx.bytes }, dtype: 'bf16', dst, priority: 0 });
  assert.match(loader.wait(missing) ?? '', /cannot open .*experts\.bin\.missing/);
  const short = loader.submit({ ...ranges(fx, 0), down: { path: fx.file, offset: fx.data.length - 10, sizeBytes: fx.bytes }, dtype: 'bf16', dst, priority: 0 });
  assert.match(loader.wait(short) ?? '', /short read of .*experts\.bin at \d+: end of file/);
  // The loader still works after failures.
  assert.equal(loader.wait(loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst, priority: 0 })), null);
  // Disposing the JS handles of a slot while its load runs is safe: the job holds the weights.
  const d2 = slot(fx);
  const t = loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst: d2, priority: 0, delayUs: 20_000 });
  d2.gateUp.dispose();
  d2.down.dispose();
  assert.equal(loader.wait(t), null);
  // dispose() finishes the running job and drops queued ones.
  const run = loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst, priority: 0, delayUs: 30_000 });
  loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst, priority: 0 });
  assert.ok(run > 0);
  loader.dispose();
  loader.dispose();
  assert.throws(() => loader.submit({ ...ranges(fx, 0), dtype: 'bf16', dst, priority: 0 }), (e: Error & { code?: string }) => e.code === 'E_DISPOSED');
  assert.throws(() => loader.inFlight, (e: Error & { code?: string }) => e.code === 'E_DISPOSED');
  dst.gateUp.dispose();
  dst.down.dispose();
});

test('loader arguments are checked with exact messages', () => {
  const fx = fixture(16, 32, 'bf16', 1, 3);
  const loader = new n.ExpertLoader();
  const dst = slot(fx);
  const ok: ExpertLoadJob = { ...ranges(fx, 0), dtype: 'bf16', dst, priority: 0 };
  const bad = (job: unknown, type: typeof TypeError | typeof RangeError, msg: string) =>
    assert.throws(() => loader.submit(job as ExpertLoadJob), (e: Error) => e instanceof type && e.message === msg, msg);
  bad({ ...ok, gate: { ...ok.gate, sizeBytes: 10 } }, RangeError, 'job.gate.sizeBytes is 10, expected 1024 ([16, 32] bf16)');
  bad({ ...ok, down: { ...ok.down, offset: -1 } }, RangeError, 'job.down.offset is -1, expected 0..9007199254740992');
  bad({ ...ok, up: { ...ok.up, path: '' } }, TypeError, 'job.up.path must be a non-empty string');
  bad({ ...ok, dst: { gateUp: dst.gateUp, down: {} } }, TypeError, 'job.dst.down must be a PackedWeight');
  bad({ ...ok, dst: { gateUp: dst.down, down: dst.down } }, TypeError, 'job.dst.gateUp must be a gate_up weight');
  bad({ ...ok, priority: NaN }, TypeError, 'job.priority must be a number');
  bad({ ...ok, delayUs: -1 }, RangeError, 'job.delayUs is -1.000000, expected 0..1e7');
  bad({ ...ok, dtype: 'f8' }, TypeError, "job.dtype is 'f8', expected 'f32', 'bf16' or 'f16'");
  const wrong = n.allocPackedWeight('bf16', 'plain', 32, 8);
  bad({ ...ok, dst: { gateUp: dst.gateUp, down: wrong } }, RangeError, 'job.dst.down shape is [32, 8], expected [32, 16] (gateUp is [32, 32])');
  assert.throws(() => loader.wait(12345), (e: Error) => e instanceof RangeError && e.message === 'ticket 12345 is not pending (already waited for, cancelled, or never submitted)');
  assert.throws(() => n.allocPackedWeight('bf16', 'gate_up', 7, 4), (e: Error) => e instanceof RangeError && e.message === 'n is 7, expected an even number for a gate_up weight (2 * inter)');
  assert.throws(() => n.allocPackedWeight('bf16', 'dense' as 'plain', 8, 4), (e: Error) => e instanceof TypeError && e.message === "kind is 'dense', expected 'plain' or 'gate_up'");
  // FP8 jobs: e4m3 codes (1 byte per weight) and f32 block scales into fp8 slots of group bc.
  const r = (f: string, off: number, sizeBytes: number) => ({ path: f, offset: off, sizeBytes });
  const f8dst = { gateUp: n.allocPackedWeight('bf16', 'gate_up', 32, 32, 'fp8', 16), down: n.allocPackedWeight('bf16', 'plain', 32, 16, 'fp8', 16) };
  const f8: ExpertLoadJob = {
    gate: r(fx.file, 40, 512), up: r(fx.file, 552, 512), down: r(fx.file, 1064, 512), dtype: 'bf16', dst: f8dst, priority: 0,
    fp8Block: [8, 16], gateScale: r(fx.file, 0, 16), upScale: r(fx.file, 16, 16), downScale: r(fx.file, 0, 16),
  };
  bad({ ...f8, fp8Block: [8] }, TypeError, 'job.fp8Block must be [blockRows, blockCols]');
  bad({ ...f8, fp8Block: [0, 16] }, RangeError, 'job.fp8Block[0] must be a positive integer');
  bad({ ...f8, gate: r(fx.file, 40, 1024) }, RangeError, 'job.gate.sizeBytes is 1024, expected 512 ([16, 32] e4m3)');
  bad({ ...f8, dst }, TypeError, 'job.dst weights must be fp8 weights of group 16 (fp8Block[1]) for an FP8 job');
  bad({ ...f8, gateScale: r(fx.file, 0, 4) }, RangeError, 'job.gateScale.sizeBytes is 4, expected 16 ([2, 2] f32)');
  bad({ ...f8, downScale: r(fx.file, 0, 8) }, RangeError, 'job.downScale.sizeBytes is 8, expected 16 ([4, 1] f32)');
  assert.equal(loader.inFlight, 0, 'no bad job was queued');
  loader.dispose();
  for (const w of [dst.gateUp, dst.down, wrong, f8dst.gateUp, f8dst.down]) w.dispose();
});

test('loader FP8 jobs spread per-channel (bf16) and per-tensor (f16) scales onto the 1 x 128 grid, as packFp8 of the spread scales', () => {
  // An expert of I 40, H 300: gate/up rows have three 128-column groups (the last ragged), down two.
  const I = 40, H = 300, r = rng(77);
  const codes = (len: number) => Uint8Array.from({ length: len }, () => {
    const b = Math.floor(r() * 256);
    return (b & 0x7f) === 0x7f ? b ^ 1 : b;  // no NaN codes
  });
  const [gc, uc, dc] = [codes(I * H), codes(I * H), codes(H * I)];
  // Scales exact in bf16 and f16: k / 64 for k = 1..
  const channel = (rows: number) => Float32Array.from({ length: rows }, () => (1 + Math.floor(r() * 60)) / 64);
  const [gs, us, ds] = [channel(I), channel(I), channel(H)];
  const bf16 = (a: Float32Array) => new Uint8Array(Uint16Array.from(new Uint32Array(a.buffer), (u) => u >>> 16).buffer);
  const f16 = (v: number) => { const a = new Uint16Array(1); n.convert(new Float32Array([v]), 'f32', a, 'f16'); return new Uint8Array(a.buffer); };
  const parts = [gc, uc, dc, bf16(gs), bf16(us), bf16(ds), f16(0.375), f16(1.25), f16(0.0625)];
  const offsets: number[] = [];
  let at = 8;
  for (const p of parts) { offsets.push(at); at += p.length; }
  const buf = new Uint8Array(at);
  parts.forEach((p, i) => buf.set(p, offsets[i]!));
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-loader-fp8-')), 'experts.bin');
  fs.writeFileSync(file, buf);
  const rg = (i: number) => ({ path: file, offset: offsets[i]!, sizeBytes: parts[i]!.length });
  const spread = (rows: number, cols: number, at: (row: number) => number) =>
    Float32Array.from({ length: rows * Math.ceil(cols / 128) }, (_, i) => at(Math.floor(i / Math.ceil(cols / 128))));
  const loader = new n.ExpertLoader();
  try {
    for (const [form, dtype, scaleRanges, want] of [
      ['channel', 'bf16', [3, 4, 5], [spread(I, H, (x) => gs[x]!), spread(I, H, (x) => us[x]!), spread(H, I, (x) => ds[x]!)]],
      ['tensor', 'f16', [6, 7, 8], [spread(I, H, () => 0.375), spread(I, H, () => 1.25), spread(H, I, () => 0.0625)]],
    ] as const) {
      const dst = { gateUp: n.allocPackedWeight('bf16', 'gate_up', 2 * I, H, 'fp8', 128), down: n.allocPackedWeight('bf16', 'plain', H, I, 'fp8', 128) };
      const t = loader.submit({
        gate: rg(0), up: rg(1), down: rg(2), dtype: 'bf16', dst, priority: 0, fp8Block: [1, 128],
        gateScale: rg(scaleRanges[0]), upScale: rg(scaleRanges[1]), downScale: rg(scaleRanges[2]), fp8Scales: { dtype, form },
      });
      assert.equal(loader.wait(t), null);
      const gu = n.packFp8(gc, want[0], I, H, 1, 128, uc, want[1]), dn = n.packFp8(dc, want[2], H, I, 1, 128);
      for (const [a, b, rows, cols] of [[dst.gateUp, gu, 2 * I, H], [dst.down, dn, H, I]] as const)
        for (let row = 0; row < rows; row++)
          for (let c = 0; c < cols; c += 7)
            assert.equal(n.packedWeightAt(a, row, c), n.packedWeightAt(b, row, c), `${form}: (${row}, ${c})`);
      for (const w of [dst.gateUp, dst.down, gu, dn]) w.dispose();
    }
    const dst = { gateUp: n.allocPackedWeight('bf16', 'gate_up', 2 * I, H, 'fp8', 128), down: n.allocPackedWeight('bf16', 'plain', H, I, 'fp8', 128) };
    const job: ExpertLoadJob = {
      gate: rg(0), up: rg(1), down: rg(2), dtype: 'bf16', dst, priority: 0, fp8Block: [1, 128],
      gateScale: rg(3), upScale: rg(4), downScale: rg(5), fp8Scales: { dtype: 'bf16', form: 'channel' },
    };
    assert.throws(() => loader.submit({ ...job, downScale: rg(3) }), { name: 'RangeError', message: `job.downScale.sizeBytes is ${2 * I}, expected ${2 * H} ([${H}, 1] bf16)` });
    assert.throws(() => loader.submit({ ...job, fp8Block: [2, 128] }), { name: 'RangeError', message: "job.fp8Scales.form 'channel' needs fp8Block rows 1, got 2" });
    assert.throws(() => loader.submit({ ...job, fp8Scales: { form: 'rows' as never } }), { name: 'TypeError', message: "job.fp8Scales.form must be 'grid', 'channel' or 'tensor'" });
    assert.throws(() => loader.submit({ ...job, fp8Scales: { dtype: 'f64' as never } }), { name: 'TypeError' });
    dst.gateUp.dispose();
    dst.down.dispose();
  } finally {
    loader.dispose();
  }
});
