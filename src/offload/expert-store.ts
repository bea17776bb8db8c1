// The slow tier of the expert cache: where an expert's weights come from when it is not resident.
// On CPU that is the checkpoint file itself, read with real I/O (pread, not the mmap) and repacked
// into the cache slot, either on a copy thread of its own (the native ExpertLoader: loads overlap
// compute, so prefetching pays) or on the engine thread. A GPU tier (pinned host -> device copy on
// a copy stream) implements the same ticket interface. An FP8 checkpoint's experts stay FP8 in the
// slots (codes and block scales read as stored).
import { loadNative, type DType, type ExpertLoader, type FileRange, type PackedWeight } from '../native/index.js';
import { fp8ScaleForm, fp8ScaleGrid, fp8ScaleShapeError, type Checkpoint, type TensorInfo } from '../model/safetensors.js';
import { fp8ScaleName, type Fp8Quantization, type ModelSpec } from '../model/spec.js';
import { gptOssExpertRows } from '../model/moe-tensors.js';
import { quantizedBytes, type QuantizeSpec } from '../model/quantize.js';

/**
 * One cache slot's weights, created by the first load and refilled in place afterwards: packed
 * weights on the CPU (W = PackedWeight), device buffers on a GPU (W = CudaBuffer).
 */
export interface SlotWeights<W extends { dispose(): void } = PackedWeight> {
  gateUp: W | null; // [2I, H] gate_up
  down: W | null;   // [H, I]
}

/** A load in flight (or finished and not yet waited for). */
export type LoadTicket = number;

/**
 * Loads run as tickets: submit() starts one (a synchronous store finishes it before returning),
 * wait() blocks until it is done. NOTE: a slot must not be bound into an expert table, nor read,
 * before wait() returned for the load into it.
 */
export interface ExpertStore<W extends { dispose(): void } = PackedWeight> {
  /** Bytes moved from the slow tier per expert load. */
  readonly expertBytes: number;
  /** Bytes of one slot's packed weights in the fast tier. */
  readonly slotBytes: number;
  /** What a slot holds (bf16, f32, int8, int4, fp8), for the load line; absent: not said. */
  readonly slotFormat?: string;
  /**
   * True when a load runs beside compute (a copy stream, a copy thread): only then does
   * prefetching hide latency. A synchronous tier would make every prefetch a stall of its own.
   */
  readonly overlapsCompute: boolean;
  /**
   * Starts filling `slot` with expert `expert` of MoE layer `layer`; higher `priority` first
   * (Infinity: a demand miss). `simulatedDelayUs` (SIMULATION, benchmarks) adds that much link
   * time to the load, on the thread that does the load.
   */
  submit(layer: number, expert: number, slot: SlotWeights<W>, priority: number, simulatedDelayUs?: number): LoadTicket;
  /** Blocks until the load is done (raised to the top priority first); throws its error. */
  wait(ticket: LoadTicket): void;
  /** True when the load is done (wait() will not block). */
  done(ticket: LoadTicket): boolean;
  /** Drops a load that has not started: true (the slot keeps its old bytes); false: wait() for it. */
  cancel(ticket: LoadTicket): boolean;
  /** Loads queued or running. */
  readonly inFlight: number;
  dispose(): void;
}

/**
 * SIMULATION (benchmarks' simulated link): a load on the engine thread spends `us` more as a blocking
 * copy would (busy-wait); nothing when us <= 0.
 */
export function spendLinkDelay(us: number): void {
  if (us <= 0) return;
  const until = performance.now() + us / 1000;
  while (performance.now() < until) { /* busy-wait */ }
}

/** submit + wait: fills `slot` now (tests, tools). */
export function loadNow(store: ExpertStore, layer: number, expert: number, slot: SlotWeights): void {
  store.wait(store.submit(layer, expert, slot, Infinity));
}

/**
 * Where one expert's bytes are: gate [I, H], up [I, H], down [H, I] rows (with each projection's
 * scales for FP8 checkpoints); or gpt-oss's own layout, gate_up [H, 2I] (gate = even columns, up = odd)
 * and down [I, H], rearranged as they load.
 */
type ExpertRanges = {
  layout: 'rows'; gate: FileRange; up: FileRange; down: FileRange;
  scales?: FP8Scales;
} | { layout: 'gpt_oss'; gateUp: FileRange; down: FileRange };

