// The expert cache's slow tier for compressed-tensors checkpoints (int8 / int4 experts): an expert's
// stored codes (`X.weight` I8 or `X.weight_packed` I32) and scales are read from the checkpoint file
// with real I/O (pread) and packed into its slot as int8 / int4, so a slot costs what the resident
// expert costs (about 1 or 0.5 bytes per weight plus scales). Loads run on the engine thread (the
// native copy thread reads bf16/f16/f32 and FP8 experts only).
import { loadNative, type FileRange } from '../native/index.js';
import { dequantInt, intWeightOf } from '../model/compressed-tensors.js';
import { CheckpointError, type Checkpoint } from '../model/safetensors.js';
import type { ModelSpec } from '../model/spec.js';
import type { IntWeight } from '../model/tensor-source.js';
import { quantizedBytes, type QuantizeSpec } from '../model/quantize.js';
import { intScaleDtype } from '../model/weights.js';
import { EngineThreadExpertStore, packRequantized } from './engine-thread-store.js';
import { expertTensorPrefix, moeLayerIndices, type SlotWeights } from './expert-store.js';

/** One stored matrix of an expert: its codes and scales in the file, with what reading them back needs. */
interface IntRanges {
  name: string;
  codes: FileRange;
  codesDtype: 'I8' | 'I32';
  codesShape: number[];
  scale: FileRange;
  scaleDtype: 'F32' | 'BF16' | 'F16';
  scaleShape: number[];
  /** weight_shape [rows, cols] (packed codes). */
  shape: [number, number] | null;
}

const up8 = (v: number) => Math.ceil(v / 8) * 8;

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
    const range = (name: string): IntRanges => {
      const packed = checkpoint.has(`${name}_packed`);
      const c = checkpoint.getTensor(packed ? `${name}_packed` : name);
      const s = checkpoint.getTensor(`${name}_scale`);
      if (c.dtype !== 'I8' && c.dtype !== 'I32') throw new CheckpointError(`expert offloading of a compressed-tensors checkpoint: ${c.name} is ${c.dtype}, expected I8 or I32`, c.file);
      if (s.dtype !== 'F32' && s.dtype !== 'BF16' && s.dtype !== 'F16') throw new CheckpointError(`${s.name} has dtype ${s.dtype}, expected F32, BF16 or F16 scales`, s.file);
      const shape = packed ? checkpoint.weightShape(name) as [number, number] : null;
      return {
        name, codesDtype: c.dtype, codesShape: c.shape, scaleDtype: s.dtype, scaleShape: s.shape, shape,
        codes: { path: c.file, offset: c.offset, sizeBytes: c.sizeBytes },
        scale: { path: s.file, offset: s.offset, sizeBytes: s.sizeBytes },
      };
    };
    this.ranges = moeLayerIndices(spec).map((li) => {
      const p = `model.layers.${li}.${names.block}experts.`;
      return Array.from({ length: E }, (_, e) => [names.gate, names.up, names.down].map((n) => range(`${p}${e}.${n}.weight`)));
    });
    const first = this.ranges[0]?.[0] ?? [];
    this.expertBytes = first.reduce((a, r) => a + r.codes.sizeBytes + r.scale.sizeBytes, 0);
    // The slot format: the first expert's (every expert is checked against it when it loads), or --quantize's.
    const probe = first.length ? this.read(first) : null;
    const own: QuantizeSpec = probe ? { format: probe[0].bits === 8 ? 'int8' : 'int4', group: probe[0].group } : { format: 'int8', group: 0 };
    const downQ: QuantizeSpec = probe ? { format: probe[2].bits === 8 ? 'int8' : 'int4', group: probe[2].group } : own;
    this.slotBytes = quantize
      ? quantizedBytes(quantize, 2 * I, H, true) + quantizedBytes(quantize, H, I, false)
      : quantizedBytes(own, 2 * I, H, true, probe ? intScaleDtype(probe[0], probe[1]) : 'f32') +
        quantizedBytes(downQ, H, I, false, probe ? intScaleDtype(probe[2]) : 'f32');
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
    const need = r.reduce((a, m) => a + up8(m.codes.sizeBytes) + up8(m.scale.sizeBytes), 0);
    if (!this.stage || this.stage.byteLength < need) this.stage = n.allocHostBuffer(need);
    const stage = this.stage;
    let off = 0;
    const take = (f: FileRange) => {
      const at = off;
      n.readFileRange(f.path, f.offset, new Uint8Array(stage, at, f.sizeBytes));
      off += up8(f.sizeBytes);
      return at;
    };
    const out = r.map((m) => {
      const codesAt = take(m.codes), scaleAt = take(m.scale);
      let scales: Float32Array;
      if (m.scaleDtype === 'F32') scales = new Float32Array(stage, scaleAt, m.scale.sizeBytes / 4);
      else {
        scales = new Float32Array(m.scale.sizeBytes / 2);
        n.convert(new Uint16Array(stage, scaleAt, scales.length), m.scaleDtype === 'BF16' ? 'bf16' : 'f16', scales, 'f32');
      }
      const data = m.codesDtype === 'I8' ? new Int8Array(stage, codesAt, m.codes.sizeBytes)
        : new Int32Array(stage, codesAt, m.codes.sizeBytes / 4);
      return intWeightOf(m.name, {
        codes: { dtype: m.codesDtype, shape: m.codesShape, data },
        scale: { dtype: m.scaleDtype, shape: m.scaleShape, data: scales },
        shape: m.shape,
      }, this.checkpoint.options.compressed ?? { bits: [4, 8], groupSizes: [] }, (msg) => new CheckpointError(msg, m.codes.path));
    });
    this.readSeconds += (performance.now() - t0) / 1000;
    return out as [IntWeight, IntWeight, IntWeight];
  }

  protected load(r: IntRanges[], slot: SlotWeights): void {
    const n = loadNative();
    const { H, I } = this;
    const [gate, up, down] = this.read(r);
    const q = this.quantize;
    if (q) {
      const [g, u, d] = [gate, up, down].map(dequantInt) as [Float32Array, Float32Array, Float32Array];
      packRequantized(slot, g, u, d, q, H, I);
      return;
    }
    const fmt = (w: IntWeight) => (w.bits === 8 ? 'int8' : 'int4');
    if (slot.gateUp) n.repackIntInto(slot.gateUp, gate.codes, gate.scales, up.codes, up.scales);
    else slot.gateUp = n.packInt(gate.codes, gate.scales, I, H, fmt(gate), gate.group, up.codes, up.scales, intScaleDtype(gate, up));
    if (slot.down) n.repackIntInto(slot.down, down.codes, down.scales);
    else slot.down = n.packInt(down.codes, down.scales, H, I, fmt(down), down.group, null, null, intScaleDtype(down));
  }

}
