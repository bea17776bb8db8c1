// The slow tier of the expert cache on a GPU (MoE-Infinity's setting): every routed expert in pinned
// host memory as the device slots want it (bf16 gate_up [2I, H] then down [H, I], or the quantized
// layout of the model's expert tables: --quantize, FP8 checkpoints, compressed-tensors / GPTQ int codes as
// stored), copied into a device slot on a
// copy stream of its own, so prefetches overlap the compute stream.
import type { CudaAddon, CudaBuffer, CudaEvent, CudaStream } from '../native/index.js';
import { intFfnMatrices, plainOrders, quantExpertBytes, quantizedExpert, type DeviceQuant } from '../model/cuda-quant.js';
import { bf16Of, BF16 } from '../model/device.js';
import { moeTensors } from '../model/moe-tensors.js';
import { intCodeMethodName, intCodeQuant, type ModelSpec } from '../model/spec.js';
import { withWeightPrefix, type TensorSource } from '../model/tensor-source.js';
import { checkExpert } from '../model/weights.js';
import type { ExpertStore, LoadTicket, SlotWeights } from './expert-store.js';

interface Load { event: CudaEvent; slot: SlotWeights<CudaBuffer> }

export class PinnedExpertStore implements ExpertStore<CudaBuffer> {
  readonly expertBytes: number;
  readonly slotBytes: number;
  readonly slotFormat: string;
  readonly overlapsCompute = true;
  /** [MoE layer] pinned host memory: E experts x (gate_up | down), bf16 or the quantized layout. */
  private readonly host: Uint8Array[] = [];
  private readonly copyStream: CudaStream;
  /** Recorded on the compute stream before each copy, so a copy never overtakes work enqueued before it. */
  private readonly computeMark: CudaEvent;
  private readonly loads = new Map<LoadTicket, Load>();
  private readonly free: CudaEvent[] = [];
  private nextTicket = 1;
  /** Streams whose enqueued work a copy must not overtake (the model's compute streams). */
  computeStreams: (CudaStream | null)[] = [null];
  private readonly gateUpBytes: number;
  private readonly downBytes: number;
  /**
   * Per MoE layer, act-order experts' input orders [E, H] (the plain order for the others; null for a layer
   * without any): the model gathers x by them (CudaModel.setExpertInputOrders), as for resident experts.
   */
  readonly inputOrders: (Int32Array | null)[] = [];

  /**
   * `quant`: the layout of the model's expert tables (CudaModel.expertQuant), so that a slot holds
   * the bytes a resident expert would; `quantizedAtLoad`: --quantize (CudaModel.quantizedAtLoad).
   */
  constructor(private readonly cu: CudaAddon, spec: ModelSpec, checkpointSrc: TensorSource,
              readonly quant: DeviceQuant | null = null, quantizedAtLoad = false) {
    // Qwen3.5's multimodal checkpoints keep the text model's tensors under model.language_model.
    const src = withWeightPrefix(checkpointSrc, spec.weightPrefix);
    const H = spec.hidden, I = spec.moe.intermediate, E = spec.moe.numExperts;
    const qb = quant ? quantExpertBytes(quant, H, I) : null;
    this.gateUpBytes = qb ? qb.gateUp : 2 * I * H * BF16;
    this.downBytes = qb ? qb.down : H * I * BF16;
    this.expertBytes = this.slotBytes = this.gateUpBytes + this.downBytes;
    this.slotFormat = (!quant ? 'bf16' : quant.format === 'int4' ? `int4 g${quant.group}` : quant.format) + (quant?.zeros ? ' +zeros' : '');
    spec.layers.forEach((l, i) => {
      if (l.ffn !== 'moe') return;
      const t = moeTensors(spec, src, `model.layers.${i}.`);
      const mem = new Uint8Array(cu.cudaPinnedBuffer(E * this.expertBytes));
      let orders: Int32Array | null = null;
      for (let e = 0; e < E; e++) {
        const name = `${t.prefix}experts.${e}`;
        const base = e * this.expertBytes;
        // An int-code checkpoint's experts (compressed-tensors, GPTQ): their codes and scales as stored (CudaModel's
        // uploadInt), so that a slot holds what a resident expert would.
        const iw = quant && !quantizedAtLoad ? t.expertInt?.(e) ?? null : null;
        if (iw) {
          const m = intFfnMatrices(quant!, iw.names, iw.gate, iw.up, iw.down, H, I, true);
          mem.set(m.gateUp, base);
          mem.set(m.down, base + this.gateUpBytes);
          if (m.perm) (orders ??= plainOrders(E, H)).set(m.perm, e * H);
          continue;
        }
        const iq = intCodeQuant(spec.quantization);
        if (quant && iq && !quantizedAtLoad)
          throw new RangeError(`${name} is not stored as int codes, but this ${intCodeMethodName(iq)} checkpoint's experts are read ` +
            `as ${quant.format} on the device; serve it with --quantize ${quant.format}, or on the CPU engine`);
        if (quant) {
          const b = quantizedExpert(quant, () => t.expert(e), t.expertFp8(e), quantizedAtLoad, name, H, I);
          mem.set(b.gateUp, base);
          mem.set(b.down, base + this.gateUpBytes);
          continue;
        }
        const ex = t.expert(e);
        checkExpert(ex, name, H, I);
        const bf16 = new Uint16Array(mem.buffer, mem.byteOffset + base, (this.expertBytes) / BF16);
        bf16.set(bf16Of(ex.gate), 0);
        bf16.set(bf16Of(ex.up), I * H);
        bf16.set(bf16Of(ex.down), 2 * I * H);
      }
      this.host.push(mem);
      this.inputOrders.push(orders);
    });
    this.copyStream = new cu.CudaStream();
    this.computeMark = new cu.CudaEvent(false);
  }

