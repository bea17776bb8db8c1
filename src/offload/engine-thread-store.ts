// What the expert cache's engine-thread stores share (MXFP4 and compressed-tensors checkpoints, whose
// slots the native copy thread cannot fill): a load is a pread and a pack on the calling thread, done
// by the time submit() returns, so wait() only checks the ticket and nothing is ever in flight.
import type { PackedWeight } from '../native/index.js';
import { loadNative } from '../native/index.js';
import type { QuantizeSpec } from '../model/quantize.js';
import { spendLinkDelay, type ExpertStore, type LoadTicket, type SlotWeights } from './expert-store.js';

export abstract class EngineThreadExpertStore<R> implements ExpertStore {
  readonly overlapsCompute = false;
  abstract readonly expertBytes: number;
  abstract readonly slotBytes: number;
  private readonly finished = new Set<LoadTicket>();
  private nextTicket = 1;
  loads = 0;
  bytesRead = 0;
  readSeconds = 0;

  /** Where expert (layer, expert)'s bytes are; undefined: no such expert. */
  protected abstract rangesOf(layer: number, expert: number): R | undefined;
  /** Reads the expert's bytes and packs them into the slot (allocating its weights on first use). */
  protected abstract load(r: R, slot: SlotWeights): void;
  /** Names the checkpoint in errors. */
  protected abstract readonly where: string;

  submit(layer: number, expert: number, slot: SlotWeights, _priority: number, simulatedDelayUs = 0): LoadTicket {
    const r = this.rangesOf(layer, expert);
    if (!r) throw new RangeError(`no expert (${layer}, ${expert}) in the checkpoint at ${this.where}`);
    this.loads++;
    this.bytesRead += this.expertBytes;
    this.load(r, slot);
    spendLinkDelay(simulatedDelayUs);
    const t = this.nextTicket++;
    this.finished.add(t);
    return t;
  }

  wait(ticket: LoadTicket): void {
    if (!this.finished.delete(ticket)) throw new RangeError(`ticket ${ticket} is not pending (already waited for or cancelled)`);
  }

  done(): boolean {
    return true;
  }

  cancel(): boolean {
    return false;
  }

  get inFlight(): number {
    return 0;
  }

  dispose(): void {
    this.finished.clear();
  }
}

/**
 * --quantize over a checkpoint stored in another format: the expert's dequantised f32 gate [I, H],
 * up [I, H] and down [H, I] packed into the slot in q's format (allocated on first use, then
 * repacked in place).
 */
export function packRequantized(slot: SlotWeights<PackedWeight>, gate: Float32Array, up: Float32Array, down: Float32Array,
                                q: QuantizeSpec, H: number, I: number): void {
  const n = loadNative();
  if (slot.gateUp) n.repackInto(slot.gateUp, gate, 'f32', up);
  else slot.gateUp = n.packGateUp(gate, up, 'f32', I, H, q.format, q.group);
  if (slot.down) n.repackInto(slot.down, down, 'f32');
  else slot.down = n.packWeight(down, 'f32', H, I, q.format, q.group);
}
