// Safetensors reader/writer and the io bindings: round trips, zero-copy views, sharded folders,
// and one test per kind of corrupt file, each asserting its own error.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { loadNative } from '../src/native/index.js';
import {
  CheckpointError, MAX_HEADER_BYTES, openCheckpoint, readSafetensorsHeader, writeSafetensors,
  type TensorToWrite,
} from '../src/model/safetensors.js';
import { fileSeed } from './helpers/seed.js';

const root = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-st-'));
after(() => fs.rmSync(root, { recursive: true, force: true }));
let n = 0;
const freshDir = (): string => {
  const d = path.join(root, `c${n++}`);
  fs.mkdirSync(d);
  return d;
};

const seedBase = fileSeed(0, 'base added to each case seed');
function seeded(seed: number): () => number {
  let s = (seedBase + seed) >>> 0;
  return () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 4294967296);
}

function sample(): TensorToWrite[] {
  const r = seeded(7);
  const f32 = Float32Array.from({ length: 6 * 5 }, () => r() * 2 - 1);
  const bf16 = Uint16Array.from({ length: 4 * 3 }, () => Math.floor(r() * 65536));
  const f16 = Uint16Array.from({ length: 7 }, () => Math.floor(r() * 65536));
  const fp8 = Uint8Array.from({ length: 9 }, () => Math.floor(r() * 256));
  const i64 = BigInt64Array.from([1n, -2n, 3n]);
  const bool = Uint8Array.from([1, 0, 1]);
  return [
    { name: 'a.f32', dtype: 'F32', shape: [6, 5], data: f32 },
    { name: 'b.bf16', dtype: 'BF16', shape: [4, 3], data: bf16 },
    { name: 'c.f16', dtype: 'F16', shape: [7], data: f16 },
    { name: 'd.fp8', dtype: 'F8_E4M3', shape: [3, 3], data: fp8 },
    { name: 'e.i64', dtype: 'I64', shape: [3], data: i64 },
    { name: 'f.bool', dtype: 'BOOL', shape: [3], data: bool },
    { name: 'g.empty', dtype: 'F32', shape: [0, 4], data: new Float32Array(0) },
  ];
}

function assertCheckpointError(fn: () => unknown, pattern: RegExp, file?: string): void {
  assert.throws(fn, (e: unknown) => {
    assert.ok(e instanceof CheckpointError, `expected CheckpointError, got ${String(e)}`);
    assert.match(e.message, pattern);
    if (file) assert.equal(path.basename(e.file ?? ''), file);
    return true;
  });
}

/** Writes a raw safetensors file from a header object and a data section. */
function writeRaw(file: string, header: unknown, data: Uint8Array, headerText?: string): void {
  const json = Buffer.from(headerText ?? JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([len, json, data]));
}

test('round trip: every dtype reads back bit-exact, zero-copy from one mapping', () => {
  const dir = freshDir();
  const tensors = sample();
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  const ck = openCheckpoint(dir);
  assert.deepEqual(ck.names().sort(), tensors.map((t) => t.name).sort());
  assert.equal(ck.headers[0]!.metadata.format, 'pt');
  for (const t of tensors) {
    const info = ck.getTensor(t.name);
    assert.equal(info.dtype, t.dtype);
    assert.deepEqual(info.shape, t.shape);
    assert.equal(info.sizeBytes, t.data.byteLength);
    const got = info.data();
    assert.equal(got.constructor, t.data.constructor, `${t.name} view type`);
    assert.deepEqual(Array.from(got as ArrayLike<unknown>), Array.from(t.data as unknown as ArrayLike<unknown>));
  }
  // Every aligned view shares the one mapped buffer of the file (no copies).
  const a = ck.getTensor('a.f32').data();
  const b = ck.getTensor('b.bf16').data();
  assert.equal(a.buffer, b.buffer);
  assert.equal(ck.copyFallback, false);
  assert.equal(a.buffer.byteLength, fs.statSync(path.join(dir, 'model.safetensors')).size);
});