  /** Bytes of pinned host memory holding the experts. */
  get hostBytes(): number {
    return this.host.reduce((a, m) => a + m.byteLength, 0);
  }

  submit(layer: number, expert: number, slot: SlotWeights<CudaBuffer>, _priority: number): LoadTicket {
    const { cu } = this;
    const mem = this.host[layer];
    if (!mem) throw new RangeError(`MoE layer ${layer} is not in the pinned store (${this.host.length} layers)`);
    if (!slot.gateUp) {
      // The offloader owns the slots (and disposes them).
      slot.gateUp = cu.cudaBuffer(this.gateUpBytes);
      slot.down = cu.cudaBuffer(this.downBytes);
    }
    const base = expert * this.expertBytes;
    // NOTE: copies run in submission order on one stream (priority is not honoured across
    // loads already queued); the offloader queues demand loads before it waits on anything.
    for (const s of this.computeStreams) {
      this.computeMark.record(s);
      this.copyStream.waitEvent(this.computeMark);
    }
    cu.cudaCopyToDevice(slot.gateUp, 0, mem.subarray(base, base + this.gateUpBytes), this.copyStream);
    cu.cudaCopyToDevice(slot.down!, 0, mem.subarray(base + this.gateUpBytes, base + this.expertBytes), this.copyStream);
    const event = this.free.pop() ?? new cu.CudaEvent(false);
    event.record(this.copyStream);
    const ticket = this.nextTicket++;
    this.loads.set(ticket, { event, slot });
    return ticket;
  }

  wait(ticket: LoadTicket): void {
    const l = this.loads.get(ticket);
    if (!l) return;
    l.event.synchronize();
    this.loads.delete(ticket);
    this.free.push(l.event);
  }

  done(ticket: LoadTicket): boolean {
    const l = this.loads.get(ticket);
    return !l || l.event.query();
  }

  /** A copy on the stream cannot be taken back. */
  cancel(_ticket: LoadTicket): boolean {
    return false;
  }

  get inFlight(): number {
    let n = 0;
    for (const l of this.loads.values()) if (!l.event.query()) n++;
    return n;
  }

  dispose(): void {
    this.copyStream.synchronize();
    for (const l of this.loads.values()) l.event.dispose();
    for (const e of this.free) e.dispose();
    this.loads.clear();
    this.free.length = 0;
    this.computeMark.dispose();
    this.copyStream.dispose();
    this.host.length = 0;
  }
}
