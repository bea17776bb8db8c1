// The EAM collection (MoE-Infinity): a bounded set of finished requests' activation matrices,
// filled from live traffic, persisted to the trace folder and reloaded at start. When full, the
// least-matched entry (fewest times it was a running request's best match) is replaced.
import fs from 'node:fs';
import path from 'node:path';

import { ExpertActivationMatrix, unitRows } from './eam.js';

export const DEFAULT_EAM_CAPACITY = 1000;
export const EAM_COLLECTION_FILE = 'eam-collection.bin';
const MAGIC = 'EXPEAM01';
/** Distinguishes the temporary files of overlapping asynchronous saves. */
let saveSeq = 0;

export interface EamEntry {
  eam: ExpertActivationMatrix;
  /** [L, E] rows of eam scaled to unit L2 norm (cosine = dot product), kept for matching. */
  unit: Float32Array;
  /** Times this entry was the best match of a running request. */
  matches: number;
  /** Insertion order: ties in `matches` replace the oldest entry first. */
  seq: number;
}

interface FileHeader {
  version: 1;
  numLayers: number;
  numExperts: number;
  count: number;
  /** Free-form model identity (architecture, layers, experts) checked at reload. */
  model: string;
  matches: number[];
}

export class EamCollection {
  readonly entries: EamEntry[] = [];
  private nextSeq = 0;
  /** Entries replaced since creation (the collection was full). */
  replaced = 0;

  constructor(readonly numLayers: number, readonly numExperts: number, readonly capacity = DEFAULT_EAM_CAPACITY,
              readonly model = `${numLayers}x${numExperts}`) {
    if (!Number.isInteger(capacity) || capacity < 1) throw new RangeError(`capacity is ${capacity}, expected a positive integer`);
  }

  get size(): number {
    return this.entries.length;
  }

  /** Adds a finished request's EAM (copied); replaces the least-matched entry when full. Returns its index. */
  add(eam: ExpertActivationMatrix, matches = 0): number {
    if (eam.numLayers !== this.numLayers || eam.numExperts !== this.numExperts)
      throw new RangeError(`EAM is ${eam.numLayers}x${eam.numExperts}, the collection holds ${this.numLayers}x${this.numExperts}`);
    if (eam.total() === 0) return -1; // a request that never reached a MoE layer says nothing
    const copy = eam.clone();
    const entry: EamEntry = { eam: copy, unit: unitRows(copy.counts, this.numLayers, this.numExperts), matches, seq: this.nextSeq++ };
    if (this.entries.length < this.capacity) {
      this.entries.push(entry);
      return this.entries.length - 1;
    }
    const victim = this.leastMatched();
    this.entries[victim] = entry;
    this.replaced++;
    return victim;
  }

  /** Index of the entry to replace: fewest matches, then oldest. */
  leastMatched(): number {
    let best = 0;
    for (let i = 1; i < this.entries.length; i++) {
      const a = this.entries[i]!;
      const b = this.entries[best]!;
      if (a.matches < b.matches || (a.matches === b.matches && a.seq < b.seq)) best = i;
    }
    return best;
  }

  recordMatch(index: number): void {
    const e = this.entries[index];
    if (e) e.matches++;
  }

  /** The collection file's bytes (header and f32 data). */
  serialize(): Buffer {
    // NOTE: entries are written in insertion order so that a reload keeps the replacement ties.
    const ordered = [...this.entries].sort((a, b) => a.seq - b.seq);
    const header: FileHeader = {
      version: 1, numLayers: this.numLayers, numExperts: this.numExperts, count: ordered.length,
      model: this.model, matches: ordered.map((e) => e.matches),
    };
    const json = Buffer.from(JSON.stringify(header), 'utf8');
    // magic (8) + header length (4) + header, padded so that the f32 data starts 4-byte aligned
    const headBytes = 12 + json.length;
    const pad = (4 - (headBytes % 4)) % 4;
    const LE = this.numLayers * this.numExperts;
    const buf = Buffer.alloc(headBytes + pad + ordered.length * LE * 4);
    buf.write(MAGIC, 0, 'ascii');
    buf.writeUInt32LE(json.length, 8);
    json.copy(buf, 12);
    const data = new Float32Array(LE * ordered.length);
    ordered.forEach((e, i) => data.set(e.eam.counts, i * LE));
    Buffer.from(data.buffer).copy(buf, headBytes + pad);
    return buf;
  }

