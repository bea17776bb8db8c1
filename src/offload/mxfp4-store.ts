// The expert cache's slow tier for MXFP4 checkpoints (gpt-oss): an expert's blocks and e8m0 scales are
// read from the checkpoint file with real I/O (pread) and packed into its slot as MXFP4, so a slot
// costs 0.5625 bytes per weight (e2m1 codes and bf16 scales: 28% of bf16) and a load reads 0.53 bytes per weight. Loads run on
// the engine thread (the native copy thread reads bf16/f16/f32 experts only).
import { loadNative, type FileRange } from '../native/index.js';
import type { Checkpoint } from '../model/safetensors.js';
import type { ModelSpec } from '../model/spec.js';
import { dequantMxfp4 } from '../model/mxfp4.js';
import { quantizedBytes, type QuantizeSpec } from '../model/quantize.js';
import { EngineThreadExpertStore, packRequantized } from './engine-thread-store.js';
import { moeLayerIndices, type SlotWeights } from './expert-store.js';

/** One expert's bytes in the file: gate_up blocks/scales (2I rows, gate and up interleaved), down blocks/scales. */
interface Mxfp4Ranges { guBlocks: FileRange; guScales: FileRange; dnBlocks: FileRange; dnScales: FileRange }

export class Mxfp4ExpertStore extends EngineThreadExpertStore<Mxfp4Ranges> {
  readonly expertBytes: number;
  readonly slotBytes: number;
  readonly slotFormat: string;
  private readonly H: number;
  private readonly I: number;
  private readonly ranges: Mxfp4Ranges[][]; // [moeLayer][expert]
  private readonly stage: Uint8Array;        // one expert's four ranges, back to back

  /** --quantize: slots hold the dequantised experts re-quantized to that format instead. */
  constructor(private readonly checkpoint: Checkpoint, spec: ModelSpec, private readonly quantize: QuantizeSpec | null = null) {
    super();
    const H = (this.H = spec.hidden);
    const I = (this.I = spec.moe.intermediate);
    const E = spec.moe.numExperts;
    const per = { guBlocks: I * H, guScales: (2 * I * H) / 32, dnBlocks: (H * I) / 2, dnScales: (H * I) / 32 };
    this.ranges = moeLayerIndices(spec).map((li) => {
      const p = `model.layers.${li}.mlp.experts.`;
      const t = (name: string, size: number) => {
        const info = checkpoint.getTensor(`${p}${name}`);
        if (info.dtype !== 'U8' || info.sizeBytes !== E * size)
          throw new Error(`expert offloading of an MXFP4 checkpoint: ${p}${name} is ${info.dtype} of ${info.sizeBytes} bytes, ` +
            `expected U8 of ${E * size} (${E} experts)`);
        return (e: number): FileRange => ({ path: info.file, offset: info.offset + e * size, sizeBytes: size });
      };
      const gb = t('gate_up_proj_blocks', per.guBlocks), gs = t('gate_up_proj_scales', per.guScales);
      const db = t('down_proj_blocks', per.dnBlocks), ds = t('down_proj_scales', per.dnScales);
      return Array.from({ length: E }, (_, e) => ({ guBlocks: gb(e), guScales: gs(e), dnBlocks: db(e), dnScales: ds(e) }));
    });
    this.expertBytes = per.guBlocks + per.guScales + per.dnBlocks + per.dnScales;
    // MXFP4 packs like int4 in groups of 32 (4-bit codes, one bf16 scale per 32 values).
    const q = quantize ?? { format: 'int4', group: 32 };
    this.slotBytes = quantizedBytes(q, 2 * I, H, true) + quantizedBytes(q, H, I, false);
    this.slotFormat = q.format === 'int4' ? `int4 g${q.group}` : q.format;
    this.stage = new Uint8Array(loadNative().allocHostBuffer(this.expertBytes));
  }

  protected get where(): string {
    return this.checkpoint.dir;
  }

  protected rangesOf(layer: number, expert: number): Mxfp4Ranges | undefined {
    return this.ranges[layer]?.[expert];
  }

  protected load(r: Mxfp4Ranges, slot: SlotWeights): void {
    const n = loadNative();
    const { H, I } = this;
    const parts: Uint8Array[] = [];
    let off = 0;
    const t0 = performance.now();
    for (const f of [r.guBlocks, r.guScales, r.dnBlocks, r.dnScales]) {
      const dst = this.stage.subarray(off, off + f.sizeBytes);
      n.readFileRange(f.path, f.offset, dst);
      parts.push(dst);
      off += f.sizeBytes;
    }
    this.readSeconds += (performance.now() - t0) / 1000;
    const [guB, guS, dnB, dnS] = parts as [Uint8Array, Uint8Array, Uint8Array, Uint8Array];
    // Rows 2i (gate) and 2i + 1 (up) of gate_up apart.
    const rowB = H / 2, rowS = H / 32;
    const half = (odd: number) => {
      const blocks = new Uint8Array(I * rowB), scales = new Uint8Array(I * rowS);
      for (let i = 0; i < I; i++) {
        blocks.set(guB.subarray((2 * i + odd) * rowB, (2 * i + odd + 1) * rowB), i * rowB);
        scales.set(guS.subarray((2 * i + odd) * rowS, (2 * i + odd + 1) * rowS), i * rowS);
      }
      return { blocks, scales, rows: I, cols: H };
    };
    const gate = half(0), up = half(1);
    const down = { blocks: dnB, scales: dnS, rows: H, cols: I };
    const q = this.quantize;
    if (q) {
      const [g, u, d] = [gate, up, down].map(dequantMxfp4) as [Float32Array, Float32Array, Float32Array];
      packRequantized(slot, g, u, d, q, H, I);
      return;
    }
    if (slot.gateUp) n.repackMxfp4Into(slot.gateUp, gate.blocks, gate.scales, up.blocks, up.scales);
    else slot.gateUp = n.packMxfp4(gate.blocks, gate.scales, I, H, up.blocks, up.scales);
    if (slot.down) n.repackMxfp4Into(slot.down, dnB, dnS);
    else slot.down = n.packMxfp4(dnB, dnS, H, I);
  }

}