/**
 * An FP8 expert's scale tensors: how they are stored (dtype; form: the block grid, one per output
 * channel, one per tensor; the copy thread spreads them onto the grid as they load), and their shapes
 * for the engine thread's path (fp8ScaleGrid).
 */
interface FP8Scales {
  gate: FileRange; up: FileRange; down: FileRange;
  dtype: 'f32' | 'bf16' | 'f16';
  /** null: the three differ in form (the engine thread's path spreads each). */
  form: 'grid' | 'channel' | 'tensor' | null;
  shapes: { gate: number[]; up: number[]; down: number[] };
}

const rangeBytes = (r: ExpertRanges) => r.down.sizeBytes + (r.layout === 'rows'
  ? r.gate.sizeBytes + r.up.sizeBytes + (r.scales ? r.scales.gate.sizeBytes + r.scales.up.sizeBytes + r.scales.down.sizeBytes : 0)
  : r.gateUp.sizeBytes);

const ST_DTYPE: Record<string, DType | undefined> = { BF16: 'bf16', F16: 'f16', F32: 'f32' };

/**
 * Checkpoint names of MoE layer blocks and their expert projections (as src/model/model.ts builds them):
 * decoder layer i's block is `${layers}${i}.${block}`; `layers` carries the checkpoint's weight prefix
 * (Qwen3.5's hub checkpoints keep the text model under model.language_model.*).
 */
export function expertTensorPrefix(spec: ModelSpec): { layers: string; block: string; gate: string; up: string; down: string } {
  const layers = `${spec.weightPrefix ?? 'model.'}layers.`;
  // Mixtral and MiniMax-M2 hub checkpoints: block_sparse_moe.experts.{e}.w1/w3/w2.
  if (spec.modelType === 'mixtral' || spec.modelType === 'minimax_m2')
    return { layers, block: 'block_sparse_moe.', gate: 'w1', up: 'w3', down: 'w2' };
  return { layers, block: 'mlp.', gate: 'gate_proj', up: 'up_proj', down: 'down_proj' };
}

/** Decoder layer index of each MoE layer. */
export function moeLayerIndices(spec: ModelSpec): number[] {
  const out: number[] = [];
  spec.layers.forEach((l, i) => { if (l.ffn === 'moe') out.push(i); });
  return out;
}

export interface CheckpointStoreOptions {
  /**
   * Load on the native ExpertLoader's copy thread (default), so that loads overlap the engine's
   * compute; false loads on the calling thread (pread, then repack on the compute pool).
   */
  copyThread?: boolean;
  /** --quantize: slots hold experts quantized as they load (more slots per byte). */
  quantize?: QuantizeSpec | null;
}

/** Reads experts from the checkpoint files with pread into staging buffers, then repacks. */
export class CheckpointExpertStore implements ExpertStore {
  readonly overlapsCompute: boolean;
  readonly expertBytes: number;
  readonly slotBytes: number;
  readonly slotFormat: string;
  private readonly quantize: QuantizeSpec | null;
  /** FP8 checkpoint experts kept in FP8: the block size [rows, cols] of their scales, else null. */
  private readonly fp8Block: [number, number] | null;
  private readonly dtype: DType;
  private readonly H: number;
  private readonly I: number;
  private readonly ranges: ExpertRanges[][]; // [moeLayer][expert]
  // Synchronous path's staging buffers: [I, H] gate, [I, H] up, [H, I] down in the checkpoint dtype
  // (the copy thread has its own).
  private gate: Uint8Array | null = null;
  private up: Uint8Array | null = null;
  private down: Uint8Array | null = null;
  private readonly loader: ExpertLoader | null;
  /** Synchronous path: finished tickets not yet waited for. */
  private readonly finished = new Set<LoadTicket>();
  private nextTicket = 1;
  loads = 0;
  bytesRead = 0;
  /** Synchronous path: seconds in pread (the copy thread reports its own in loaderStats()). */
  readSeconds = 0;

