// The slow tier of the expert cache: where an expert's weights come from when it is not resident.
// On CPU that is the checkpoint file itself, read with real I/O (pread, not the mmap) into reusable
// staging buffers and repacked into the cache slot. A GPU tier (pinned host -> device copy on a
// copy stream) implements the same interface.
import { loadNative, type DType, type PackedWeight } from '../native/index.js';
import type { Checkpoint, TensorInfo } from '../model/safetensors.js';
import type { ModelSpec } from '../model/spec.js';

/** One cache slot's packed weights: created by the first load, refilled in place afterwards. */
export interface SlotWeights {
  gateUp: PackedWeight | null; // [2I, H] gate_up
  down: PackedWeight | null;   // [H, I]
}

export interface ExpertStore {
  /** Bytes moved from the slow tier per expert load. */
  readonly expertBytes: number;
  /** Bytes of one slot's packed weights in the fast tier. */
  readonly slotBytes: number;
  /**
   * True when a load runs beside compute (a copy stream, a copy thread): only then does
   * prefetching hide latency. A synchronous tier would make every prefetch a stall of its own.
   */
  readonly overlapsCompute: boolean;
  /** Fills `slot` with expert `expert` of MoE layer `layer`; returns the bytes read. */
  load(layer: number, expert: number, slot: SlotWeights): number;
  dispose(): void;
}

interface Range { file: string; offset: number; sizeBytes: number }
interface ExpertRanges { gate: Range; up: Range; down: Range }

const ST_DTYPE: Record<string, DType | undefined> = { BF16: 'bf16', F16: 'f16', F32: 'f32' };

/** Checkpoint names of MoE layer blocks and their expert projections (as src/model/model.ts builds them). */
export function expertTensorPrefix(spec: ModelSpec): { block: string; gate: string; up: string; down: string } {
  if (spec.modelType === 'mixtral') return { block: 'block_sparse_moe.', gate: 'w1', up: 'w3', down: 'w2' };
  return { block: 'mlp.', gate: 'gate_proj', up: 'up_proj', down: 'down_proj' };
}

/** Decoder layer index of each MoE layer. */
export function moeLayerIndices(spec: ModelSpec): number[] {
  const out: number[] = [];
  spec.layers.forEach((l, i) => { if (l.ffn === 'moe') out.push(i); });
  return out;
}

/** Reads experts from the checkpoint files with pread into staging buffers, then repacks. */
export class CheckpointExpertStore implements ExpertStore {
  // NOTE: loads run on the calling (engine) thread between layers; an asynchronous reader
  // (a Worker doing the preads into shared staging buffers) would set this to true.
  readonly overlapsCompute = false;
  readonly expertBytes: number;
  readonly slotBytes: number;
  private readonly dtype: DType;
  private readonly H: number;
  private readonly I: number;
  private readonly ranges: ExpertRanges[][]; // [moeLayer][expert]
  // Staging buffers, allocated once: [I, H] gate, [I, H] up, [H, I] down in the checkpoint dtype.
  private readonly gate: Uint8Array;
  private readonly up: Uint8Array;
  private readonly down: Uint8Array;
  loads = 0;
  bytesRead = 0;
  readSeconds = 0;

