// Writes the routing trace off the engine's hot path: append() only serialises a step into a
// bounded queue (never touches the disk, never waits); an async loop writes the queue to a rotated
// set of files of bounded size, keeping the newest N. What is not written is counted, by reason.
import fs from 'node:fs';
import path from 'node:path';

import { TRACE_META_FILE, traceFileIndex, traceFileName, traceFiles, type TraceMeta, type TraceStep } from './trace-file.js';

export const DEFAULT_TRACE_MAX_FILE_BYTES = 64 * 2 ** 20;
export const DEFAULT_TRACE_MAX_FILES = 8;
export const DEFAULT_TRACE_QUEUE_BYTES = 16 * 2 ** 20;
/** Bytes written per write call at most (one batch of queued lines). */
const BATCH_BYTES = 2 ** 20;

/** Why a request's step record was not written. */
export type TraceDropReason = 'sampled_out' | 'queue_full' | 'too_large' | 'write_error';
export const TRACE_DROP_REASONS: readonly TraceDropReason[] = ['sampled_out', 'queue_full', 'too_large', 'write_error'];

/** Counts of request-step records (one request's routing in one step), since start or as increments. */
export interface TraceCounts {
  written: number;
  dropped: Record<TraceDropReason, number>;
}

/** The asynchronous file operations the writer uses (tests stub them to be slow or to fail). */
export interface TraceFs {
  /** Opens a file for appending. */
  open(file: string): Promise<{ appendFile(data: string): Promise<void>; close(): Promise<void> }>;
  unlink(file: string): Promise<void>;
}

export const nodeTraceFs: TraceFs = {
  open: (file) => fs.promises.open(file, 'a'),
  unlink: (file) => fs.promises.unlink(file),
};

export interface TraceWriterOptions {
  /** A file is closed and the next one started before it would pass this size (default 64 MiB). */
  maxFileBytes?: number;
  /** Files kept, the newest (default 8); older ones are deleted as new ones start. */
  maxFiles?: number;
  /** Fraction of requests traced, chosen by a hash of the request id (default 1 = all). */
  sampleRate?: number;
  /** Serialised bytes waiting for the disk at most; beyond, records are dropped (default 16 MiB). */
  maxQueueBytes?: number;
  fs?: TraceFs;
  /** Told when dropping starts (and when a write fails); the daemon logs it. */
  warn?: (msg: string) => void;
}

interface Queued {
  line: string;
  bytes: number;
  records: number;
}

/** FNV-1a of the id mapped to [0, 1): a request is traced in all its steps or in none. */
export function sampleKey(id: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < id.length; i++) {
    h ^= id.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0) / 2 ** 32;
}

const zeroCounts = (): TraceCounts => ({ written: 0, dropped: { sampled_out: 0, queue_full: 0, too_large: 0, write_error: 0 } });

export class TraceWriter {
  readonly maxFileBytes: number;
  readonly maxFiles: number;
  readonly sampleRate: number;
  readonly maxQueueBytes: number;
  private readonly tfs: TraceFs;
  private readonly warn: (msg: string) => void;
  /** Files of the set on disk, oldest first (the one being written last). */
  private readonly files: string[];
  private nextIndex: number;
  private handle: Awaited<ReturnType<TraceFs['open']>> | null = null;
  private fileBytes = 0;
  private queue: Queued[] = [];
  private queuedBytes = 0;
  private writing: Promise<void> | null = null;
  private dropping = false;
  private writeFailing = false;
  private closed = false;
  /** The batch being written (counted when its write ends), and whether close() gave up on it. */
  private inFlight: Queued[] = [];
  private abandoned = false;
  /** Lines accepted into the queue, and lines since written or dropped (flush() waits on these). */
  private accepted = 0;
  private settled = 0;
  private waiters: { upTo: number; resolve: () => void }[] = [];
  readonly totals: TraceCounts = zeroCounts();
  private reported: TraceCounts = zeroCounts();

