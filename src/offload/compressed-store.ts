// The expert cache's slow tier for int-code checkpoints (compressed-tensors, GPTQ and AWQ int8 / int4 experts):
// an expert's stored codes (`X.weight` I8 or `X.weight_packed` I32, with `X.weight_zero_point` where stored;
// GPTQ's and AWQ's `X.qweight` with its qzeros and g_idx) and scales are read from the checkpoint file
// with real I/O (pread) and packed into its slot as int8 / int4, so a slot costs what the resident
// expert costs (about 1 or 0.5 bytes per weight plus scales). Loads run on the engine thread (the
// native copy thread reads bf16/f16/f32 and FP8 experts only).
import { loadNative, type FileRange } from '../native/index.js';
import { dequantInt, intWeightOf, type CompressedParts } from '../model/compressed-tensors.js';
import { gptqIntWeight, type GptqParts } from '../model/gptq.js';
import { CheckpointError, gptqName, type Checkpoint, type TensorInfo } from '../model/safetensors.js';
import type { ModelSpec } from '../model/spec.js';
import type { IntWeight } from '../model/tensor-source.js';
import { quantizedBytes, type QuantizeSpec } from '../model/quantize.js';
import { foldDownPerm, intScaleDtype, intZeros, sharedPerm } from '../model/weights.js';
import { EngineThreadExpertStore, packRequantized } from './engine-thread-store.js';
import { expertTensorPrefix, moeLayerIndices, type SlotWeights } from './expert-store.js';

/** One stored tensor of an expert's matrix: where it is in the file, its dtype and shape. */
interface StoredPart {
  range: FileRange;
  dtype: string;
  shape: number[];
}

/**
 * One stored matrix of an expert with what reading it back needs: compressed-tensors' codes (`X.weight`
 * I8 or `X.weight_packed` I32) and scale, or GPTQ's qweight, qzeros, scales and g_idx (absent: null).
 */
interface IntRanges {
  name: string;
  parts: Record<string, StoredPart | null>;
  /** weight_shape [rows, cols] (compressed-tensors packed codes). */
  shape: [number, number] | null;
}

/** The parts that hold scales (widened to f32 when read). */
const SCALE_PARTS = new Set(['scale', 'scales']);

const up8 = (v: number) => Math.ceil(v / 8) * 8;
const partsOf = (r: IntRanges) => Object.values(r.parts).filter((p): p is StoredPart => p !== null);

export class CompressedExpertStore extends EngineThreadExpertStore<IntRanges[]> {
  readonly expertBytes: number;
  readonly slotBytes: number;
  private readonly H: number;
  private readonly I: number;
  private readonly ranges: IntRanges[][][]; // [moeLayer][expert][gate, up, down]
  /** One expert's stored codes and scales, back to back (8-byte aligned); grown on first use. */
  private stage: ArrayBuffer | null = null;

  /** --quantize: slots hold the dequantised experts re-quantized to that format instead. */
  constructor(private readonly checkpoint: Checkpoint, spec: ModelSpec, private readonly quantize: QuantizeSpec | null = null) {
    super();
    const H = (this.H = spec.hidden);
    const I = (this.I = spec.moe.intermediate);
    const E = spec.moe.numExperts;
    const names = expertTensorPrefix(spec);
    const part = (t: TensorInfo): StoredPart => ({ range: { path: t.file, offset: t.offset, sizeBytes: t.sizeBytes }, dtype: t.dtype, shape: t.shape });
    const scalePart = (t: TensorInfo): StoredPart => {
      if (t.dtype !== 'F32' && t.dtype !== 'BF16' && t.dtype !== 'F16') throw new CheckpointError(`${t.name} has dtype ${t.dtype}, expected F32, BF16 or F16 scales`, t.file);
      return part(t);
    };
    const range = (name: string): IntRanges => {
      if (checkpoint.options.gptq) {
        const t = (p: string) => checkpoint.getTensor(gptqName(name, p));
        const g = checkpoint.has(gptqName(name, 'g_idx')) ? part(t('g_idx')) : null;
        return { name, parts: { qweight: part(t('qweight')), qzeros: part(t('qzeros')), scales: scalePart(t('scales')), g_idx: g }, shape: null };
      }
      const packed = checkpoint.has(`${name}_packed`);
      const c = checkpoint.getTensor(packed ? `${name}_packed` : name);
      if (c.dtype !== 'I8' && c.dtype !== 'I32') throw new CheckpointError(`expert offloading of a compressed-tensors checkpoint: ${c.name} is ${c.dtype}, expected I8 or I32`, c.file);
      const shape = packed ? checkpoint.weightShape(name) as [number, number] : null;
      const zp = checkpoint.has(`${name}_zero_point`) ? part(checkpoint.getTensor(`${name}_zero_point`)) : null;
      const gi = checkpoint.has(`${name}_g_idx`) ? part(checkpoint.getTensor(`${name}_g_idx`)) : null;
      return { name, parts: { codes: part(c), scale: scalePart(checkpoint.getTensor(`${name}_scale`)), zero_point: zp, g_idx: gi }, shape };
    };
    this.ranges = moeLayerIndices(spec).map((li) => {
      const p = `model.layers.${li}.${names.block}experts.`;
      return Array.from({ length: E }, (_, e) => [names.gate, names.up, names.down].map((n) => range(`${p}${e}.${n}.weight`)));
    });
    const first = this.ranges[0]?.[0] ?? [];
    this.expertBytes = first.reduce((a, r) => a + partsOf(r).reduce((b, p) => b + p.range.sizeBytes, 0), 0);
    // The slot format: the first expert's (every expert is checked against it when it loads), or --quantize's.
    const probe = first.length ? this.read(first) : null;
    const own: QuantizeSpec = probe ? { format: probe[0].bits === 8 ? 'int8' : 'int4', group: probe[0].group } : { format: 'int8', group: 0 };
    const downQ: QuantizeSpec = probe ? { format: probe[2].bits === 8 ? 'int8' : 'int4', group: probe[2].group } : own;
    this.slotBytes = quantize
      ? quantizedBytes(quantize, 2 * I, H, true) + quantizedBytes(quantize, H, I, false)
      : quantizedBytes(own, 2 * I, H, true, probe ? intScaleDtype(probe[0], probe[1]) : 'f32', !!(probe?.[0].zeros || probe?.[1].zeros)) +
        quantizedBytes(downQ, H, I, false, probe ? intScaleDtype(probe[2]) : 'f32', !!probe?.[2].zeros);
  }