  /** Writes the collection atomically (temporary file + rename) to dir/eam-collection.bin. */
  save(dir: string): string {
    fs.mkdirSync(dir, { recursive: true });
    const file = path.join(dir, EAM_COLLECTION_FILE);
    const tmp = `${file}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, this.serialize());
    fs.renameSync(tmp, file);
    return file;
  }

  /**
   * save() without blocking the thread on the disk (the engine thread saves now and then): the
   * bytes are taken at the call, so later changes do not tear the file.
   */
  async saveAsync(dir: string): Promise<string> {
    const buf = this.serialize();
    await fs.promises.mkdir(dir, { recursive: true });
    const file = path.join(dir, EAM_COLLECTION_FILE);
    const tmp = `${file}.tmp-${process.pid}-${++saveSeq}`;
    await fs.promises.writeFile(tmp, buf);
    await fs.promises.rename(tmp, file);
    return file;
  }

  /**
   * Loads dir/eam-collection.bin into a new collection of this shape. A missing file gives an
   * empty collection; a file of another model (shape or identity) or a corrupt one is ignored
   * with a warning (the collection refills from traffic).
   */
  static load(dir: string, numLayers: number, numExperts: number, opts: {
    capacity?: number; model?: string; warn?: (msg: string) => void;
  } = {}): EamCollection {
    const c = new EamCollection(numLayers, numExperts, opts.capacity ?? DEFAULT_EAM_CAPACITY, opts.model);
    const warn = opts.warn ?? ((m: string) => process.emitWarning(m, { code: 'EXPERTD_EAM_COLLECTION' }));
    const file = path.join(dir, EAM_COLLECTION_FILE);
    if (!fs.existsSync(file)) return c;
    let header: FileHeader;
    let buf: Buffer;
    try {
      buf = fs.readFileSync(file);
      if (buf.length < 12 || buf.toString('ascii', 0, 8) !== MAGIC) throw new Error('not an expertd EAM collection (bad magic)');
      const len = buf.readUInt32LE(8);
      if (12 + len > buf.length) throw new Error('header runs past the end of the file (truncated?)');
      header = JSON.parse(buf.toString('utf8', 12, 12 + len)) as FileHeader;
      const headBytes = 12 + len;
      const pad = (4 - (headBytes % 4)) % 4;
      const LE = header.numLayers * header.numExperts;
      if (header.numLayers !== numLayers || header.numExperts !== numExperts || (opts.model && header.model !== opts.model)) {
        warn(`${file} holds EAMs of model ${header.model} (${header.numLayers} MoE layers x ${header.numExperts} experts), ` +
          `not of this model ${opts.model ?? ''} (${numLayers} x ${numExperts}); ignoring it (it will be overwritten)`);
        return c;
      }
      if (buf.length !== headBytes + pad + header.count * LE * 4)
        throw new Error(`size is ${buf.length} bytes, expected ${headBytes + pad + header.count * LE * 4} for ${header.count} EAMs`);
      const aligned = new Float32Array(header.count * LE);
      new Uint8Array(aligned.buffer).set(buf.subarray(headBytes + pad));
      // Keep the most-matched entries when the file holds more than this collection's capacity.
      const order = [...Array(header.count).keys()];
      if (header.count > c.capacity) order.sort((a, b) => (header.matches[b] ?? 0) - (header.matches[a] ?? 0) || a - b);
      const keep = order.slice(0, c.capacity).sort((a, b) => a - b);
      for (const i of keep)
        c.add(new ExpertActivationMatrix(numLayers, numExperts, aligned.slice(i * LE, (i + 1) * LE)), header.matches[i] ?? 0);
    } catch (e) {
      warn(`cannot read ${file}: ${(e as Error).message}; starting with an empty EAM collection`);
      return new EamCollection(numLayers, numExperts, opts.capacity ?? DEFAULT_EAM_CAPACITY, opts.model);
    }
    return c;
  }
}