  constructor(private readonly checkpoint: Checkpoint, spec: ModelSpec) {
    this.H = spec.hidden;
    this.I = spec.moe.intermediate;
    const names = expertTensorPrefix(spec);
    const E = spec.moe.numExperts;
    let dtype: DType | undefined;
    const eb = (t: TensorInfo) => {
      const d = ST_DTYPE[t.dtype];
      if (!d) throw new Error(`expert offloading reads bf16/f16/f32 experts; ${t.name} is ${t.dtype}`);
      if (dtype && d !== dtype) throw new Error(`expert offloading needs one expert dtype; ${t.name} is ${d}, others ${dtype}`);
      dtype = d;
      return t.sizeBytes / (t.shape.reduce((a, b) => a * b, 1));
    };
    const HI = this.H * this.I;
    this.ranges = moeLayerIndices(spec).map((li) => {
      const p = `model.layers.${li}.${names.block}experts.`;
      const fusedName = `${p}gate_up_proj`;
      const out: ExpertRanges[] = [];
      if (checkpoint.has(fusedName)) {
        // transformers 5.x: gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]
        const gu = checkpoint.getTensor(fusedName);
        const dn = checkpoint.getTensor(`${p}down_proj`);
        const b = eb(gu);
        eb(dn);
        for (let e = 0; e < E; e++) {
          const base = gu.offset + e * 2 * HI * b;
          out.push({
            gate: { file: gu.file, offset: base, sizeBytes: HI * b },
            up: { file: gu.file, offset: base + HI * b, sizeBytes: HI * b },
            down: { file: dn.file, offset: dn.offset + e * HI * b, sizeBytes: HI * b },
          });
        }
      } else {
        for (let e = 0; e < E; e++) {
          const t = (n: string): Range => {
            const info = checkpoint.getTensor(`${p}${e}.${n}.weight`);
            eb(info);
            return { file: info.file, offset: info.offset, sizeBytes: info.sizeBytes };
          };
          out.push({ gate: t(names.gate), up: t(names.up), down: t(names.down) });
        }
      }
      return out;
    });
    this.dtype = dtype ?? 'bf16';
    const bytes = this.ranges[0]?.[0]?.gate.sizeBytes ?? 0;
    // 64-byte aligned staging (allocHostBuffer) so that typed views of any element size work.
    const n = loadNative();
    this.gate = new Uint8Array(n.allocHostBuffer(Math.max(1, bytes)));
    this.up = new Uint8Array(n.allocHostBuffer(Math.max(1, bytes)));
    this.down = new Uint8Array(n.allocHostBuffer(Math.max(1, bytes)));
    this.expertBytes = 3 * bytes;
    this.slotBytes = 3 * bytes; // packed weights keep the checkpoint dtype
  }

  load(layer: number, expert: number, slot: SlotWeights): number {
    const r = this.ranges[layer]?.[expert];
    if (!r) throw new RangeError(`no expert (${layer}, ${expert}) in the checkpoint at ${this.checkpoint.dir}`);
    const n = loadNative();
    const t0 = performance.now();
    n.readFileRange(r.gate.file, r.gate.offset, this.gate.subarray(0, r.gate.sizeBytes));
    n.readFileRange(r.up.file, r.up.offset, this.up.subarray(0, r.up.sizeBytes));
    n.readFileRange(r.down.file, r.down.offset, this.down.subarray(0, r.down.sizeBytes));
    this.readSeconds += (performance.now() - t0) / 1000;
    const gate = this.view(this.gate, r.gate.sizeBytes);
    const up = this.view(this.up, r.up.sizeBytes);
    const down = this.view(this.down, r.down.sizeBytes);
    const { H, I, dtype } = this;
    if (slot.gateUp) n.repackInto(slot.gateUp, gate, dtype, up);
    else slot.gateUp = n.packGateUp(gate, up, dtype, I, H);
    if (slot.down) n.repackInto(slot.down, down, dtype);
    else slot.down = n.packWeight(down, dtype, H, I);
    const bytes = r.gate.sizeBytes + r.up.sizeBytes + r.down.sizeBytes;
    this.loads++;
    this.bytesRead += bytes;
    return bytes;
  }

  private view(buf: Uint8Array, sizeBytes: number): Float32Array | Uint16Array {
    return this.dtype === 'f32'
      ? new Float32Array(buf.buffer, buf.byteOffset, sizeBytes / 4)
      : new Uint16Array(buf.buffer, buf.byteOffset, sizeBytes / 2);
  }

  dispose(): void {}
}

/**
 * A simulated host-to-device link in front of another store: every load also waits
 * latencyUs + bytes / bandwidth (busy-wait, so the time is spent like a blocking copy).
 * SIMULATION: used by the benchmark only, labelled as such in every output.
 */
export class SimulatedLinkStore implements ExpertStore {
  simulatedSeconds = 0;

  constructor(private readonly inner: ExpertStore, readonly linkGBps: number, readonly latencyUs: number) {
    if (!(linkGBps > 0)) throw new RangeError(`linkGBps is ${linkGBps}, expected a positive number`);
  }

  get expertBytes(): number { return this.inner.expertBytes; }
  get slotBytes(): number { return this.inner.slotBytes; }
  get overlapsCompute(): boolean { return this.inner.overlapsCompute; }

  load(layer: number, expert: number, slot: SlotWeights): number {
    const bytes = this.inner.load(layer, expert, slot);
    const waitS = this.latencyUs * 1e-6 + bytes / (this.linkGBps * 1e9);
    this.simulatedSeconds += waitS;
    const until = performance.now() + waitS * 1000;
    while (performance.now() < until) { /* busy-wait: a blocking copy */ }
    return bytes;
  }

  dispose(): void {
    this.inner.dispose();
  }
}
