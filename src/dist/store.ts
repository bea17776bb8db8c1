// The rendezvous store of a rank group (the control plane, like PyTorch's TCPStore): rank 0 serves a
// small TCP key-value store; every rank (and the native Gloo rendezvous, native/comm/gloo.cc) is a
// client that sets keys, waits for keys, and bumps atomic counters.
//
// Wire protocol (all integers little-endian; a C++ client needs only blocking send/recv):
//
//   frame    := u32 bodyBytes | body                      (bodyBytes <= MAX_FRAME_BYTES)
//   bytes    := u32 length | length bytes
//   request  := u8 op | u32 id | fields(op)
//     op 1 SET   : bytes key | bytes value               -> OK
//     op 2 GET   : u32 timeoutMs | bytes key             -> OK bytes value, or TIMEOUT once timeoutMs
//                                                           pass without the key being set (0: no wait)
//     op 3 ADD   : i64 delta | bytes key                 -> OK i64 newValue (the key holds the decimal
//                                                           text of the counter; absent counts as 0)
//     op 4 CHECK : u32 n | n x bytes key                 -> OK u8 (1 when every key is set)
//   response := u32 id | u8 status | payload
//     status 0 OK (payload as above), 1 TIMEOUT (no payload), 2 ERROR (bytes utf-8 message)
//
// A response carries its request's id; GET answers come when the key is set, so responses on one
// connection may come out of request order. A malformed frame closes the connection. Keys are byte
// strings (clients send UTF-8); the server never interprets them.
import { EventEmitter } from 'node:events';
import net from 'node:net';

export const MAX_FRAME_BYTES = 64 * 1024 * 1024 + 4096;
export const MAX_KEY_BYTES = 4096;
/** Longest wait a timer can express (Node's setTimeout limit, 2^31 - 1 ms, less the client's grace). */
export const MAX_TIMEOUT_MS = 2 ** 31 - 1 - 1000;

export const enum StoreOp { Set = 1, Get = 2, Add = 3, Check = 4 }
export const enum StoreStatus { Ok = 0, Timeout = 1, Error = 2 }

/** Store failures carry a code: E_STORE_CONNECT, E_STORE_TIMEOUT, E_STORE_LOST, E_STORE. */
export class StoreError extends Error {
  constructor(message: string, readonly code: 'E_STORE_CONNECT' | 'E_STORE_TIMEOUT' | 'E_STORE_LOST' | 'E_STORE') {
    super(message);
    this.name = 'StoreError';
  }
}

/** Splits a byte stream into frames; returns null for a malformed length. */
class FrameReader {
  private chunks: Buffer[] = [];
  private buffered = 0;

  push(chunk: Buffer): Buffer[] | null {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    const frames: Buffer[] = [];
    while (this.buffered >= 4) {
      if (this.chunks.length > 1) this.chunks = [Buffer.concat(this.chunks)];
      const head = this.chunks[0]!;
      const bodyBytes = head.readUInt32LE(0);
      if (bodyBytes > MAX_FRAME_BYTES) return null;
      if (this.buffered < 4 + bodyBytes) break;
      frames.push(head.subarray(4, 4 + bodyBytes));
      const rest = head.subarray(4 + bodyBytes);
      this.chunks = rest.length > 0 ? [rest] : [];
      this.buffered = rest.length;
    }
    return frames;
  }
}

/** Builds one frame from parts (numbers are written by the callers into small buffers). */
function frame(parts: Buffer[]): Buffer {
  const bodyBytes = parts.reduce((n, p) => n + p.length, 0);
  const head = Buffer.alloc(4);
  head.writeUInt32LE(bodyBytes, 0);
  return Buffer.concat([head, ...parts], 4 + bodyBytes);
}

function u32(v: number): Buffer { const b = Buffer.alloc(4); b.writeUInt32LE(v, 0); return b; }
function lengthPrefixed(bytes: Uint8Array): Buffer[] { return [u32(bytes.length), Buffer.from(bytes.buffer, bytes.byteOffset, bytes.length)]; }