  /**
   * Prepares the folder (at startup, synchronously: before any step runs): writes trace-meta.json,
   * moves aside another model's trace, and finds the set's files so that numbering continues.
   */
  constructor(readonly dir: string, meta: TraceMeta, opts: TraceWriterOptions = {}) {
    this.maxFileBytes = opts.maxFileBytes ?? DEFAULT_TRACE_MAX_FILE_BYTES;
    this.maxFiles = opts.maxFiles ?? DEFAULT_TRACE_MAX_FILES;
    this.sampleRate = opts.sampleRate ?? 1;
    this.maxQueueBytes = opts.maxQueueBytes ?? DEFAULT_TRACE_QUEUE_BYTES;
    if (!(this.maxFileBytes >= 1)) throw new RangeError(`maxFileBytes is ${this.maxFileBytes}, expected at least 1`);
    if (!Number.isInteger(this.maxFiles) || this.maxFiles < 1) throw new RangeError(`maxFiles is ${this.maxFiles}, expected a positive integer`);
    if (!(this.sampleRate >= 0 && this.sampleRate <= 1)) throw new RangeError(`sampleRate is ${this.sampleRate}, expected a fraction in [0, 1]`);
    this.tfs = opts.fs ?? nodeTraceFs;
    this.warn = opts.warn ?? ((m) => process.emitWarning(m, { code: 'EXPERTD_TRACE' }));
    fs.mkdirSync(dir, { recursive: true });
    const metaFile = path.join(dir, TRACE_META_FILE);
    if (fs.existsSync(metaFile)) {
      let old: TraceMeta | null = null;
      try {
        old = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as TraceMeta;
      } catch {
        // Unreadable: treated as another model's (set aside, not appended to).
      }
      if (!old || old.numLayers !== meta.numLayers || old.numExperts !== meta.numExperts || old.model !== meta.model) {
        // Another model's trace: keep it aside rather than mixing shapes in one set.
        const stamp = Date.now();
        for (const f of traceFiles(dir)) fs.renameSync(f, `${f}.${stamp}.old`);
        fs.renameSync(metaFile, `${metaFile}.${stamp}.old`);
      }
    }
    const tmp = `${metaFile}.tmp-${process.pid}`;
    fs.writeFileSync(tmp, JSON.stringify(meta, null, 2));
    fs.renameSync(tmp, metaFile);
    this.files = traceFiles(dir);
    const last = this.files.length ? traceFileIndex(path.basename(this.files[this.files.length - 1]!)) : -1;
    // NOTE: every start begins a new file, so a line torn by a crash stays the last of its file.
    this.nextIndex = Math.max(last, 0) + 1;
  }

  /** Records per reason since start. */
  counts(): TraceCounts {
    return { written: this.totals.written, dropped: { ...this.totals.dropped } };
  }

  /** Increments since the last call (for the metrics registry). */
  takeDelta(): TraceCounts {
    const t = this.counts();
    const r = this.reported;
    const d = zeroCounts();
    d.written = t.written - r.written;
    for (const k of TRACE_DROP_REASONS) d.dropped[k] = t.dropped[k] - r.dropped[k];
    this.reported = t;
    return d;
  }

  /** Bytes serialised and not yet written. */
  get pendingBytes(): number {
    return this.queuedBytes;
  }

  sampled(id: string): boolean {
    return this.sampleRate >= 1 || sampleKey(id) < this.sampleRate;
  }

  /**
   * Queues a step (the engine thread calls this every step): no file operation, no wait. When the
   * queue is full the step's records are dropped and counted; the first drop of a run is reported.
   */
  append(step: TraceStep): void {
    let { requests, finished } = step;
    if (this.sampleRate < 1) {
      const kept = requests.filter((r) => this.sampled(r.id));
      this.totals.dropped.sampled_out += requests.length - kept.length;
      requests = kept;
      finished = finished?.filter((id) => this.sampled(id));
    }
    if (requests.length === 0 && !finished?.length) return;
    const line = `${JSON.stringify({ step: step.step, requests, ...(finished?.length ? { finished } : {}) })}\n`;
    const bytes = Buffer.byteLength(line);
    const records = requests.length;
    if (this.closed) {
      this.totals.dropped.write_error += records;
      return;
    }
    if (bytes > this.maxFileBytes) {
      this.totals.dropped.too_large += records;
      return;
    }
    if (this.queuedBytes + bytes > this.maxQueueBytes) {
      this.totals.dropped.queue_full += records;
      if (!this.dropping) {
        this.dropping = true;
        this.warn(`routing trace: the writer fell behind (${this.queuedBytes} bytes queued, cap ${this.maxQueueBytes}); ` +
          `dropping records until it catches up (expertd_trace_records_dropped_total{reason="queue_full"}, ` +
          `${this.totals.dropped.queue_full} so far)`);
      }
      return;
    }
    // Report the next episode only once the writer has caught up by half the queue.
    if (this.dropping && this.queuedBytes + bytes <= this.maxQueueBytes / 2) this.dropping = false;
    this.queue.push({ line, bytes, records });
    this.accepted++;
    this.queuedBytes += bytes;
    this.kick();
  }

