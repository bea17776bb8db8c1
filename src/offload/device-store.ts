// The slow tier of the expert cache on a GPU (MoE-Infinity's setting): every routed expert in pinned
// host memory as the device slots want it (bf16 gate_up [2I, H] then down [H, I]), copied into a
// device slot on a copy stream of its own, so prefetches overlap the compute stream.
import type { CudaAddon, CudaBuffer, CudaEvent, CudaStream } from '../native/index.js';
import { bf16Of, BF16 } from '../model/device.js';
import { moeTensors } from '../model/moe-tensors.js';
import type { ModelSpec } from '../model/spec.js';
import { withWeightPrefix, type TensorSource } from '../model/tensor-source.js';
import { checkExpert } from '../model/weights.js';
import type { ExpertStore, LoadTicket, SlotWeights } from './expert-store.js';

interface Load { event: CudaEvent; slot: SlotWeights<CudaBuffer> }

export class PinnedExpertStore implements ExpertStore<CudaBuffer> {
  readonly expertBytes: number;
  readonly slotBytes: number;
  readonly overlapsCompute = true;
  /** [MoE layer] pinned host memory: E experts x (gate_up | down) bf16. */
  private readonly host: Uint16Array[] = [];
  private readonly copyStream: CudaStream;
  /** Recorded on the compute stream before each copy, so a copy never overtakes work enqueued before it. */
  private readonly computeMark: CudaEvent;
  private readonly loads = new Map<LoadTicket, Load>();
  private readonly free: CudaEvent[] = [];
  private nextTicket = 1;
  /** Streams whose enqueued work a copy must not overtake (the model's compute streams). */
  computeStreams: (CudaStream | null)[] = [null];
  private readonly gateUpElems: number;
  private readonly downElems: number;

  constructor(private readonly cu: CudaAddon, spec: ModelSpec, checkpointSrc: TensorSource) {
    // Qwen3.5's multimodal checkpoints keep the text model's tensors under model.language_model.
    const src = withWeightPrefix(checkpointSrc, spec.weightPrefix);
    const H = spec.hidden, I = spec.moe.intermediate, E = spec.moe.numExperts;
    this.gateUpElems = 2 * I * H;
    this.downElems = H * I;
    this.expertBytes = this.slotBytes = (this.gateUpElems + this.downElems) * BF16;
    spec.layers.forEach((l, i) => {
      if (l.ffn !== 'moe') return;
      const t = moeTensors(spec, src, `model.layers.${i}.`);
      const mem = new Uint16Array(cu.cudaPinnedBuffer(E * this.expertBytes));
      for (let e = 0; e < E; e++) {
        const ex = t.expert(e);
        checkExpert(ex, `${t.prefix}experts.${e}`, H, I);
        const base = e * (this.gateUpElems + this.downElems);
        mem.set(bf16Of(ex.gate), base);
        mem.set(bf16Of(ex.up), base + I * H);
        mem.set(bf16Of(ex.down), base + this.gateUpElems);
      }
      this.host.push(mem);
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
      slot.gateUp = cu.cudaBuffer(this.gateUpElems * BF16);
      slot.down = cu.cudaBuffer(this.downElems * BF16);
    }
    const base = expert * (this.gateUpElems + this.downElems);
    // NOTE: copies run in submission order on one stream (priority is not honoured across
    // loads already queued); the offloader queues demand loads before it waits on anything.
    for (const s of this.computeStreams) {
      this.computeMark.record(s);
      this.copyStream.waitEvent(this.computeMark);
    }
    cu.cudaCopyToDevice(slot.gateUp, 0, mem.subarray(base, base + this.gateUpElems), this.copyStream);
    cu.cudaCopyToDevice(slot.down!, 0, mem.subarray(base + this.gateUpElems, base + this.gateUpElems + this.downElems), this.copyStream);
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