  constructor(private readonly checkpoint: Checkpoint, spec: ModelSpec, opts: CheckpointStoreOptions = {}) {
    this.H = spec.hidden;
    this.I = spec.moe.intermediate;
    const names = expertTensorPrefix(spec);
    const E = spec.moe.numExperts;
    let dtype: DType | undefined;
    // FP8 checkpoints (quantization_config fp8): experts stay FP8 in the slots, as resident.
    const fp8q = spec.quantization?.method === 'fp8' ? spec.quantization : null;
    this.fp8Block = fp8q ? fp8q.blockSize : null;
    this.quantize = opts.quantize ?? null;
    const eb = (t: TensorInfo) => {
      if (this.fp8Block && t.dtype === 'F8_E4M3') {
        if (dtype && dtype !== 'bf16') throw new Error(`expert offloading needs one expert dtype; ${t.name} is F8_E4M3, others ${dtype}`);
        dtype = 'bf16';  // unused for FP8 loads
        return 1;
      }
      const d = ST_DTYPE[t.dtype];
      if (!d) throw new Error(`expert offloading reads bf16/f16/f32 experts and FP8 (F8_E4M3 with weight_scale_inv) ones; ${t.name} is ${t.dtype}`);
      if (dtype && d !== dtype) throw new Error(`expert offloading needs one expert dtype; ${t.name} is ${d}, others ${dtype}`);
      dtype = d;
      return t.sizeBytes / (t.shape.reduce((a, b) => a * b, 1));
    };
    const HI = this.H * this.I;
    this.ranges = moeLayerIndices(spec).map((li) => {
      const p = `${names.layers}${li}.${names.block}experts.`;
      const fusedName = `${p}gate_up_proj`;
      const out: ExpertRanges[] = [];
      if (spec.modelType === 'gpt_oss') {
        // gpt-oss: gate_up_proj [E, H, 2I] (transposed, gate/up interleaved by column), down_proj [E, I, H].
        const gu = checkpoint.getTensor(fusedName);
        const dn = checkpoint.getTensor(`${p}down_proj`);
        const b = eb(gu);
        eb(dn);
        for (let e = 0; e < E; e++) {
          out.push({
            layout: 'gpt_oss',
            gateUp: { path: gu.file, offset: gu.offset + e * 2 * HI * b, sizeBytes: 2 * HI * b },
            down: { path: dn.file, offset: dn.offset + e * HI * b, sizeBytes: HI * b },
          });
        }
      } else if (checkpoint.has(fusedName)) {
        if (this.fp8Block && checkpoint.getTensor(fusedName).dtype === 'F8_E4M3')
          throw new Error(`expert offloading reads FP8 experts stored one tensor per expert; ${fusedName} stacks them`);
        // transformers 5.x: gate_up_proj [E, 2I, H] (gate rows then up rows), down_proj [E, H, I]
        const gu = checkpoint.getTensor(fusedName);
        const dn = checkpoint.getTensor(`${p}down_proj`);
        const b = eb(gu);
        eb(dn);
        for (let e = 0; e < E; e++) {
          const base = gu.offset + e * 2 * HI * b;
          out.push({
            layout: 'rows',
            gate: { path: gu.file, offset: base, sizeBytes: HI * b },
            up: { path: gu.file, offset: base + HI * b, sizeBytes: HI * b },
            down: { path: dn.file, offset: dn.offset + e * HI * b, sizeBytes: HI * b },
          });
        }
      } else {
        for (let e = 0; e < E; e++) {
          const t = (n: string): FileRange => {
            const info = checkpoint.getTensor(`${p}${e}.${n}.weight`);
            eb(info);
            return { path: info.file, offset: info.offset, sizeBytes: info.sizeBytes };
          };
          const fp8 = this.fp8Block !== null && checkpoint.getTensor(`${p}${e}.${names.gate}.weight`).dtype === 'F8_E4M3';
          out.push({
            layout: 'rows', gate: t(names.gate), up: t(names.up), down: t(names.down),
            ...(fp8 ? { scales: this.fp8Scales(checkpoint, fp8q!, `${p}${e}.`, [names.gate, names.up, names.down]) } : {}),
          });
        }
      }
      return out;
    });
    this.dtype = dtype ?? 'bf16';
    const first = this.ranges[0]?.[0];
    const bytes = first ? first.down.sizeBytes : 0;  // one of the three [I, H]-sized matrices
    const sc = first?.layout === 'rows' ? first.scales : undefined;
    this.expertBytes = 3 * bytes + (sc ? sc.gate.sizeBytes + sc.up.sizeBytes + sc.down.sizeBytes : 0);
    if (this.fp8Block && !sc) this.fp8Block = null;  // an FP8 config over bf16 experts: plain slots
    // Packed weights keep the checkpoint dtype, or FP8 codes and block scales, or the --quantize
    // format's codes and scales.
    // An FP8 checkpoint with --quantize: slots hold the --quantize format, re-quantized from the
    // dequantised (bf16) FP8 weights as the resident path does (packExpert over Checkpoint's dequantFp8).
    // NOTE: the copy thread packs FP8 as stored or the checkpoint dtype, so those loads run here, on
    // the engine thread (and prefetching is then off unless asked for).
    const requantFp8 = this.fp8Block !== null && this.quantize !== null;
    const slotQuant: QuantizeSpec | null = this.fp8Block && !requantFp8 ? { format: 'fp8', group: this.fp8Block[1] } : this.quantize;
    this.slotBytes = slotQuant
      ? quantizedBytes(slotQuant, 2 * this.I, this.H, true) + quantizedBytes(slotQuant, this.H, this.I, false)
      : 3 * bytes;
    this.slotFormat = slotQuant?.format ?? this.dtype;
    // Scales of mixed forms within an expert are spread on the engine thread.
    const mixed = this.ranges.some((l) => l.some((r) => r.layout === 'rows' && r.scales && r.scales.form === null));
    this.overlapsCompute = !requantFp8 && !mixed && (opts.copyThread ?? true);
    this.loader = this.overlapsCompute ? new (loadNative().ExpertLoader)() : null;
  }

