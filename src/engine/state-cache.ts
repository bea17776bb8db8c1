// The state cache of hybrid models (Qwen3-Next, Qwen3.5): beside the paged KV cache, one slot per
// running sequence holds its linear-attention layers' conv and recurrent state. Bookkeeping only (the
// state memory lives with the model): a slot is taken at admission and given back at finish, abort
// and preemption (a preempted sequence is recomputed from position 0, which resets its new slot).
import type { SeqId } from './kv-cache.js';

export class StateSlotPool {
  /** Free slots, taken from the end (the most recently freed first). */
  private readonly free: number[] = [];
  private readonly owners = new Map<SeqId, number>();

  constructor(readonly numSlots: number) {
    if (!Number.isInteger(numSlots) || numSlots < 1) throw new RangeError(`numSlots is ${numSlots}, expected a positive integer`);
    for (let i = numSlots - 1; i >= 0; i--) this.free.push(i);
  }

  get numFree(): number {
    return this.free.length;
  }

  get numUsed(): number {
    return this.numSlots - this.free.length;
  }

  /** The sequence's slot (taking a free one if it has none); throws when none is free. */
  allocate(id: SeqId): number {
    const own = this.owners.get(id);
    if (own !== undefined) return own;
    const slot = this.free.pop();
    if (slot === undefined) throw new Error(`no free state slot for sequence ${id} (all ${this.numSlots} in use)`);
    this.owners.set(id, slot);
    return slot;
  }

  /** Gives the sequence's slot back (no-op when it has none). */
  release(id: SeqId): void {
    const slot = this.owners.get(id);
    if (slot === undefined) return;
    this.owners.delete(id);
    this.free.push(slot);
  }

  slotOf(id: SeqId): number | undefined {
    return this.owners.get(id);
  }

  /** Throws when a slot is owned twice or is both owned and free (tests). */
  checkInvariants(): void {
    const seen = new Set<number>();
    for (const s of [...this.owners.values(), ...this.free]) {
      if (!(s >= 0 && s < this.numSlots)) throw new Error(`state slot ${s} is out of range`);
      if (seen.has(s)) throw new Error(`state slot ${s} is owned or free twice`);
      seen.add(s);
    }
    if (seen.size !== this.numSlots) throw new Error(`${this.numSlots - seen.size} state slots are lost`);
  }
}