  protected get where(): string {
    return this.checkpoint.dir;
  }

  protected rangesOf(layer: number, expert: number): IntRanges[] | undefined {
    return this.ranges[layer]?.[expert];
  }

  /** pread of an expert's three matrices, decoded to codes and f32 scales. */
  private read(r: IntRanges[]): [IntWeight, IntWeight, IntWeight] {
    const n = loadNative();
    const t0 = performance.now();
    const need = r.reduce((a, m) => a + partsOf(m).reduce((b, p) => b + up8(p.range.sizeBytes), 0), 0);
    if (!this.stage || this.stage.byteLength < need) this.stage = n.allocHostBuffer(need);
    const stage = this.stage;
    let off = 0;
    const out = r.map((m) => {
      // Each part read into the stage, as its dtype's array (scales widened to f32).
      const got: Record<string, { dtype: string; shape: number[]; data: Int8Array | Int32Array | Float32Array }> = {};
      for (const [key, p] of Object.entries(m.parts)) {
        if (!p) continue;
        const at = off;
        n.readFileRange(p.range.path, p.range.offset, new Uint8Array(stage, at, p.range.sizeBytes));
        off += up8(p.range.sizeBytes);
        let data: Int8Array | Int32Array | Float32Array;
        if (SCALE_PARTS.has(key) && p.dtype !== 'F32') {
          data = new Float32Array(p.range.sizeBytes / 2);
          n.convert(new Uint16Array(stage, at, data.length), p.dtype === 'BF16' ? 'bf16' : 'f16', data, 'f32');
        } else if (p.dtype === 'F32') data = new Float32Array(stage, at, p.range.sizeBytes / 4);
        else if (p.dtype === 'I32') data = new Int32Array(stage, at, p.range.sizeBytes / 4);
        else data = new Int8Array(stage, at, p.range.sizeBytes);
        got[key] = { dtype: p.dtype, shape: p.shape, data };
      }
      const fail = (msg: string) => new CheckpointError(msg, Object.values(m.parts)[0]!.range.path);
      const gptq = this.checkpoint.options.gptq;
      if (gptq) {
        return gptqIntWeight(m.name, {
          qweight: got.qweight as GptqParts['qweight'], qzeros: got.qzeros as GptqParts['qzeros'],
          scales: got.scales as GptqParts['scales'], gIdx: (got.g_idx ?? null) as GptqParts['gIdx'],
        }, gptq, fail);
      }
      return intWeightOf(m.name, {
        codes: got.codes as CompressedParts['codes'], scale: got.scale as CompressedParts['scale'], shape: m.shape,
        zeroPoint: (got.zero_point ?? null) as CompressedParts['zeroPoint'], gIdx: (got.g_idx ?? null) as CompressedParts['gIdx'],
      }, this.checkpoint.options.compressed ?? { bits: [4, 8], groupSizes: [] }, fail);
    });
    this.readSeconds += (performance.now() - t0) / 1000;
    return out as [IntWeight, IntWeight, IntWeight];
  }

  protected load(r: IntRanges[], slot: SlotWeights): void {
    const n = loadNative();
    const { H, I } = this;
    // An act-order down projection's input order folded into gate's and up's rows (as the resident experts').
    const { gate, up, down } = foldDownPerm(...this.read(r));
    const q = this.quantize;
    if (q) {
      const [g, u, d] = [gate, up, down].map(dequantInt) as [Float32Array, Float32Array, Float32Array];
      packRequantized(slot, g, u, d, q, H, I);
      return;
    }
    const fmt = (w: IntWeight) => (w.bits === 8 ? 'int8' : 'int4');
    const gz = intZeros(gate, up), perm = sharedPerm(gate, up);
    const dz = intZeros(down);
    if (slot.gateUp) n.repackIntInto(slot.gateUp, gate.codes, gate.scales, up.codes, up.scales, gz.zeros, gz.upZeros, perm);
    else slot.gateUp = n.packInt(gate.codes, gate.scales, I, H, fmt(gate), gate.group, up.codes, up.scales, intScaleDtype(gate, up),
      gz.zeros, gz.upZeros, perm);
    if (slot.down) n.repackIntInto(slot.down, down.codes, down.scales, null, null, dz.zeros);
    else slot.down = n.packInt(down.codes, down.scales, H, I, fmt(down), down.group, null, null, intScaleDtype(down), dz.zeros);
  }

}