test('releasePages drops the mapped pages; views read the same values after it; other buffers are refused', () => {
  const native = loadNative();
  const dir = freshDir();
  const tensors = sample();
  writeSafetensors(path.join(dir, 'model.safetensors'), tensors, { format: 'pt' });
  const ck = openCheckpoint(dir);
  const before = tensors.map((t) => Array.from(ck.getTensor(t.name).data() as ArrayLike<unknown>));
  ck.releasePages();
  tensors.forEach((t, i) => assert.deepEqual(Array.from(ck.getTensor(t.name).data() as ArrayLike<unknown>), before[i], t.name));
  // MADV_DONTNEED on the process's own memory would zero it: only live mmapFile mappings are taken.
  const heap = new ArrayBuffer(1 << 16);
  new Uint8Array(heap).fill(7);
  assert.throws(() => native.dropMappedPages(heap), /not a live mmapFile mapping/);
  assert.equal(new Uint8Array(heap)[100], 7);
  assert.throws(() => native.dropMappedPages(new Uint8Array(4) as unknown as ArrayBuffer), /takes an ArrayBuffer/);
});

test('a misaligned tensor is copied to an aligned buffer with the right values', () => {
  const dir = freshDir();
  const f = Float32Array.from([1.5, -2.25, 3.125]);
  const data = new Uint8Array(1 + 12);
  data[0] = 7;
  data.set(new Uint8Array(f.buffer), 1);
  // Header padded so that the data section starts 8-aligned: F32 at data offset 1 is misaligned.
  let text = JSON.stringify({
    u: { dtype: 'U8', shape: [1], data_offsets: [0, 1] },
    x: { dtype: 'F32', shape: [3], data_offsets: [1, 13] },
  });
  text += ' '.repeat((8 - ((8 + text.length) % 8)) % 8);
  writeRaw(path.join(dir, 'model.safetensors'), null, data, text);
  const ck = openCheckpoint(dir);
  const x = ck.getTensor('x').data() as Float32Array;
  assert.ok(x instanceof Float32Array);
  assert.deepEqual(Array.from(x), [1.5, -2.25, 3.125]);
  assert.equal(x.byteOffset, 0);
  assert.equal(x.buffer.byteLength, 12);
  assert.deepEqual(Array.from(ck.getTensor('u').data() as Uint8Array), [7]);
});

test('getTensor names a missing tensor', () => {
  const dir = freshDir();
  writeSafetensors(path.join(dir, 'model.safetensors'), sample());
  const ck = openCheckpoint(dir);
  assertCheckpointError(() => ck.getTensor('model.layers.0.nope.weight'), /tensor model\.layers\.0\.nope\.weight is not in the checkpoint/);
});

test('sharded checkpoint through model.safetensors.index.json', () => {
  const dir = freshDir();
  const t = sample();
  writeSafetensors(path.join(dir, 'model-00001-of-00002.safetensors'), t.slice(0, 3));
  writeSafetensors(path.join(dir, 'model-00002-of-00002.safetensors'), t.slice(3));
  const weightMap: Record<string, string> = {};
  t.forEach((x, i) => { weightMap[x.name] = i < 3 ? 'model-00001-of-00002.safetensors' : 'model-00002-of-00002.safetensors'; });
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
  const ck = openCheckpoint(dir);
  assert.equal(ck.files.length, 2);
  assert.equal(path.basename(ck.getTensor('e.i64').file), 'model-00002-of-00002.safetensors');
  assert.deepEqual(Array.from(ck.getTensor('a.f32').data() as Float32Array), Array.from(t[0]!.data as Float32Array));

  // The index placing a tensor in the wrong shard is an error naming both.
  weightMap['a.f32'] = 'model-00002-of-00002.safetensors';
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: weightMap }));
  assertCheckpointError(() => openCheckpoint(dir), /places a\.f32 in model-00002-of-00002\.safetensors, but it is in model-00001-of-00002\.safetensors/);

  // The index naming a missing shard.
  weightMap['a.f32'] = 'model-00003-of-00002.safetensors';
  fs.writeFileSync(path.join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: weightMap }));
  assertCheckpointError(() => openCheckpoint(dir), /names model-00003-of-00002\.safetensors, which is missing/);
});

test('a folder of *.safetensors without an index opens every file; a tensor in two files is an error', () => {
  const dir = freshDir();
  const t = sample();
  writeSafetensors(path.join(dir, 'part-a.safetensors'), t.slice(0, 2));
  writeSafetensors(path.join(dir, 'part-b.safetensors'), t.slice(2));
  assert.equal(openCheckpoint(dir).tensors.size, t.length);
  writeSafetensors(path.join(dir, 'part-c.safetensors'), t.slice(0, 1));
  assertCheckpointError(() => openCheckpoint(dir), /tensor a\.f32 appears in both part-a\.safetensors and part-c\.safetensors/);
  assertCheckpointError(() => openCheckpoint(freshDir()), /no \.safetensors files/);
});