/** A bounds-checked cursor over one frame's body; any overrun throws (the frame is malformed). */
class Cursor {
  offset = 0;
  constructor(private readonly body: Buffer) {}
  private need(n: number) { if (this.offset + n > this.body.length) throw new RangeError('truncated frame'); }
  u8() { this.need(1); return this.body.readUInt8(this.offset++); }
  u32() { this.need(4); const v = this.body.readUInt32LE(this.offset); this.offset += 4; return v; }
  i64() { this.need(8); const v = this.body.readBigInt64LE(this.offset); this.offset += 8; return v; }
  bytes(max = MAX_FRAME_BYTES) {
    const n = this.u32();
    if (n > max) throw new RangeError(`field of ${n} bytes exceeds ${max}`);
    this.need(n);
    const v = this.body.subarray(this.offset, this.offset + n);
    this.offset += n;
    return v;
  }
  end() { if (this.offset !== this.body.length) throw new RangeError('trailing bytes in frame'); }
}

interface Waiter { socket: net.Socket; id: number; timer: NodeJS.Timeout | null }

/**
 * The store's server (rank 0). Events: 'connection' (socket) and 'disconnect' (socket) when a client
 * comes and goes, for whoever watches the group's health.
 */
export class StoreServer extends EventEmitter {
  private readonly values = new Map<string, Buffer>();
  private readonly waiters = new Map<string, Set<Waiter>>();
  private readonly sockets = new Set<net.Socket>();
  private closed = false;

  private constructor(private readonly server: net.Server, readonly host: string, readonly port: number) {
    super();
    server.on('connection', (socket) => this.accept(socket));
  }

