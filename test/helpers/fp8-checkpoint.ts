// An FP8 checkpoint for tests, made from a bf16 fixture: its routed experts as e4m3 codes with
// block scales (weight_scale_inv, quantization_config fp8), as DeepSeek-V3 ships them.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { bf16ToF32 } from '../../src/model/kv-dtype.js';
import { readSafetensorsHeader, writeSafetensors, type TensorToWrite } from '../../src/model/safetensors.js';
import { packageRoot } from '../../src/native/index.js';

const fixturesDir = path.join(packageRoot(), 'test', 'fixtures');

/** e4m3fn value of a code. */
export function e4m3(code: number): number {
  const sign = code & 0x80 ? -1 : 1;
  const e = (code >> 3) & 0xf, m = code & 7;
  return sign * (e === 0 ? (m / 8) * 2 ** -6 : (1 + m / 8) * 2 ** (e - 7));
}
const MAGS = Array.from({ length: 127 }, (_, c) => e4m3(c));
export function toE4m3(v: number): number {
  const a = Math.min(Math.abs(v), 448);
  let best = 0;
  for (let c = 1; c < MAGS.length; c++) {
    const d = Math.abs(MAGS[c]! - a), db = Math.abs(MAGS[best]! - a);
    if (d < db || (d === db && c % 2 === 0)) best = c;
  }
  return (v < 0 ? 0x80 : 0) | best;
}

/**
 * The deepseek_v3 fixture with its routed experts in FP8 (br x bc block scales, weight_scale_inv), in a
 * temporary directory the caller removes.
 */
export function makeFp8Checkpoint(br: number, bc: number): string {
  const src = path.join(fixturesDir, 'deepseek_v3');
  const root = mkdtempSync(path.join(os.tmpdir(), 'expertd-cuda-fp8-'));
  const file = path.join(src, 'model.safetensors');
  const header = readSafetensorsHeader(file);
  const bytes = readFileSync(file);
  const out: TensorToWrite[] = [];
  for (const t of header.tensors) {
    const raw = bytes.subarray(header.dataStart + t.begin, header.dataStart + t.end);
    const data = new Uint8Array(raw.byteLength);
    data.set(raw);
    if (!/\.experts\.\d+\.(gate|up|down)_proj\.weight$/.test(t.name) || t.dtype !== 'BF16') {
      out.push({ name: t.name, dtype: t.dtype, shape: t.shape, data });
      continue;
    }
    const [rows, cols] = t.shape as [number, number];
    const w = Float32Array.from(new Uint16Array(data.buffer, 0, rows * cols), bf16ToF32);
    const nbr = Math.ceil(rows / br), nbc = Math.ceil(cols / bc);
    const scale = new Float32Array(nbr * nbc);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const i = Math.floor(r / br) * nbc + Math.floor(c / bc);
        scale[i] = Math.max(scale[i]!, Math.abs(w[r * cols + c]!) / 448);
      }
    const codes = new Uint8Array(rows * cols);
    for (let r = 0; r < rows; r++)
      for (let c = 0; c < cols; c++) {
        const s = scale[Math.floor(r / br) * nbc + Math.floor(c / bc)]!;
        codes[r * cols + c] = s > 0 ? toE4m3(w[r * cols + c]! / s) : 0;
      }
    out.push({ name: t.name, dtype: 'F8_E4M3', shape: [rows, cols], data: codes });
    out.push({ name: `${t.name}_scale_inv`, dtype: 'F32', shape: [nbr, nbc], data: new Uint8Array(scale.buffer) });
  }
  mkdirSync(root, { recursive: true });
  writeSafetensors(path.join(root, 'model.safetensors'), out);
  const config = JSON.parse(readFileSync(path.join(src, 'config.json'), 'utf8')) as Record<string, unknown>;
  config.quantization_config = { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [br, bc] };
  writeFileSync(path.join(root, 'config.json'), JSON.stringify(config));
  for (const f of ['tokenizer.json', 'tokenizer_config.json', 'golden.json'])
    copyFileSync(path.join(src, f), path.join(root, f));
  return root;
}