  /** An FP8 expert's gate / up / down scale tensors (`prefix` + projection + .weight + the scale suffix). */
  private fp8Scales(checkpoint: Checkpoint, q: Fp8Quantization, prefix: string, projections: string[]): FP8Scales {
    const [br, bc] = q.blockSize;
    const infos = projections.map((n) => checkpoint.getTensor(fp8ScaleName(q, `${prefix}${n}.weight`)));
    const dims = [[this.I, this.H], [this.I, this.H], [this.H, this.I]] as const;
    const forms = infos.map((info, i) => {
      const form = fp8ScaleForm(info.shape, dims[i]![0], dims[i]![1], br, bc);
      if (!form) throw new Error(`expert offloading: ${fp8ScaleShapeError(info.name, info.shape, dims[i]![0], dims[i]![1], br, bc)}`);
      return form;
    });
    const dtype = ST_DTYPE[infos[0]!.dtype];
    if (!dtype || infos.some((info) => info.dtype !== infos[0]!.dtype))
      throw new Error(`expert offloading reads FP8 scales in one of f32, bf16 or f16 per expert; ${infos.map((i) => `${i.name} is ${i.dtype}`).join(', ')}`);
    const [g, u, d] = infos.map((info) => ({ path: info.file, offset: info.offset, sizeBytes: info.sizeBytes })) as [FileRange, FileRange, FileRange];
    return {
      gate: g, up: u, down: d, dtype: dtype as FP8Scales['dtype'], form: forms.every((f) => f === forms[0]) ? forms[0]! : null,
      shapes: { gate: infos[0]!.shape, up: infos[1]!.shape, down: infos[2]!.shape },
    };
  }

  private rangesOf(layer: number, expert: number): ExpertRanges {
    const r = this.ranges[layer]?.[expert];
    if (!r) throw new RangeError(`no expert (${layer}, ${expert}) in the checkpoint at ${this.checkpoint.dir}`);
    return r;
  }

  submit(layer: number, expert: number, slot: SlotWeights, priority: number, simulatedDelayUs = 0): LoadTicket {
    const r = this.rangesOf(layer, expert);
    const bytes = rangeBytes(r);
    this.loads++;
    this.bytesRead += bytes;
    if (this.loader) {
      const n = loadNative();
      const { H, I, dtype } = this;
      // Empty slots get their weights now (zeros, right geometry); the copy thread fills them.
      const q = this.fp8Block ? { format: 'fp8' as const, group: this.fp8Block[1] } : this.quantize;
      slot.gateUp ??= n.allocPackedWeight(dtype, 'gate_up', 2 * I, H, q?.format, q?.group);
      slot.down ??= n.allocPackedWeight(dtype, 'plain', H, I, q?.format, q?.group);
      const from = r.layout === 'rows' ? { gate: r.gate, up: r.up, down: r.down } : { layout: 'gpt_oss' as const, gateUp: r.gateUp, down: r.down };
      return this.loader.submit({
        ...from, dtype, dst: { gateUp: slot.gateUp, down: slot.down }, priority,
        ...(simulatedDelayUs > 0 ? { delayUs: simulatedDelayUs } : {}),
        ...(r.layout === 'rows' && r.scales && this.fp8Block ? {
          fp8Block: this.fp8Block, gateScale: r.scales.gate, upScale: r.scales.up, downScale: r.scales.down,
          fp8Scales: { dtype: r.scales.dtype, form: r.scales.form! },
        } : {}),
      });
    }
    this.loadHere(r, slot);
    spendLinkDelay(simulatedDelayUs);
    const t = this.nextTicket++;
    this.finished.add(t);
    return t;
  }