  /** Listens on host:port (port 0: any free port; read `.port`). */
  static listen(host: string, port: number): Promise<StoreServer> {
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new RangeError(`port is ${port}, expected an integer in [0, 65535]`);
    const server = net.createServer();
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve(new StoreServer(server, host, (server.address() as net.AddressInfo).port));
      });
    });
  }

  /** Number of keys set (tests, diagnostics). */
  get size(): number { return this.values.size; }

  /** Stops listening and drops every client: their pending gets fail with E_STORE_LOST. */
  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    for (const set of this.waiters.values()) for (const w of set) if (w.timer) clearTimeout(w.timer);
    this.waiters.clear();
    for (const s of this.sockets) s.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: net.Socket) {
    if (this.closed) { socket.destroy(); return; }
    socket.setNoDelay(true);
    socket.setKeepAlive(true, 1000);
    this.sockets.add(socket);
    const reader = new FrameReader();
    socket.on('data', (chunk: Buffer) => {
      const frames = reader.push(chunk);
      if (frames === null) { socket.destroy(); return; }
      for (const body of frames) {
        try {
          this.handle(socket, body);
        } catch {
          socket.destroy();   // malformed request
          return;
        }
      }
    });
    socket.on('error', () => { /* 'close' follows */ });
    socket.on('close', () => {
      this.sockets.delete(socket);
      for (const [key, set] of this.waiters) {
        for (const w of set) if (w.socket === socket) { if (w.timer) clearTimeout(w.timer); set.delete(w); }
        if (set.size === 0) this.waiters.delete(key);
      }
      if (!this.closed) this.emit('disconnect', socket);
    });
    this.emit('connection', socket);
  }

  private reply(socket: net.Socket, id: number, status: StoreStatus, payload: Buffer[] = []) {
    if (!socket.destroyed) socket.write(frame([u32(id), Buffer.of(status), ...payload]));
  }

  private handle(socket: net.Socket, body: Buffer) {
    const c = new Cursor(body);
    const op = c.u8(), id = c.u32();
    switch (op) {
      case StoreOp.Set: {
        const key = c.bytes(MAX_KEY_BYTES).toString('latin1');
        const value = Buffer.from(c.bytes());   // copy: the frame's buffer is reused
        c.end();
        this.values.set(key, value);
        this.reply(socket, id, StoreStatus.Ok);
        this.wake(key, value);
        return;
      }
      case StoreOp.Get: {
        const timeoutMs = c.u32();
        const key = c.bytes(MAX_KEY_BYTES).toString('latin1');
        c.end();
        const value = this.values.get(key);
        if (value !== undefined) { this.reply(socket, id, StoreStatus.Ok, lengthPrefixed(value)); return; }
        if (timeoutMs === 0) { this.reply(socket, id, StoreStatus.Timeout); return; }
        const waiter: Waiter = { socket, id, timer: null };
        let set = this.waiters.get(key);
        if (!set) this.waiters.set(key, set = new Set());
        set.add(waiter);
        // NOTE: clamped: Node fires a timer longer than 2^31 - 1 ms at once (the C++ client may ask).
        waiter.timer = setTimeout(() => {
          set!.delete(waiter);
          if (set!.size === 0 && this.waiters.get(key) === set) this.waiters.delete(key);
          this.reply(socket, id, StoreStatus.Timeout);
        }, Math.min(timeoutMs, 2 ** 31 - 1));
        return;
      }
      case StoreOp.Add: {
        const delta = c.i64();
        const key = c.bytes(MAX_KEY_BYTES).toString('latin1');
        c.end();
        const old = this.values.get(key);
        const text = old === undefined ? '0' : old.toString('latin1');
        if (!/^-?\d+$/.test(text)) {
          this.reply(socket, id, StoreStatus.Error, lengthPrefixed(Buffer.from(`key '${key}' holds a value that is not an integer counter`)));
          return;
        }
        const next = BigInt(text) + delta;
        const value = Buffer.from(next.toString(), 'latin1');
        this.values.set(key, value);
        const out = Buffer.alloc(8);
        out.writeBigInt64LE(BigInt.asIntN(64, next), 0);
        this.reply(socket, id, StoreStatus.Ok, [out]);
        this.wake(key, value);
        return;
      }
      case StoreOp.Check: {
        const n = c.u32();
        let all = true;
        for (let i = 0; i < n; i++) if (!this.values.has(c.bytes(MAX_KEY_BYTES).toString('latin1'))) all = false;
        c.end();
        this.reply(socket, id, StoreStatus.Ok, [Buffer.of(all ? 1 : 0)]);
        return;
      }
      default:
        throw new RangeError(`unknown op ${op}`);
    }
  }

  private wake(key: string, value: Buffer) {
    const set = this.waiters.get(key);
    if (!set) return;
    this.waiters.delete(key);
    for (const w of set) {
      if (w.timer) clearTimeout(w.timer);
      this.reply(w.socket, w.id, StoreStatus.Ok, lengthPrefixed(value));
    }
  }
}

interface Pending { resolve: (c: Cursor) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * A client of the store. Every call has a timeout; `get` waits for its key up to its own timeout.
 * When the connection drops (server gone, network), every pending call rejects with E_STORE_LOST,
 * later calls reject at once, and the client emits 'lost' (Error) and settles `lost` with it;
 * close() is not a loss.
 */
export class StoreClient extends EventEmitter {
  /** Resolves with the error if the connection is lost (never rejects; not settled by close()). */
  readonly lost: Promise<Error>;
  private resolveLost!: (e: Error) => void;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failure: StoreError | null = null;
  private closing = false;

