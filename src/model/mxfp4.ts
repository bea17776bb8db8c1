// MXFP4 checkpoint data (OCP MX FP4, as gpt-oss ships its experts): e2m1 codes two per byte in
// blocks of 32 values with one e8m0 scale each. Kept so in memory (packMxfp4); dequantised here only
// where plain weights are asked for (--quantize, references).
import { loadNative, type PackedWeight } from '../native/index.js';
import type { TensorSource } from './tensor-source.js';
import { ShapeError } from './weights.js';

/** An MXFP4 weight [rows, cols] as stored: blocks [rows, cols/32, 16] (two e2m1 codes per byte, low
 * nibble first), scales [rows, cols/32] e8m0 (2^(s - 127)). */
export interface Mxfp4Weight {
  blocks: Uint8Array;
  scales: Uint8Array;
  rows: number;
  cols: number;
}

/** An MXFP4 checkpoint's expert kept in MXFP4: gate/up [I, H] and down [H, I]. */
export function packMxfp4Expert(ex: { gate: Mxfp4Weight; up: Mxfp4Weight; down: Mxfp4Weight }):
    { gateUp: PackedWeight; down: PackedWeight } {
  const n = loadNative();
  const { gate, up, down } = ex;
  return {
    gateUp: n.packMxfp4(gate.blocks, gate.scales, gate.rows, gate.cols, up.blocks, up.scales),
    down: n.packMxfp4(down.blocks, down.scales, down.rows, down.cols),
  };
}

// e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; code 8 is -0.
const E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];

/** The f32 values of an MXFP4 weight [rows, cols] (exact: e2m1 times a power of two; scale 255 is NaN). */
export function dequantMxfp4(w: Mxfp4Weight): Float32Array {
  const out = new Float32Array(w.rows * w.cols);
  const groups = w.cols / 32;
  for (let r = 0; r < w.rows; r++) {
    for (let g = 0; g < groups; g++) {
      const s = w.scales[r * groups + g]!;
      const scale = s === 255 ? NaN : 2 ** (s - 127);
      const b0 = (r * groups + g) * 16, o = r * w.cols + g * 32;
      for (let j = 0; j < 16; j++) {
        const byte = w.blocks[b0 + j]!;
        out[o + 2 * j] = E2M1[byte & 0xf]! * scale;
        out[o + 2 * j + 1] = E2M1[byte >> 4]! * scale;
      }
    }
  }
  return out;
}

/**
 * gpt-oss MXFP4 experts: gate_up_proj_blocks [E, 2I, H/32, 16] (output rows, gate and up
 * interleaved: row 2i is gate row i, 2i + 1 up row i) with scales [E, 2I, H/32]; down_proj_blocks
 * [E, H, I/32, 16] with scales [E, H, I/32]. Expert e's gate and up rows are split apart (a copy of
 * its blocks: half a byte per weight); down is a view.
 */
export function gptOssMxfp4(src: TensorSource, p: string, E: number, H: number, I: number):
    (e: number) => { gate: Mxfp4Weight; up: Mxfp4Weight; down: Mxfp4Weight } {
  const u8 = (name: string, shape: number[]) => {
    const t = src.getU8!(name);
    if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i]))
      throw new ShapeError(`tensor ${name} has shape [${t.shape.join(', ')}], but the config implies [${shape.join(', ')}]`);
    return t.data;
  };
  const guB = u8(`${p}experts.gate_up_proj_blocks`, [E, 2 * I, H / 32, 16]);
  const guS = u8(`${p}experts.gate_up_proj_scales`, [E, 2 * I, H / 32]);
  const dnB = u8(`${p}experts.down_proj_blocks`, [E, H, I / 32, 16]);
  const dnS = u8(`${p}experts.down_proj_scales`, [E, H, I / 32]);
  const rowB = H / 2, rowS = H / 32;
  return (e: number) => {
    const half = (odd: number): Mxfp4Weight => {
      const blocks = new Uint8Array(I * rowB), scales = new Uint8Array(I * rowS);
      for (let i = 0; i < I; i++) {
        const row = e * 2 * I + 2 * i + odd;
        blocks.set(guB.subarray(row * rowB, (row + 1) * rowB), i * rowB);
        scales.set(guS.subarray(row * rowS, (row + 1) * rowS), i * rowS);
      }
      return { blocks, scales, rows: I, cols: H };
    };
    const db = (H * I) / 2, ds = (H * I) / 32;
    return {
      gate: half(0), up: half(1),
      down: { blocks: dnB.subarray(e * db, (e + 1) * db), scales: dnS.subarray(e * ds, (e + 1) * ds), rows: H, cols: I },
    };
  };
}