  wait(ticket: LoadTicket): void {
    if (this.loader) {
      const err = this.loader.wait(ticket);
      if (err !== null) throw new Error(`expert load failed: ${err}`);
      return;
    }
    if (!this.finished.delete(ticket)) throw new RangeError(`ticket ${ticket} is not pending (already waited for or cancelled)`);
  }

  done(ticket: LoadTicket): boolean {
    return this.loader ? this.loader.poll(ticket) : true;
  }

  cancel(ticket: LoadTicket): boolean {
    return this.loader ? this.loader.cancel(ticket) : false;
  }

  get inFlight(): number {
    return this.loader ? this.loader.inFlight : 0;
  }

  /** The copy thread's totals (null on the synchronous path). */
  loaderStats(): ReturnType<ExpertLoader['stats']> | null {
    return this.loader ? this.loader.stats() : null;
  }

  /** The synchronous path: pread into staging here, repack on the compute pool. */
  private loadHere(r: ExpertRanges, slot: SlotWeights): void {
    const n = loadNative();
    const bytes = r.down.sizeBytes;
    // 64-byte aligned staging (allocHostBuffer) so that typed views of any element size work; gpt-oss
    // reads its gate_up [H, 2I] into gate and up together.
    this.gate ??= new Uint8Array(n.allocHostBuffer(Math.max(1, r.layout === 'rows' ? bytes : 2 * bytes)));
    this.up ??= new Uint8Array(n.allocHostBuffer(Math.max(1, bytes)));
    this.down ??= new Uint8Array(n.allocHostBuffer(Math.max(1, bytes)));
    const t0 = performance.now();
    if (r.layout === 'rows') {
      n.readFileRange(r.gate.path, r.gate.offset, this.gate.subarray(0, r.gate.sizeBytes));
      n.readFileRange(r.up.path, r.up.offset, this.up.subarray(0, r.up.sizeBytes));
    } else {
      n.readFileRange(r.gateUp.path, r.gateUp.offset, this.gate.subarray(0, r.gateUp.sizeBytes));
    }
    n.readFileRange(r.down.path, r.down.offset, this.down.subarray(0, r.down.sizeBytes));
    this.readSeconds += (performance.now() - t0) / 1000;
    const { H, I, dtype } = this;
    if (r.layout === 'rows' && r.scales && this.fp8Block) {
      // FP8: codes as read, scales read beside them; slots are fp8 weights of group bc.
      const [br, bc] = this.fp8Block;
      const s = r.scales;
      const t1 = performance.now();
      const scale = (f: FileRange, which: 'gate' | 'up' | 'down', rows: number, cols: number) => {
        const raw = new Uint8Array(f.sizeBytes);
        n.readFileRange(f.path, f.offset, raw);
        let values = new Float32Array(raw.buffer);
        if (s.dtype !== 'f32') {
          values = new Float32Array(raw.byteLength / 2);
          n.convert(new Uint16Array(raw.buffer), s.dtype, values, 'f32');
        }
        return fp8ScaleGrid(`${which} scales`, s.shapes[which], values, rows, cols, br, bc, (msg) => new Error(`expert offloading: ${msg}`));
      };
      const gs = scale(s.gate, 'gate', I, H), us = scale(s.up, 'up', I, H), ds = scale(s.down, 'down', H, I);
      this.readSeconds += (performance.now() - t1) / 1000;
      const gc = this.gate.subarray(0, r.gate.sizeBytes), uc = this.up.subarray(0, r.up.sizeBytes);
      const dc = this.down.subarray(0, r.down.sizeBytes);
      const q = this.quantize;
      if (q) {
        // --quantize over FP8: dequantise to bf16 (Checkpoint.dequantFp8's call), then quantize.
        const bf16 = (codes: Uint8Array, scales: Float32Array, rows: number, cols: number) => {
          const out = new Uint16Array(rows * cols);
          n.dequantFp8(codes, scales, rows, cols, br, bc, out);
          return out;
        };
        const g = bf16(gc, gs, I, H), u = bf16(uc, us, I, H), d = bf16(dc, ds, H, I);
        if (slot.gateUp) n.repackInto(slot.gateUp, g, 'bf16', u);
        else slot.gateUp = n.packGateUp(g, u, 'bf16', I, H, q.format, q.group);
        if (slot.down) n.repackInto(slot.down, d, 'bf16');
        else slot.down = n.packWeight(d, 'bf16', H, I, q.format, q.group);
        return;
      }
      if (slot.gateUp) n.repackFp8Into(slot.gateUp, gc, gs, br, bc, uc, us);
      else slot.gateUp = n.packFp8(gc, gs, I, H, br, bc, uc, us);
      if (slot.down) n.repackFp8Into(slot.down, dc, ds, br, bc);
      else slot.down = n.packFp8(dc, ds, H, I, br, bc);
      return;
    }
    let gate = this.view(this.gate, r.layout === 'rows' ? bytes : 2 * bytes);
    let up = this.view(this.up, bytes);
    let down = this.view(this.down, bytes);
    if (r.layout === 'gpt_oss') {
      // TODO(perf): a copy per load on the engine thread (the copy thread does it natively).
      ({ gate, up, down } = gptOssExpertRows(gate, down, H, I));
    }
    // A quantized slot re-quantizes what it is given (repackInto); a new one is made quantized.
    const q = this.quantize;
    if (slot.gateUp) n.repackInto(slot.gateUp, gate, dtype, up);
    else slot.gateUp = n.packGateUp(gate, up, dtype, I, H, q?.format, q?.group);
    if (slot.down) n.repackInto(slot.down, down, dtype);
    else slot.down = n.packWeight(down, dtype, H, I, q?.format, q?.group);
  }