  private constructor(private readonly socket: net.Socket, readonly address: string, private readonly opTimeoutMs: number) {
    super();
    this.lost = new Promise((r) => { this.resolveLost = r; });
    const reader = new FrameReader();
    socket.on('data', (chunk: Buffer) => {
      const frames = reader.push(chunk);
      if (frames === null) { this.fail(`store at ${address} sent a malformed frame`); return; }
      for (const body of frames) {
        const c = new Cursor(body);
        let id: number;
        try { id = c.u32(); } catch { this.fail(`store at ${address} sent a malformed frame`); return; }
        const p = this.pending.get(id);
        if (!p) continue;   // an answer after its call timed out
        this.pending.delete(id);
        clearTimeout(p.timer);
        p.resolve(c);
      }
    });
    socket.on('error', (e) => this.fail(`connection to store at ${address} lost: ${e.message}`));
    socket.on('close', () => this.fail(`connection to store at ${address} lost`));
  }

  /**
   * Connects to host:port, retrying (the store may come up after this rank) until timeoutMs has
   * passed; timeoutMs also bounds each later set/add/check.
   */
  static async connect(host: string, port: number, timeoutMs: number): Promise<StoreClient> {
    if (!Number.isInteger(port) || port <= 0 || port > 65535) throw new RangeError(`port is ${port}, expected an integer in [1, 65535]`);
    if (!(timeoutMs > 0 && timeoutMs <= MAX_TIMEOUT_MS)) throw new RangeError(`timeoutMs is ${timeoutMs}, expected a number in (0, ${MAX_TIMEOUT_MS}]`);
    const address = `${host}:${port}`;
    const deadline = Date.now() + timeoutMs;
    let delayMs = 20;
    let lastError = '';
    for (;;) {
      const left = deadline - Date.now();
      if (left <= 0) break;
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect({ host, port });
          const timer = setTimeout(() => { s.destroy(); reject(new Error('connect timed out')); }, left);
          s.once('connect', () => { clearTimeout(timer); s.off('error', reject); resolve(s); });
          s.once('error', (e) => { clearTimeout(timer); s.destroy(); reject(e); });
        });
        socket.setNoDelay(true);
        socket.setKeepAlive(true, 1000);
        return new StoreClient(socket, address, timeoutMs);
      } catch (e) {
        lastError = (e as Error).message;
      }
      await sleep(Math.min(delayMs, Math.max(0, deadline - Date.now())));
      delayMs = Math.min(delayMs * 2, 500);
    }
    throw new StoreError(`could not connect to the store at ${address} within ${timeoutMs} ms (${lastError || 'timed out'})`, 'E_STORE_CONNECT');
  }

  /** Sets key to value (a string is stored as UTF-8) and wakes every get waiting for it. */
  async set(key: string, value: Uint8Array | string): Promise<void> {
    const bytes = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
    await this.call(StoreOp.Set, [...lengthPrefixed(keyBytes(key)), ...lengthPrefixed(bytes)], this.opTimeoutMs, `set('${key}')`);
  }

  /** The value of key, waiting up to timeoutMs for some client to set it (E_STORE_TIMEOUT after). */
  async get(key: string, timeoutMs: number): Promise<Uint8Array> {
    if (!(timeoutMs >= 0 && timeoutMs <= MAX_TIMEOUT_MS)) throw new RangeError(`timeoutMs is ${timeoutMs}, expected a number in [0, ${MAX_TIMEOUT_MS}]`);
    const waitMs = Math.ceil(timeoutMs);
    // The server times the wait; the local timer (a little later) covers a server that stops answering.
    const c = await this.call(StoreOp.Get, [u32(waitMs), ...lengthPrefixed(keyBytes(key))], waitMs + 1000, `get('${key}')`, waitMs);
    const value = c.bytes();
    return new Uint8Array(value.buffer, value.byteOffset, value.length).slice();
  }

  /** get() decoded as UTF-8. */
  async getString(key: string, timeoutMs: number): Promise<string> {
    return Buffer.from(await this.get(key, timeoutMs)).toString('utf8');
  }

  /** Atomically adds delta to the counter at key (absent: 0) and returns the new value. */
  async add(key: string, delta: number): Promise<number> {
    if (!Number.isSafeInteger(delta)) throw new RangeError(`delta is ${delta}, expected a safe integer`);
    const d = Buffer.alloc(8);
    d.writeBigInt64LE(BigInt(delta), 0);
    const c = await this.call(StoreOp.Add, [d, ...lengthPrefixed(keyBytes(key))], this.opTimeoutMs, `add('${key}')`);
    return Number(c.i64());
  }

  /** Whether every key is set (does not wait). */
  async check(keys: string[]): Promise<boolean> {
    const parts: Buffer[] = [u32(keys.length)];
    for (const k of keys) parts.push(...lengthPrefixed(keyBytes(k)));
    const c = await this.call(StoreOp.Check, parts, this.opTimeoutMs, 'check');
    return c.u8() === 1;
  }

  /** Closes the connection; pending calls reject with E_STORE_LOST ("client closed"). */
  close(): Promise<void> {
    if (this.closing) return Promise.resolve();
    this.closing = true;
    this.rejectAll(new StoreError(`store client for ${this.address} closed`, 'E_STORE_LOST'));
    if (!this.failure) this.failure = new StoreError(`store client for ${this.address} closed`, 'E_STORE_LOST');
    return new Promise((resolve) => {
      if (this.socket.destroyed) { resolve(); return; }
      this.socket.once('close', () => resolve());
      this.socket.end();
      // A peer that does not finish the close within a second is cut off.
      setTimeout(() => this.socket.destroy(), 1000).unref();
    });
  }

  private call(op: StoreOp, fields: Buffer[], timeoutMs: number, what: string, serverWaitMs?: number): Promise<Cursor> {
    if (this.failure) return Promise.reject(new StoreError(`${what}: ${this.failure.message}`, 'E_STORE_LOST'));
    const id = this.nextId;
    this.nextId = this.nextId === 0xffffffff ? 1 : this.nextId + 1;
    return new Promise<Cursor>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new StoreError(`${what} on the store at ${this.address} timed out after ${serverWaitMs ?? timeoutMs} ms`, 'E_STORE_TIMEOUT'));
      }, timeoutMs);
      this.pending.set(id, {
        timer,
        reject: (e) => reject(new StoreError(`${what}: ${e.message}`, (e as StoreError).code ?? 'E_STORE_LOST')),
        resolve: (c) => {
          try {
            const status = c.u8();
            if (status === StoreStatus.Ok) { resolve(c); return; }
            if (status === StoreStatus.Timeout) {
              reject(new StoreError(`${what} on the store at ${this.address} timed out after ${serverWaitMs ?? timeoutMs} ms`, 'E_STORE_TIMEOUT'));
              return;
            }
            reject(new StoreError(`${what}: ${c.bytes().toString('utf8')}`, 'E_STORE'));
          } catch (e) {
            reject(new StoreError(`${what}: malformed answer from the store at ${this.address} (${(e as Error).message})`, 'E_STORE'));
          }
        },
      });
      this.socket.write(frame([Buffer.of(op), u32(id), ...fields]));
    });
  }

  private rejectAll(e: StoreError) {
    for (const p of this.pending.values()) { clearTimeout(p.timer); p.reject(e); }
    this.pending.clear();
  }

  private fail(message: string) {
    if (this.closing || this.failure) { this.rejectAll(this.failure ?? new StoreError(message, 'E_STORE_LOST')); return; }
    this.failure = new StoreError(message, 'E_STORE_LOST');
    this.socket.destroy();
    this.rejectAll(this.failure);
    this.resolveLost(this.failure);
    this.emit('lost', this.failure);
  }
}

function keyBytes(key: string): Buffer {
  const b = Buffer.from(key, 'utf8');
  if (b.length === 0 || b.length > MAX_KEY_BYTES) throw new RangeError(`key '${key.slice(0, 64)}' is ${b.length} bytes, expected 1..${MAX_KEY_BYTES}`);
  return b;
}