  private kick(): void {
    if (this.writing) return;
    this.writing = this.drain().finally(() => {
      this.writing = null;
      if (this.queue.length) this.kick();
    });
  }

  private async drain(): Promise<void> {
    while (this.queue.length) {
      const first = this.queue[0]!;
      if (!this.handle || this.fileBytes + first.bytes > this.maxFileBytes) {
        try {
          await this.rotate();
        } catch (e) {
          this.failWrite(this.queue.splice(0), e as Error);
          return;
        }
      }
      // One batch: whole lines that fit in the current file.
      let n = 0;
      let bytes = 0;
      let records = 0;
      while (n < this.queue.length && bytes < BATCH_BYTES) {
        const q = this.queue[n]!;
        if (this.fileBytes + bytes + q.bytes > this.maxFileBytes) break;
        bytes += q.bytes;
        records += q.records;
        n++;
      }
      const batch = this.queue.splice(0, n);
      this.inFlight = batch;
      this.fileBytes += bytes;
      try {
        await this.handle!.appendFile(batch.map((q) => q.line).join(''));
      } catch (e) {
        if (this.abandoned) return;
        this.failWrite(batch, e as Error);
        // Start a fresh file: the failed one may end in a partial line.
        await this.closeHandle();
        continue;
      }
      if (this.abandoned) return;
      this.inFlight = [];
      this.queuedBytes -= bytes;
      this.totals.written += records;
      this.settle(batch.length);
      this.writeFailing = false;
    }
  }

  private settle(lines: number): void {
    this.settled += lines;
    if (!this.waiters.some((w) => w.upTo <= this.settled)) return;
    for (const w of this.waiters) if (w.upTo <= this.settled) w.resolve();
    this.waiters = this.waiters.filter((w) => w.upTo > this.settled);
  }

  private failWrite(batch: Queued[], err: Error): void {
    this.settle(batch.length);
    for (const q of batch) {
      this.queuedBytes -= q.bytes;
      this.totals.dropped.write_error += q.records;
    }
    if (!this.writeFailing) {
      this.writeFailing = true;
      this.warn(`routing trace: writing to ${this.dir} failed (${err.message}); dropping records ` +
        `(expertd_trace_records_dropped_total{reason="write_error"}) until a write succeeds`);
    }
  }

  private async closeHandle(): Promise<void> {
    const h = this.handle;
    this.handle = null;
    this.fileBytes = 0;
    await h?.close().catch(() => undefined);
  }

  /** Closes the current file, starts the next one, and deletes the oldest beyond maxFiles. */
  private async rotate(): Promise<void> {
    await this.closeHandle();
    const file = path.join(this.dir, traceFileName(this.nextIndex++));
    this.handle = await this.tfs.open(file);
    this.files.push(file);
    while (this.files.length > this.maxFiles) {
      const old = this.files.shift()!;
      await this.tfs.unlink(old).catch((e: NodeJS.ErrnoException) => {
        if (e.code !== 'ENOENT') this.warn(`routing trace: cannot delete ${old}: ${e.message}`);
      });
    }
  }

  /** Resolves once everything queued so far is written (or dropped by a failed write). */
  async flush(): Promise<void> {
    // NOTE: waits for the lines queued at the call only, so that steps queueing more meanwhile
    // (the engine keeps running) cannot keep it waiting.
    const upTo = this.accepted;
    if (this.settled >= upTo) return;
    await new Promise<void>((resolve) => this.waiters.push({ upTo, resolve }));
  }

  /**
   * Writes what is queued, waiting at most timeoutMs (then the rest is counted as dropped), and
   * closes the file. Later appends are dropped.
   */
  async close(timeoutMs = 5000): Promise<void> {
    this.closed = true;
    let timer: NodeJS.Timeout | undefined;
    const timedOut = await Promise.race([
      this.flush().then(() => false),
      new Promise<boolean>((resolve) => { timer = setTimeout(() => resolve(true), timeoutMs); }),
    ]);
    clearTimeout(timer);
    if (timedOut) {
      // The write in flight may still land; it is counted as lost, like the rest of the queue.
      this.abandoned = true;
      const left = [...this.inFlight, ...this.queue.splice(0)];
      this.inFlight = [];
      this.failWrite(left, new Error(`still ${this.queuedBytes} bytes queued after ${timeoutMs} ms at close`));
      // Not awaited: a handle closes after its pending write, which may never end.
      void this.closeHandle();
      return;
    }
    await this.closeHandle();
  }

  /** The file names of the set, oldest first (for tests and logs). */
  fileNames(): string[] {
    return this.files.map((f) => path.basename(f));
  }
}