  private view(buf: Uint8Array, sizeBytes: number): Float32Array | Uint16Array {
    return this.dtype === 'f32'
      ? new Float32Array(buf.buffer, buf.byteOffset, sizeBytes / 4)
      : new Uint16Array(buf.buffer, buf.byteOffset, sizeBytes / 2);
  }

  /** Finishes the running load and drops queued ones (their slots are the offloader's to free). */
  dispose(): void {
    this.loader?.dispose();
  }
}

/**
 * A simulated host-to-device link in front of another store: every load also takes
 * latencyUs + bytes / bandwidth, spent where the inner store loads (a sleep on its copy thread,
 * which overlaps compute like a DMA copy; a busy-wait on the engine thread for a synchronous store).
 * SIMULATION: used by the benchmark only, labelled as such in every output.
 */
export class SimulatedLinkStore implements ExpertStore {
  /** Link time modelled so far (requested, not measured). */
  simulatedSeconds = 0;

  constructor(private readonly inner: ExpertStore, readonly linkGBps: number, readonly latencyUs: number) {
    if (!(linkGBps > 0)) throw new RangeError(`linkGBps is ${linkGBps}, expected a positive number`);
    if (!(latencyUs >= 0)) throw new RangeError(`latencyUs is ${latencyUs}, expected a number >= 0`);
  }

  get expertBytes(): number { return this.inner.expertBytes; }
  get slotBytes(): number { return this.inner.slotBytes; }
  get slotFormat(): string | undefined { return this.inner.slotFormat; }
  get overlapsCompute(): boolean { return this.inner.overlapsCompute; }
  get inFlight(): number { return this.inner.inFlight; }

  /** The link time of one expert load, in microseconds. */
  get delayUs(): number {
    return this.latencyUs + this.inner.expertBytes / (this.linkGBps * 1e9) * 1e6;
  }

  submit(layer: number, expert: number, slot: SlotWeights, priority: number, simulatedDelayUs = 0): LoadTicket {
    const d = this.delayUs + simulatedDelayUs;
    this.simulatedSeconds += d * 1e-6;
    return this.inner.submit(layer, expert, slot, priority, d);
  }

  wait(ticket: LoadTicket): void { this.inner.wait(ticket); }
  done(ticket: LoadTicket): boolean { return this.inner.done(ticket); }
  cancel(ticket: LoadTicket): boolean {
    const ok = this.inner.cancel(ticket);
    if (ok) this.simulatedSeconds -= this.delayUs * 1e-6;
    return ok;
  }

  dispose(): void {
    this.inner.dispose();
  }
}