test('corrupt files: each gives its own error naming the file', () => {
  const dir = freshDir();
  const file = path.join(dir, 'model.safetensors');
  const good = (): void => writeSafetensors(file, sample());

  // Too short for the length prefix.
  fs.writeFileSync(file, Buffer.from([1, 2, 3]));
  assertCheckpointError(() => readSafetensorsHeader(file), /too short for the 8-byte header length/, 'model.safetensors');

  // Header length over the limit.
  const big = Buffer.alloc(16);
  big.writeBigUInt64LE(BigInt(MAX_HEADER_BYTES) + 1n);
  fs.writeFileSync(file, big);
  assertCheckpointError(() => readSafetensorsHeader(file), /header length is 104857601 bytes, more than the 104857600-byte limit/, 'model.safetensors');

  // Header length past the end of the file.
  const past = Buffer.alloc(20);
  past.writeBigUInt64LE(1000n);
  fs.writeFileSync(file, past);
  assertCheckpointError(() => readSafetensorsHeader(file), /header length is 1000 bytes but the file has only 20 bytes/);

  // Malformed JSON.
  writeRaw(file, null, new Uint8Array(0), '{"a": {"dtype": "F32",');
  assertCheckpointError(() => readSafetensorsHeader(file), /header is not valid JSON/);

  // Unknown dtype: says which and what is supported.
  writeRaw(file, { w: { dtype: 'F4', shape: [2], data_offsets: [0, 1] } }, new Uint8Array(1));
  assertCheckpointError(() => readSafetensorsHeader(file), /tensor w: unsupported dtype "F4"; supported: F64, F32, F16, BF16, F8_E4M3/);

  // Shape x dtype disagrees with the byte range.
  writeRaw(file, { w: { dtype: 'F32', shape: [2, 3], data_offsets: [0, 20] } }, new Uint8Array(24));
  assertCheckpointError(() => readSafetensorsHeader(file), /tensor w: shape \[2, 3\] x F32 is 24 bytes but data_offsets \[0, 20\] span 20 bytes/);

  // Range outside the file.
  writeRaw(file, { w: { dtype: 'F32', shape: [4], data_offsets: [8, 24] } }, new Uint8Array(16));
  assertCheckpointError(() => readSafetensorsHeader(file), /tensor w: data ends at byte \d+ but the file has only \d+ bytes/);

  // Overlapping tensors.
  writeRaw(file, {
    a: { dtype: 'F32', shape: [4], data_offsets: [0, 16] },
    b: { dtype: 'F32', shape: [2], data_offsets: [8, 16] },
  }, new Uint8Array(16));
  assertCheckpointError(() => readSafetensorsHeader(file), /tensors a \[0, 16\) and b \[8, 16\) overlap/);

  // Bad shape / offsets.
  writeRaw(file, { w: { dtype: 'F32', shape: [-1], data_offsets: [0, 4] } }, new Uint8Array(4));
  assertCheckpointError(() => readSafetensorsHeader(file), /shape \[-1\] is not a list of non-negative integers/);
  writeRaw(file, { w: { dtype: 'F32', shape: [1], data_offsets: [4, 0] } }, new Uint8Array(4));
  assertCheckpointError(() => readSafetensorsHeader(file), /data_offsets \[4,0\] is not \[begin, end\]/);

  // A good file truncated by one byte.
  good();
  const size = fs.statSync(file).size;
  fs.truncateSync(file, size - 1);
  assertCheckpointError(() => openCheckpoint(dir), /data ends at byte \d+ but the file has only \d+ bytes \(truncated/, 'model.safetensors');
  good();
  assert.equal(openCheckpoint(dir).tensors.size, sample().length);
});

test('writeSafetensors rejects data that does not match the shape', () => {
  const file = path.join(freshDir(), 'x.safetensors');
  assertCheckpointError(
    () => writeSafetensors(file, [{ name: 'w', dtype: 'BF16', shape: [2, 2], data: new Uint16Array(3) }]),
    /tensor w \[2, 2\] BF16 needs 8 bytes, data has 6/);
  assert.equal(fs.existsSync(file), false);
});

test('mmapFile and readFileRange: real bytes, empty files, E_IO errors naming the path', () => {
  const native = loadNative();
  const dir = freshDir();
  const file = path.join(dir, 'bytes.bin');
  const bytes = Uint8Array.from({ length: 10000 }, (_, i) => (i * 31 + 7) & 255);
  fs.writeFileSync(file, bytes);
  const m = new Uint8Array(native.mmapFile(file));
  assert.equal(m.length, bytes.length);
  assert.deepEqual(m.subarray(0, 100), bytes.subarray(0, 100));
  assert.equal(m[9999], bytes[9999]);

  const dst = new Uint8Array(300).fill(0xee);
  native.readFileRange(file, 4321, dst);
  assert.deepEqual(dst, bytes.subarray(4321, 4621));

  const empty = path.join(dir, 'empty.bin');
  fs.writeFileSync(empty, '');
  assert.equal(native.mmapFile(empty).byteLength, 0);

  const missing = path.join(dir, 'missing.bin');
  assert.throws(() => native.mmapFile(missing), (e: Error & { code?: string }) =>
    e.code === 'E_IO' && e.message.includes(missing));
  assert.throws(() => native.readFileRange(file, 9900, new Uint8Array(200)), (e: Error & { code?: string }) =>
    e.code === 'E_IO' && e.message.includes(file) && /end of file/.test(e.message));
  assert.throws(() => native.readFileRange(file, -1, dst), (e: Error) =>
    e instanceof RangeError && e.message === 'offset is -1, expected 0..9007199254740992');
  assert.throws(() => native.readFileRange(file, 0, new Uint16Array(4) as unknown as Uint8Array),
    (e: Error) => e instanceof TypeError && e.message === 'dst must be a Uint8Array');
  assert.throws(() => (native.mmapFile as unknown as (p: unknown) => void)(42),
    (e: Error) => e instanceof TypeError && e.message === 'path must be a string');
});

/** Float64 reference of fp8 e4m3fn -> value. */
function e4m3(b: number): number {
  const s = b & 0x80 ? -1 : 1;
  const e = (b >> 3) & 15;
  const m = b & 7;
  if (e === 15 && m === 7) return NaN;
  return e === 0 ? s * (m / 8) * 2 ** -6 : s * (1 + m / 8) * 2 ** (e - 7);
}

function bf16ToF32(u: number): number {
  const b = new Uint32Array([u << 16]);
  return new Float32Array(b.buffer)[0]!;
}

test('FP8 weights with block scales load as bf16 through dequantFp8', (t) => {
  const native = loadNative();
  try {
    native.dequantFp8(new Uint8Array(1), new Float32Array(1), 1, 1, 1, 1, new Uint16Array(1));
  } catch (e) {
    t.skip(`dequantFp8 is not available in this build: ${(e as Error).message}`);
    return;
  }
  const dir = freshDir();
  const rows = 5;
  const cols = 6;
  const r = seeded(11);
  const q = Uint8Array.from({ length: rows * cols }, () => {
    let b = Math.floor(r() * 256);
    if ((b & 0x7f) === 0x7f) b ^= 1;  // no NaN codes
    return b;
  });
  const scale = Float32Array.from([0.5, 2, 0.25, 4, 1.5, 3]);  // [ceil(5/2), ceil(6/3)] = [3, 2]
  writeSafetensors(path.join(dir, 'model.safetensors'), [
    { name: 'w.weight', dtype: 'F8_E4M3', shape: [rows, cols], data: q },
    { name: 'w.weight_scale_inv', dtype: 'F32', shape: [3, 2], data: scale },
  ]);
  const ck = openCheckpoint(dir, { fp8BlockSize: [2, 3] });
  const got = ck.loadWeightBf16OrNative('w.weight');
  assert.equal(got.dtype, 'bf16');
  for (let i = 0; i < rows; i++) {
    for (let j = 0; j < cols; j++) {
      const want = e4m3(q[i * cols + j]!) * scale[Math.floor(i / 2) * 2 + Math.floor(j / 3)]!;
      const v = bf16ToF32(got.data[i * cols + j]!);
      assert.ok(Math.abs(v - want) <= Math.abs(want) * 2 ** -8, `(${i}, ${j}): ${v} vs ${want}`);
    }
  }
  const wrong = openCheckpoint(dir, { fp8BlockSize: [128, 128] });
  assertCheckpointError(() => wrong.loadWeightBf16OrNative('w.weight'), /w\.weight_scale_inv has shape \[3, 2\], expected \[1, 1\]/);
});

test('FP8 scales per output channel and per tensor (compressed-tensors weight_scale) spread over the 1 x 128 grid', () => {
  const dir = freshDir();
  const rows = 5, cols = 300;  // three 128-column groups, the last ragged
  const r = seeded(12);
  const q = Uint8Array.from({ length: rows * cols }, () => {
    let b = Math.floor(r() * 256);
    if ((b & 0x7f) === 0x7f) b ^= 1;
    return b;
  });
  const channel = [0.5, 0.125, 3, 1.5, 0.0078125];  // exact in bf16
  const bf16 = (v: number) => new Uint16Array(new Float32Array([v]).buffer)[1]!;  // exact: the f32's high half
  writeSafetensors(path.join(dir, 'model.safetensors'), [
    { name: 'c.weight', dtype: 'F8_E4M3', shape: [rows, cols], data: q },
    { name: 'c.weight_scale', dtype: 'BF16', shape: [rows, 1], data: Uint16Array.from(channel, bf16) },
    { name: 't.weight', dtype: 'F8_E4M3', shape: [rows, cols], data: q },
    { name: 't.weight_scale', dtype: 'F32', shape: [1], data: new Float32Array([0.25]) },
    { name: 'x.weight', dtype: 'F8_E4M3', shape: [rows, cols], data: q },
    { name: 'x.weight_scale', dtype: 'F32', shape: [rows, 2], data: new Float32Array(rows * 2) },
  ]);
  const ck = openCheckpoint(dir, { fp8BlockSize: [1, 128], fp8ScaleSuffix: '_scale' });
  const native = loadNative();
  for (const [name, scaleOf] of [['c', (i: number) => channel[i]!], ['t', () => 0.25]] as const) {
    const f = ck.loadFp8(`${name}.weight`)!;
    assert.deepEqual([f.rows, f.cols, f.br, f.bc], [rows, cols, 1, 128]);
    assert.deepEqual([...f.scaleInv], Array.from({ length: rows * 3 }, (_, i) => scaleOf(Math.floor(i / 3))), `${name}: the grid`);
    // Kept FP8 by the packer: every element is code * its row's scale, exactly.
    const w = native.packFp8(f.codes, f.scaleInv, rows, cols, f.br, f.bc);
    const deq = ck.loadWeightBf16OrNative(`${name}.weight`);
    for (let i = 0; i < rows; i++)
      for (let j = 0; j < cols; j++) {
        const want = e4m3(q[i * cols + j]!) * scaleOf(i);
        assert.equal(native.packedWeightAt(w, i, j), want, `${name} (${i}, ${j})`);
        assert.ok(Math.abs(bf16ToF32(deq.data[i * cols + j]!) - want) <= Math.abs(want) * 2 ** -8, `${name} bf16 (${i}, ${j})`);
      }
    w.dispose();
  }
  assertCheckpointError(() => ck.loadFp8('x.weight'),
    /x\.weight_scale has shape \[5, 2\], expected \[5, 3\] for a \[5, 300\] weight in 1x128 blocks, \[5, 1\] \(one scale per output channel\) or \[1\]/);
  // A per-channel scale cannot sit on blocks of several rows.
  const blocks = openCheckpoint(dir, { fp8BlockSize: [128, 128], fp8ScaleSuffix: '_scale' });
  assertCheckpointError(() => blocks.loadFp8('c.weight'), /c\.weight_scale has shape \[5, 1\], expected \[1, 3\] .* or \[1\] \(one scale per tensor\)/);
  assert.deepEqual([...blocks.loadFp8('t.weight')!.scaleInv], [0.25, 0.25, 0.25]);
});

test('loadWeightBf16OrNative returns bf16/f32 weights as stored and rejects others', () => {
  const dir = freshDir();
  writeSafetensors(path.join(dir, 'model.safetensors'), sample());
  const ck = openCheckpoint(dir);
  const b = ck.loadWeightBf16OrNative('b.bf16');
  assert.equal(b.dtype, 'bf16');
  assert.equal(b.data, b.data);
  assert.equal(ck.loadWeightBf16OrNative('a.f32').dtype, 'f32');
  assert.equal(ck.loadWeightBf16OrNative('c.f16').dtype, 'f16');
  assertCheckpointError(() => ck.loadWeightBf16OrNative('e.i64'), /has dtype I64; weights must be BF16, F16, F32/);
  assertCheckpointError(() => ck.loadWeightBf16OrNative('d.fp8'), /d\.fp8_scale_inv \(its scales\) is missing/);
});
