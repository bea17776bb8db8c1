// A CPU emulator of the CUDA addon surface (CudaAddon): device memory in host ArrayBuffers,
// synchronous streams and events, every op reproducing its kernel's contract (native/cuda/*.cu,
// the bindings' argument checks in native/cuda/bind_cuda.cc), for GPU-less tests of the device engine.
//
// Faithful where it matters to callers: dtypes, roundings (f32 arithmetic via Math.fround and
// Float32Array stores), orderings and tie-breaks, what a kernel leaves unwritten. Stricter than a
// GPU where a GPU would fail silently or late: device data that would make a kernel read or write
// out of bounds (slots, offsets, block tables) or a misaligned typed access raise an E_CUDA
// "fault" and mark the device lost, as a sticky CUDA error would; fresh allocations are filled
// with 0xff (NaN) so that reads of memory nobody wrote show up.
import { bf16ToF32, f32ToBf16, f32ToFp8, fp8ToF32, kvDecode, kvDtypeBytes, kvEncode, type KvArray, type KvDtype } from '../../src/model/kv-dtype.js';

// The bf16 conversions are the engine's own (dtype.h's f32_to_bf16, round to nearest even).
export { f32ToBf16 };
import { loadNative } from '../../src/native/index.js';
import { deviceQuant, deviceQuantDenseError, deviceQuantError, dequantMatrixBf16, quantElement, quantMatrixBytes, type DeviceQuant } from '../../src/model/cuda-quant.js';
import type {
  CudaAddon, CudaAttentionOptions, CudaBuffer, CudaCommGroup, CudaDeviceInfo, CudaEvent, CudaExpertTable, CudaGemmTile,
  CudaFp8Path, CudaMemInfo, CudaQuantLayout, CudaRouteOptions, CudaStream, DType, DeltaRuleOptions,
} from '../../src/native/types.js';

export interface CudaEmulatorOptions {
  /** Emulated device memory (default 16 GiB): allocations beyond it fail with E_OOM. */
  totalBytes?: number;
  /** Fill fresh allocations with 0xff (NaN for f32/bf16); default true. Cached blocks keep old bytes. */
  poisonFresh?: boolean;
  /**
   * An injected sticky fault: the `calls`-th call of `op` faults (E_CUDA, the device is lost). Default
   * from EXPERTD_EMU_FAULT=op:calls (the daemon tests, through the EXPERTD_CUDA_STANDIN hook).
   */
  faultAt?: { op: string; calls: number };
  /**
   * Rank processes (the engine worker passes the group's store): the emulated NCCL unique id then
   * carries this store's address, as a real NCCL id carries rank 0's bootstrap address, and
   * cudaNcclJoin forms a Gloo group through it, so device ranks in separate processes exchange their
   * device buffers. Without it the group is the loopback one of worker threads in one process.
   */
  ncclStore?: { host: string; port: number; timeoutMs: number };
}

/** The emulated NCCL unique id of a group across processes: magic, store port, host, nonce. */
const EMU_ID_MAGIC = 'EMUGLOO\0';
function storeId(store: { host: string; port: number }): Uint8Array {
  const id = Buffer.alloc(128);
  const host = Buffer.from(store.host, 'utf8');
  if (host.length > 80) throw rangeError(`ncclStore.host is ${host.length} bytes, expected at most 80`);
  id.write(EMU_ID_MAGIC, 0, 'latin1');
  id.writeUInt16LE(store.port, 8);
  id.writeUInt16LE(host.length, 10);
  host.copy(id, 12);
  for (let i = 96; i < 128; i++) id[i] = Math.floor(Math.random() * 256);
  return new Uint8Array(id);
}
function parseStoreId(id: Uint8Array): { host: string; port: number; nonce: string } | null {
  const b = Buffer.from(id.buffer, id.byteOffset, id.length);
  if (b.toString('latin1', 0, 8) !== EMU_ID_MAGIC) return null;
  const n = b.readUInt16LE(10);
  return { port: b.readUInt16LE(8), host: b.toString('utf8', 12, 12 + n), nonce: b.toString('hex', 96, 128) };
}

function faultFromEnv(): { op: string; calls: number } | undefined {
  const m = /^(\w+):(\d+)$/.exec(process.env.EXPERTD_EMU_FAULT ?? '');
  return m ? { op: m[1]!, calls: Number(m[2]) } : undefined;
}

// ---- Gated DeltaNet (native/cuda/deltanet.cu)

/** The device's Dk bound (cuda_backend.h kDeltaMaxDk: the state slice lives in shared memory). */
const DELTA_MAX_DK = 256;
/** Shared memory the chunked kernel may use (cuda_backend.h kDeltaChunkSmemMax: under sm_89's 99 KiB). */
const DELTA_CHUNK_SMEM_MAX = 96 * 1024;

/**
 * Bytes of shared memory of deltanet.cu's chunked kernel for chunk C and key dim Dk (delta_chunk_smem_bytes):
 * K [C][Dk+1], a Q block [min(C,16)][Dk+1], A/P [C][C+1], the state tile [Dk][32], X and QS [C][32],
 * partial sums [8][32], and g, G, beta, e^G, the end decays [C].
 */
export function deltaChunkSmemBytes(C: number, Dk: number): number {
  const qr = Math.min(C, 16);
  return 4 * ((C + qr) * (Dk + 1) + C * (C + 1) + (Dk + 2 * C + 8) * 32 + 5 * C);
}

/** Whether the device runs sequences of at least `chunk` tokens chunkwise (else all by the recurrence). */
export function deltaChunked(chunk: number, Dk: number): boolean {
  return chunk >= 2 && deltaChunkSmemBytes(chunk, Dk) <= DELTA_CHUNK_SMEM_MAX;
}

/** The options object as native/addon/deltanet_args.h reads it (same checks, same messages). */
function deltaOpts(v: unknown, dkMax: number): Required<DeltaRuleOptions> {
  if (typeof v !== 'object' || v === null || Array.isArray(v) || ArrayBuffer.isView(v)) throw typeError('opts must be an object');
  const o = v as Record<string, unknown>;
  const int = (key: string, required: boolean, def: number, min: number, max: number): number => {
    const x = o[key];
    const name = `opts.${key}`;
    if (x === undefined) {
      if (required) throw typeError(`${name} must be an integer`);
      return def;
    }
    if (typeof x !== 'number' || !Number.isFinite(x) || x !== Math.floor(x)) throw typeError(`${name} must be an integer`);
    if (x < min || x > max) throw rangeError(`${name} is ${x}, expected ${min}..${max}`);
    return x;
  };
  const T = int('T', true, 0, 0, I32_MAX), Hk = int('Hk', true, 0, 1, I32_MAX), Hv = int('Hv', true, 0, 1, I32_MAX);
  const Dk = int('Dk', true, 0, 1, dkMax), Dv = int('Dv', true, 0, 1, 65536);
  if (Hv % Hk !== 0) throw rangeError(`opts.Hv is ${Hv}, expected a multiple of opts.Hk (${Hk})`);
  if (typeof o.l2normQk !== 'boolean') throw typeError('opts.l2normQk must be a boolean');
  const chunk = int('chunk', false, 64, 1, 256);
  const qk = Hk * Dk, vr = Hv * Dv;
  if (qk > I32_MAX || vr > I32_MAX) throw rangeError(`opts.Hk * opts.Dk and opts.Hv * opts.Dv must be at most ${I32_MAX}`);
  return {
    T, Hk, Hv, Dk, Dv, l2normQk: o.l2normQk, chunk,
    qStride: int('qStride', false, qk, qk, I32_MAX), kStride: int('kStride', false, qk, qk, I32_MAX),
    vStride: int('vStride', false, vr, vr, I32_MAX),
  };
}

/** A warp's butterfly sum of 32 lane partials in double (v += shfl_xor(v, o), o = 16..1). */
function warpSumF64(p: Float64Array): number {
  const n = new Float64Array(32);
  for (let o = 16; o > 0; o >>= 1) {
    for (let l = 0; l < 32; l++) n[l] = p[l]! + p[l ^ o]!;
    p.set(n);
  }
  return p[0]!;
}

/** Lane-strided sums of squares of a[at .. at+n) in double, then the butterfly. */
function sumSquaresF64(a: Float32Array, at: number, n: number, lanes: Float64Array): number {
  lanes.fill(0);
  for (let i = 0; i < n; i++) lanes[i & 31] += a[at + i]! * a[at + i]!;
  return warpSumF64(lanes);
}

// ------------------------------------------------------------------------------------ errors
type Coded = Error & { code: string };
function coded<E extends Error>(e: E, code: string): E & { code: string } {
  (e as E & { code: string }).code = code;
  return e as E & { code: string };
}
const typeError = (m: string): Coded => coded(new TypeError(m), 'E_INVALID_ARG');
const rangeError = (m: string): Coded => coded(new RangeError(m), 'E_INVALID_ARG');
const disposedError = (what: string): Coded => coded(new Error(`${what} has been disposed`), 'E_DISPOSED');

// std::to_string(double): six decimals.
/** std::to_string of a double: six decimals; inf, -inf and nan as C++ writes them. */
const cppDouble = (v: number) => (Number.isFinite(v) ? v.toFixed(6) : Number.isNaN(v) ? 'nan' : v > 0 ? 'inf' : '-inf');

function getInt(v: unknown, name: string, min: number, max: number): number {
  if (typeof v !== 'number') throw typeError(`${name} must be a number`);
  const iv = Math.trunc(v);
  if (!Number.isFinite(v) || iv !== v) throw typeError(`${name} must be an integer, got ${cppDouble(v)}`);
  if (iv < min || iv > max) throw rangeError(`${name} is ${iv}, expected ${min}..${max}`);
  return iv;
}
function getDouble(v: unknown, name: string): number {
  if (typeof v !== 'number') throw typeError(`${name} must be a number`);
  return v;
}
function getBool(v: unknown, name: string): boolean {
  if (typeof v !== 'boolean') throw typeError(`${name} must be a boolean`);
  return v;
}
const nullish = (v: unknown) => v === null || v === undefined;
function parseDtype(v: unknown, name: string): DType {
  if (typeof v !== 'string') throw typeError(`${name} must be 'f32', 'bf16' or 'f16'`);
  if (v === 'f32' || v === 'bf16' || v === 'f16') return v;
  throw typeError(`${name} is '${v}', expected 'f32', 'bf16' or 'f16'`);
}
const dtypeSize = (d: DType) => (d === 'f32' ? 4 : 2);
const I32_MAX = 2147483647;
const BYTES_MAX = 2 ** 44;

// ------------------------------------------------------------------------------------ numerics
const fr = Math.fround;
/** The CUDA side's rank_before: larger first, ties to the lower index, NaN after everything. */
function rankBefore(a: number, ia: number, b: number, ib: number): boolean {
  const na = a !== a, nb = b !== b;
  if (na || nb) return na === nb ? ia < ib : nb;
  if (a !== b) return a > b;
  return ia < ib;
}
const siluF32 = (g: number) => fr(g / fr(1 + fr(Math.exp(-g))));
/** biased_ffn.cu's clamped SwiGLU (gpt-oss), every operation one f32 rounding; alpha and limit are f32. */
const clampedSwigluF32 = (gate: number, up: number, alpha: number, limit: number) => {
  const g = Math.min(gate, limit), u = Math.min(Math.max(up, -limit), limit);
  return fr(fr(u + 1) * fr(g / fr(1 + fr(Math.exp(fr(-alpha * g))))));
};

// Grow-only scratch (no per-call allocation on hot paths).
class Scratch {
  f32 = new Float32Array(0);
  u32 = new Uint32Array(0);
  f64 = new Float64Array(0);
  /** Float32Array of n elements whose bits are reachable as u32 (bf16 decoding). */
  floats(n: number): Float32Array {
    if (this.f32.length < n) {
      this.f32 = new Float32Array(Math.max(n, 2 * this.f32.length));
      this.u32 = new Uint32Array(this.f32.buffer);
    }
    return this.f32;
  }
  doubles(n: number): Float64Array {
    if (this.f64.length < n) this.f64 = new Float64Array(Math.max(n, 2 * this.f64.length));
    return this.f64;
  }
}

// ------------------------------------------------------------------------------------ memory
interface Allocation {
  bytes: Uint8Array;   // the whole block (class bytes), byteOffset 0
  cls: number;
  refs: number;        // live handles + expert-table slots
  id: number;
}

/** 8 classes per power of two above 4 KiB, 512-byte steps below (cuda_backend.cc's size_class). */
function sizeClass(bytes: number): number {
  const kMin = 512;
  if (bytes <= kMin) return kMin;
  let step = kMin;
  if (bytes > 4096) step = Math.max(kMin, 2 ** Math.floor(Math.log2(bytes)) / 8);
  return Math.ceil(bytes / step) * step;
}

const internal = Symbol('cuda-emu internal');

/**
 * Creates a fresh emulated device (its own memory, counters and device-lost flag). Every member of
 * CudaAddon is present; NCCL members throw E_UNSUPPORTED.
 */
export function createCudaEmulator(options: CudaEmulatorOptions = {}): CudaAddon {
  const native = loadNative();
  const totalBytes = options.totalBytes ?? 16 * 2 ** 30;
  const poisonFresh = options.poisonFresh ?? true;
  const scratch = new Scratch();
  let lost = false;
  let nextId = 1;
  const freeLists = new Map<number, Uint8Array[]>();
  const stats = { allocatedBytes: 0, cachedBytes: 0, peakBytes: 0, deviceMallocs: 0, cacheHits: 0 };

  const ensureAlive = () => {
    if (lost) throw coded(new Error('the CUDA device is lost after an earlier fault (restart the process)'), 'E_CUDA');
  };
  /** A kernel touched memory it must not (a sticky error on a GPU): the device is lost. */
  const fault = (what: string): never => {
    lost = true;
    throw coded(new Error(`cudaErrorIllegalAddress (emulated: ${what}); the CUDA device is lost (restart the process)`), 'E_CUDA');
  };
  /** A kernel precondition the binding cannot check (device data): no fault on a GPU, just garbage. */
  const precondition = (what: string): never => {
    throw coded(new Error(`emulated kernel precondition violated: ${what}`), 'E_CUDA');
  };

  /**
   * The sequences of a Gated DeltaNet batch (device data): deltanet.cu traps on a slot outside the
   * pool or a sequence outside 0..T (the device is lost); distinct slots are the caller's promise
   * (a GPU would race, silently).
   */
  function deltaSeqs(slots: Int32Array, starts: Int32Array, B: number, T: number, poolSlots: number):
    { t0: number; t1: number; slot: number }[] {
    const out: { t0: number; t1: number; slot: number }[] = [];
    const seen = new Set<number>();
    for (let b = 0; b < B; b++) {
      const t0 = starts[b]!, t1 = starts[b + 1]!, slot = slots[b]!;
      if (t0 < 0 || t1 < t0 || t1 > T) fault(`seqStarts[${b}..${b + 1}] = ${t0}..${t1} reach outside tokens 0..${T}`);
      if (slot < 0 || slot >= poolSlots) fault(`slots[${b}] is ${slot}, expected 0..${poolSlots - 1}`);
      if (seen.has(slot)) precondition(`slots[${b}] is ${slot}, used by an earlier sequence (slots must be distinct)`);
      seen.add(slot);
      out.push({ t0, t1, slot });
    }
    return out;
  }

  function releaseCache() {
    for (const [cls, list] of freeLists) stats.cachedBytes -= cls * list.length;
    freeLists.clear();
  }
  function allocate(sizeBytes: number): Allocation {
    ensureAlive();
    const cls = sizeClass(sizeBytes);
    const list = freeLists.get(cls);
    if (list && list.length > 0) {
      const bytes = list.pop()!;
      stats.cachedBytes -= cls;
      stats.allocatedBytes += cls;
      stats.cacheHits++;
      return { bytes, cls, refs: 0, id: nextId++ };
    }
    if (stats.allocatedBytes + stats.cachedBytes + cls > totalBytes) releaseCache();
    if (stats.allocatedBytes + cls > totalBytes) {
      const free = totalBytes - stats.allocatedBytes - stats.cachedBytes;
      throw coded(new Error(`CUDA out of memory allocating ${sizeBytes} bytes on device 0 (${free} of ${totalBytes} bytes free)`), 'E_OOM');
    }
    let bytes: Uint8Array;
    try {
      bytes = new Uint8Array(cls);
    } catch {
      throw coded(new Error(`CUDA out of memory allocating ${sizeBytes} bytes on device 0 (host memory of the emulator)`), 'E_OOM');
    }
    if (poisonFresh) bytes.fill(0xff);
    stats.allocatedBytes += cls;
    stats.deviceMallocs++;
    stats.peakBytes = Math.max(stats.peakBytes, stats.allocatedBytes + stats.cachedBytes);
    return { bytes, cls, refs: 0, id: nextId++ };
  }
  function retain(a: Allocation) {
    a.refs++;
  }
  function release(a: Allocation) {
    if (--a.refs > 0) return;
    let list = freeLists.get(a.cls);
    if (!list) freeLists.set(a.cls, (list = []));
    list.push(a.bytes);
    stats.allocatedBytes -= a.cls;
    stats.cachedBytes += a.cls;
  }
  // A handle collected without dispose() gives its reference back (the native finalizer's job).
  const finalizer = new FinalizationRegistry<Allocation>((a) => release(a));

  // ---------------------------------------------------------------------------------- handles
  class EmuBuffer implements CudaBuffer {
    #alloc: Allocation | null;
    readonly offset: number;
    readonly sizeBytes: number;
    constructor(token: symbol, alloc: Allocation, offset: number, sizeBytes: number) {
      if (token !== internal) throw typeError('CudaBuffer cannot be constructed directly; use cudaBuffer()');
      this.#alloc = alloc;
      this.offset = offset;
      this.sizeBytes = sizeBytes;
      retain(alloc);
      finalizer.register(this, alloc, this);
    }
    get device(): number { return this.#alloc ? 0 : -1; }
    get disposed(): boolean { return this.#alloc === null; }
    /** The allocation, or E_DISPOSED naming the argument. */
    alloc(name: string): Allocation {
      if (!this.#alloc) throw disposedError(name);
      return this.#alloc;
    }
    /** The same device memory (the kernels compare pointers). */
    sameAs(o: EmuBuffer): boolean {
      return this.#alloc !== null && this.#alloc === o.#alloc && this.offset === o.offset;
    }
    view(offsetBytes: number, sizeBytes: number): CudaBuffer {
      if (!this.#alloc) throw disposedError('buffer');
      const off = getInt(offsetBytes, 'offsetBytes', 0, this.sizeBytes);
      const len = getInt(sizeBytes, 'sizeBytes', 0, this.sizeBytes - off);
      return new EmuBuffer(internal, this.#alloc, this.offset + off, len);
    }
    dispose(): void {
      if (!this.#alloc) return;
      finalizer.unregister(this);
      const a = this.#alloc;
      this.#alloc = null;
      release(a);  // the block returns to the cache when its last view goes
    }
  }

  class EmuStream implements CudaStream {
    #disposed = false;
    constructor(priority?: number) {
      if (!nullish(priority)) getInt(priority, 'priority', -1000, 1000);
      ensureAlive();
    }
    get disposed(): boolean { return this.#disposed; }
    check(): void {
      if (this.#disposed) throw disposedError('stream');
    }
    synchronize(): void {
      this.check();
      ensureAlive();
    }
    query(): boolean {
      this.check();
      ensureAlive();
      return true;  // every op ran to completion when it was enqueued
    }
    waitEvent(event: CudaEvent): void {
      if (!(event instanceof EmuEvent)) throw typeError('event must be a CudaEvent');
      event.check();
      this.check();
    }
    dispose(): void {
      this.#disposed = true;
    }
  }

  class EmuEvent implements CudaEvent {
    #disposed = false;
    readonly timing: boolean;
    recordedAt: number | null = null;
    constructor(timing?: boolean) {
      this.timing = !nullish(timing) && getBool(timing, 'timing');
      ensureAlive();
    }
    check(): void {
      if (this.#disposed) throw disposedError('event');
    }
    record(stream?: CudaStream | null): void {
      getStream(stream);
      this.check();
      this.recordedAt = performance.now();
    }
    synchronize(): void {
      this.check();
      ensureAlive();
    }
    query(): boolean {
      this.check();
      return true;
    }
    elapsedMs(start: CudaEvent): number {
      if (!(start instanceof EmuEvent)) throw typeError('start must be a CudaEvent');
      start.check();
      this.check();
      if (!start.timing || !this.timing || start.recordedAt === null || this.recordedAt === null)
        throw coded(new Error('cudaErrorInvalidResourceHandle (emulated: elapsedMs needs two recorded timing events)'), 'E_CUDA');
      return this.recordedAt - start.recordedAt;
    }
    dispose(): void {
      this.#disposed = true;
    }
  }

  interface Slot { alloc: Allocation; offset: number }
  // A table collected without dispose() lets go of its slots (the native destructor's job).
  const tableFinalizer = new FinalizationRegistry<(Slot | null)[][]>((lists) => {
    for (const list of lists) for (const slot of list) if (slot) release(slot.alloc);
  });
  class EmuExpertTable implements CudaExpertTable {
    readonly numExperts: number;
    readonly hidden: number;
    readonly inter: number;
    #disposed = false;
    gateUp: (Slot | null)[];
    down: (Slot | null)[];
    /** The quantization (native/include/expertd/cuda_quant.h's layout), or null for bf16. */
    readonly q: DeviceQuant | null;
    constructor(numExperts: number, hidden: number, inter: number, quant?: CudaQuantLayout | null) {
      this.numExperts = getInt(numExperts, 'numExperts', 1, 1024);
      this.hidden = getInt(hidden, 'hidden', 8, 1 << 20);
      this.inter = getInt(inter, 'inter', 8, 1 << 20);
      if (this.hidden % 8 || this.inter % 8) throw rangeError('hidden and inter must be multiples of 8');
      this.q = quantLayoutArg(quant, this.hidden, this.inter);
      this.gateUp = new Array<Slot | null>(this.numExperts).fill(null);
      this.down = new Array<Slot | null>(this.numExperts).fill(null);
      tableFinalizer.register(this, [this.gateUp, this.down], this);
    }
    get quant(): CudaQuantLayout | null {
      const q = this.q;
      if (!q) return null;
      return q.format === 'fp8' ? { format: q.format, group: q.group, blockRows: q.blockRows }
        : { format: q.format, group: q.group, ...(q.zeros ? { zeros: true } : {}) };
    }
    check(): void {
      if (this.#disposed) throw disposedError('expert table');
    }
    #expert(e: number): number {
      this.check();
      return getInt(e, 'expert', 0, this.numExperts - 1);
    }
    #drop(e: number) {
      if (this.gateUp[e]) release(this.gateUp[e]!.alloc);
      if (this.down[e]) release(this.down[e]!.alloc);
      this.gateUp[e] = this.down[e] = null;
    }
    set(expert: number, gateUp: CudaBuffer, down: CudaBuffer): void {
      const e = this.#expert(expert);
      // The binding checks sizes and 16-byte alignment only: contents are the caller's (bf16, or
      // the quantized layout's codes and scales).
      const H = this.hidden, I = this.inter;
      const gu = buf(gateUp, 'gateUp', this.q ? quantMatrixBytes(this.q, 2 * I, H, true).totalBytes : 2 * I * H * 2);
      const dn = buf(down, 'down', this.q ? quantMatrixBytes(this.q, H, I, false).totalBytes : H * I * 2);
      if ((gu.offset | dn.offset) % 16) throw rangeError('gateUp and down must start 16-byte aligned');
      const guA = gu.alloc('gateUp'), dnA = dn.alloc('down');
      retain(guA);
      retain(dnA);
      this.#drop(e);
      this.gateUp[e] = { alloc: guA, offset: gu.offset };
      this.down[e] = { alloc: dnA, offset: dn.offset };
    }
    clear(expert: number): void {
      this.#drop(this.#expert(expert));
    }
    has(expert: number): boolean {
      return this.gateUp[this.#expert(expert)] !== null;
    }
    dispose(): void {
      if (this.#disposed) return;
      tableFinalizer.unregister(this);
      for (let e = 0; e < this.numExperts; e++) this.#drop(e);
      this.#disposed = true;
    }
  }

  // ---------------------------------------------------------------------------------- argument helpers
  /** The binding's parse_quant_layout: { format, group?, blockRows? } or null, checked for the shape. */
  function quantLayoutArg(v: unknown, hidden: number, inter: number): DeviceQuant | null {
    if (nullish(v)) return null;
    if (typeof v !== 'object') throw typeError('quant must be an object or null');
    const o = v as Record<string, unknown>;
    const f = o['format'];
    if (f !== 'int8' && f !== 'int4' && f !== 'fp8' && f !== 'mxfp4')
      throw typeError("quant.format must be 'int8', 'int4', 'fp8' or 'mxfp4'");
    const field = (name: string): number | undefined => {
      const x = o[name];
      if (nullish(x)) return undefined;
      if (!(typeof x === 'number' && Number.isInteger(x) && x >= 0 && x <= 1 << 20))
        throw rangeError(`quant.${name} must be an integer 0..${1 << 20}`);
      return x;
    };
    const z = o['zeros'];
    if (!nullish(z) && typeof z !== 'boolean') throw typeError('quant.zeros must be a boolean');
    const q = deviceQuant({
      format: f, ...(f !== 'int8' ? { group: field('group') ?? (f === 'int4' ? 0 : undefined) } : {}),
      ...(f === 'fp8' ? { blockRows: field('blockRows') } : {}), ...(z === true ? { zeros: true } : {}),
    } as CudaQuantLayout);
    const why = deviceQuantError(q, hidden, inter);
    if (why) throw rangeError(why);
    return q;
  }
  function unwrap(v: unknown, name: string): EmuBuffer {
    if (!(v instanceof EmuBuffer)) throw typeError(`${name} must be a CudaBuffer`);
    return v;
  }
  /** A live buffer of at least needBytes (the binding's get_buf). */
  function buf(v: unknown, name: string, needBytes: number): EmuBuffer {
    const b = unwrap(v, name);
    b.alloc(name);
    if (b.sizeBytes < needBytes) throw rangeError(`${name}.sizeBytes is ${b.sizeBytes}, expected at least ${needBytes}`);
    return b;
  }
  function optBuf(v: unknown, name: string, needBytes: number): EmuBuffer | null {
    return nullish(v) ? null : buf(v, name, needBytes);
  }
  /** buf whose start must be `align`-byte aligned (the binding's get_aligned_buf). */
  function alignedBuf(v: unknown, name: string, needBytes: number, align: number): EmuBuffer {
    const b = buf(v, name, needBytes);
    if (b.offset % align) throw rangeError(`${name} must start ${align}-byte aligned`);
    return b;
  }
  function getStream(v: unknown): void {
    if (nullish(v)) return;
    if (!(v instanceof EmuStream)) throw typeError('stream must be a CudaStream or null');
    v.check();
  }
  const dim = (v: unknown, name: string, min = 0, max = I32_MAX) => getInt(v, name, min, max);

  // Typed views on device memory: the whole handle's range from byte `at`; a misaligned one faults.
  function bytesOf(b: EmuBuffer): Uint8Array {
    const a = b.alloc('buffer');
    return a.bytes.subarray(b.offset, b.offset + b.sizeBytes);
  }
  function f32Of(b: EmuBuffer, name: string): Float32Array {
    const a = b.alloc(name);
    if (b.offset % 4) fault(`misaligned f32 access to ${name} at byte offset ${b.offset}`);
    return new Float32Array(a.bytes.buffer, b.offset, Math.floor(b.sizeBytes / 4));
  }
  function i32Of(b: EmuBuffer, name: string): Int32Array {
    const a = b.alloc(name);
    if (b.offset % 4) fault(`misaligned i32 access to ${name} at byte offset ${b.offset}`);
    return new Int32Array(a.bytes.buffer, b.offset, Math.floor(b.sizeBytes / 4));
  }
  function u16Of(b: EmuBuffer, name: string): Uint16Array {
    const a = b.alloc(name);
    if (b.offset % 2) fault(`misaligned 16-bit access to ${name} at byte offset ${b.offset}`);
    return new Uint16Array(a.bytes.buffer, b.offset, Math.floor(b.sizeBytes / 2));
  }
  /** The KV cache element type argument of the binding (f32 when absent). */
  function kvDtypeArg(v: unknown, name: string): KvDtype {
    if (nullish(v)) return 'f32';
    if (v === 'f32' || v === 'bf16' || v === 'fp8') return v;
    throw typeError(`${name} must be 'f32', 'bf16' or 'fp8'`);
  }
  /** std::to_string(float) of the binding's messages. */
  function cppFloat(x: number): string {
    return Number.isNaN(x) ? 'nan' : !Number.isFinite(x) ? (x > 0 ? 'inf' : '-inf') : x.toFixed(6);
  }
  /** fp8 scales as the binding checks them: host Float32Array [kvHeads], finite and > 0. */
  function kvScalesArg(v: unknown, name: string, kvHeads: number): Float32Array {
    if (!(v instanceof Float32Array)) throw typeError(`${name} must be a Float32Array [kvHeads] for an fp8 cache`);
    if (kvHeads > 256) throw rangeError(`kvHeads is ${kvHeads}, expected at most 256 for an fp8 cache`);
    if (v.length < kvHeads) throw rangeError(`${name}.length is ${v.length}, expected at least kvHeads = ${kvHeads}`);
    for (let h = 0; h < kvHeads; h++)
      if (!(Number.isFinite(v[h]) && v[h]! > 0)) throw rangeError(`${name}[${h}] is ${cppFloat(v[h]!)}, expected a finite number > 0`);
    return v.slice(0, kvHeads);
  }
  function kvArrayOf(b: EmuBuffer, dt: KvDtype, name: string): KvArray {
    if (dt === 'f32') return f32Of(b, name);
    if (dt === 'bf16') return u16Of(b, name);
    return bytesOf(b);
  }
  /** A cache [slots, kvHeads, width] as the f32 values it holds (e4m3 x scale of its head). */
  function dequantCache(c: KvArray, dt: KvDtype, scales: Float32Array | null, kvHeads: number, width: number): ArrayLike<number> {
    if (dt === 'f32') return c;
    const out = new Float32Array(c.length);
    for (let i = 0; i < c.length; i++) out[i] = kvDecode(dt, c[i]!, scales?.[Math.floor(i / width) % kvHeads] ?? 1);
    return out;
  }
  function slotU16(s: Slot, n: number): Uint16Array {
    return new Uint16Array(s.alloc.bytes.buffer, s.offset, n);
  }
  function hostBytes(v: unknown, name: string): Uint8Array {
    if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
    if (v instanceof ArrayBuffer) return new Uint8Array(v);
    throw typeError(`${name} must be a TypedArray or ArrayBuffer`);
  }
  /** bf16 [n] -> f32 scratch region [at, at + n) (exact: the bits shifted into place). */
  function widenBf16(src: Uint16Array, n: number, dst: Float32Array, at: number) {
    const u = scratch.u32;
    if (dst !== scratch.f32) throw new Error('widenBf16 writes the scratch only');
    for (let i = 0; i < n; i++) u[at + i] = src[i]! << 16;
  }

  // ---------------------------------------------------------------------------------- GEMM cores
  // y[r, o] for rows of x (f32 values, row stride k) against w (f32 values [n, k]).
  // y[M, N] (+)= x[M, K] (bf16) * W^T over W widened at f[wAt..] (row-major [N, K]), with x's
  // rows widened into f[xAt..]: the epilogue order of group_gemm.cu and dense_gemm_quant,
  // (acc + bias) + old y, each an f32 add.
  function denseRowsEpilogue(xb: EmuBuffer, yb: EmuBuffer, bb: EmuBuffer | null, acc: boolean, M: number, N: number, K: number,
      f: Float32Array, wAt: number, xAt: number): void {
    const xs = u16Of(xb, 'x'), ys = f32Of(yb, 'y'), bs = bb ? f32Of(bb, 'bias') : null;
    for (let r = 0; r < M; r++) {
      widenBf16(xs.subarray(r * K, r * K + K), K, f, xAt);
      for (let o = 0; o < N; o++) {
        let v = fr(dotRows(f, xAt, f, wAt + o * K, K));
        if (bs) v = fr(v + bs[o]!);
        if (acc) v = fr(v + ys[r * N + o]!);
        ys[r * N + o] = v;
      }
    }
  }

  // One expert's gate_up [2I, H] and down [H, I] as f32 at f[guAt..] and f[dnAt..]: bf16 widened,
  // or quantized codes dequantised to bf16(f32(code x scale)) as group_gemm_quant.cu does.
  function expertToF32(q: DeviceQuant | null | undefined, gu: Slot, dn: Slot, H: number, I: number,
      f: Float32Array, guAt: number, dnAt: number): void {
    if (q) {
      const guB = quantMatrixBytes(q, 2 * I, H, true).totalBytes, dnB = quantMatrixBytes(q, H, I, false).totalBytes;
      dequantMatrixBf16(q, gu.alloc.bytes.subarray(gu.offset, gu.offset + guB), 2 * I, H, true, f.subarray(guAt, guAt + 2 * I * H));
      dequantMatrixBf16(q, dn.alloc.bytes.subarray(dn.offset, dn.offset + dnB), H, I, false, f.subarray(dnAt, dnAt + H * I));
    } else {
      widenBf16(slotU16(gu, 2 * I * H), 2 * I * H, f, guAt);
      widenBf16(slotU16(dn, H * I), H * I, f, dnAt);
    }
  }

  function dotRows(x: Float32Array, xAt: number, w: Float32Array, wAt: number, k: number): number {
    let s = 0;
    for (let i = 0; i < k; i++) s += x[xAt + i]! * w[wAt + i]!;
    return s;
  }

  // ---------------------------------------------------------------------------------- the addon
  const addon: CudaAddon = {
    CudaBuffer: EmuBuffer,
    CudaStream: EmuStream,
    CudaEvent: EmuEvent,
    CudaExpertTable: EmuExpertTable,

    cudaDeviceCount: () => 1,
    cudaDeviceInfo(device: number): CudaDeviceInfo {
      getInt(device, 'device', 0, 0);
      return {
        name: 'expertd CUDA emulator (CPU)', computeCapability: '9.0', smCount: 132, totalBytes,
        l2Bytes: 50 * 2 ** 20, sharedMemPerBlockOptinBytes: 232448,
      };
    },
    cudaSetDevice(device: number): void {
      const d = getInt(device, 'device', 0, 1023);
      if (d !== 0) throw coded(new Error(`cudaErrorInvalidDevice (invalid device ordinal) in cudaSetDevice(${d}) (emulated: one device)`), 'E_CUDA');
    },
    cudaDeviceLost: () => lost,
    cudaSynchronize(): void {
      ensureAlive();
    },
    cudaMemInfo(): CudaMemInfo {
      return {
        freeBytes: totalBytes - stats.allocatedBytes - stats.cachedBytes, totalBytes,
        allocatedBytes: stats.allocatedBytes, cachedBytes: stats.cachedBytes, peakBytes: stats.peakBytes,
        deviceMallocs: stats.deviceMallocs, cacheHits: stats.cacheHits,
      };
    },
    cudaEmptyCache(): void {
      releaseCache();
    },
    cudaBuffer(sizeBytes: number, stream?: CudaStream | null): CudaBuffer {
      const size = getInt(sizeBytes, 'sizeBytes', 0, BYTES_MAX);
      getStream(stream);
      return new EmuBuffer(internal, allocate(size), 0, size);
    },
    cudaPinnedBuffer(sizeBytes: number): ArrayBuffer {
      const size = getInt(sizeBytes, 'sizeBytes', 0, BYTES_MAX);
      ensureAlive();
      return new ArrayBuffer(size);
    },
    cudaCopyToDevice(dst, dstOffsetBytes, src, stream): void {
      const s = hostBytes(src, 'src');
      const d = unwrap(dst, 'dst');
      const off = getInt(dstOffsetBytes, 'dstOffsetBytes', 0, d.sizeBytes);
      buf(dst, 'dst', off + s.byteLength);
      getStream(stream);
      ensureAlive();
      bytesOf(d).set(s, off);
    },
    cudaCopyToHost(dst, src, srcOffsetBytes, stream): void {
      const h = hostBytes(dst, 'dst');
      const sb = unwrap(src, 'src');
      const off = getInt(srcOffsetBytes, 'srcOffsetBytes', 0, sb.sizeBytes);
      buf(src, 'src', off + h.byteLength);
      getStream(stream);
      ensureAlive();
      h.set(bytesOf(sb).subarray(off, off + h.byteLength));
    },
    cudaCopyDevice(dst, dstOffsetBytes, src, srcOffsetBytes, sizeBytes, stream): void {
      const doff = getInt(dstOffsetBytes, 'dstOffsetBytes', 0, BYTES_MAX);
      const soff = getInt(srcOffsetBytes, 'srcOffsetBytes', 0, BYTES_MAX);
      const n = getInt(sizeBytes, 'sizeBytes', 0, BYTES_MAX);
      const d = buf(dst, 'dst', doff + n), s = buf(src, 'src', soff + n);
      getStream(stream);
      ensureAlive();
      // NOTE: set() on the same ArrayBuffer copies as if through a temporary (memmove semantics).
      bytesOf(d).set(bytesOf(s).subarray(soff, soff + n), doff);
    },
    cudaFill(dst, byteValue, stream): void {
      const d = unwrap(dst, 'dst');
      d.alloc('dst');
      const v = getInt(byteValue, 'byteValue', 0, 255);
      getStream(stream);
      ensureAlive();
      bytesOf(d).fill(v);
    },
    cudaCublasLt: () => null,
    cudaLibraries: () => ({ cublasLt: { path: null, tried: [] }, nccl: { path: null, tried: [] } }),
    // The emulator runs every tile as the same f32 arithmetic; it has no sm_90a kernel.
    cudaGemmPaths: () => ({ sm90: 'unavailable', reason: 'the CPU emulator has no sm_90a kernel' }),
    cudaSm90SelfCheck: () => ({ sm90: 'unavailable', reason: 'the CPU emulator has no sm_90a kernel' }),

    cudaConvert(src, srcDtype, dst, dstDtype, n, stream): void {
      const sd = parseDtype(srcDtype, 'srcDtype'), dd = parseDtype(dstDtype, 'dstDtype');
      const count = getInt(n, 'n', 0, 2 ** 42);
      const s = buf(src, 'src', count * dtypeSize(sd)), d = buf(dst, 'dst', count * dtypeSize(dd));
      getStream(stream);
      ensureAlive();
      if (count === 0) return;
      // dtype.h's conversions are the CUDA kernel's, bit for bit (non-NaN values; NaN stays NaN).
      const sv = sd === 'f32' ? f32Of(s, 'src').subarray(0, count) : u16Of(s, 'src').subarray(0, count);
      const dv = dd === 'f32' ? f32Of(d, 'dst').subarray(0, count) : u16Of(d, 'dst').subarray(0, count);
      native.convert(sv, sd, dv, dd);
    },

    cudaGroupGemmFfn(x, offsets, experts, rows, hScratch, y, opts, stream): void {
      if (!(experts instanceof EmuExpertTable)) throw typeError('experts must be a CudaExpertTable');
      const E = experts.numExperts, H = experts.hidden, I = experts.inter;
      const R = dim(rows, 'rows', 0, 1 << 28);
      const tile = parseTile(opts);
      // x and hScratch (the down pass's x) are read in 16-byte cp.async chunks, y as float2.
      const xb = alignedBuf(x, 'x', R * H * 2, 16);
      const ob = alignedBuf(offsets, 'offsets', (E + 1) * 4, 4);
      const hb = alignedBuf(hScratch, 'hScratch', R * I * 2, 16);
      const yb = alignedBuf(y, 'y', R * H * 4, 8);
      getStream(stream);
      experts.check();
      ensureAlive();
      const q = experts.q;
      const fp8Path = parseFp8Path(opts);
      if (fp8Path === 'act' && !q) throw rangeError("opts.fp8Path 'act' needs an fp8 table; this one holds bf16 experts");
      if (q && tile.startsWith('sm90')) {
        throw coded(new Error(`group_gemm: tile '${tile}' runs bf16 experts only; this table holds ${q.format} experts`),
          'E_INVALID_ARG');
      }
      if (tile.startsWith('sm90')) {
        throw coded(new Error(`group_gemm: tile '${tile}' is unavailable here: the CPU emulator has no sm_90a kernel`),
          'E_INVALID_ARG');
      }
      const fp8Table = q?.format === 'fp8' && q.group === 128;
      if (fp8Path === 'act' && !fp8Table) {
        throw coded(new Error('group_gemm_quant: FP8 activations need an fp8 table with 128-column blocks; this one is ' +
          `${q!.format} with groups of ${q!.group}`), 'E_INVALID_ARG');
      }
      // The emulated device is sm_90: the FP8-activation kernels are available.
      const act = fp8Path === 'act' || (fp8Path === 'auto' && fp8Table && process.env.EXPERTD_FP8_ACT === '1');
      if (R <= 0) return;
      const off = i32Of(ob, 'offsets'), xs = u16Of(xb, 'x'), hs = u16Of(hb, 'hScratch'), ys = f32Of(yb, 'y');
      if (act) {
        const xr = new Float32Array(H), hr = new Float32Array(I), g = new Float64Array(2 * I), yo = new Float64Array(H);
        for (let e = 0; e < E; e++) {
          const beg = off[e]!, cnt = off[e + 1]! - beg;
          const gu = experts.gateUp[e], dn = experts.down[e];
          if (cnt <= 0 || !gu || !dn) continue;
          if (beg < 0 || beg + cnt > R) fault(`offsets[${e}..${e + 1}] = ${beg}..${beg + cnt} reach outside rows 0..${R}`);
          const guW = gu.alloc.bytes.subarray(gu.offset), dnW = dn.alloc.bytes.subarray(dn.offset);
          for (let r = beg; r < beg + cnt; r++) {
            for (let c = 0; c < H; c++) xr[c] = bf16ToF32(xs[r * H + c]!);
            fp8ActRow(q!, guW, 2 * I, H, true, xr, g);
            for (let i = 0; i < I; i++) hs[r * I + i] = f32ToBf16(fr(siluF32(g[i]!) * g[I + i]!));
            for (let i = 0; i < I; i++) hr[i] = bf16ToF32(hs[r * I + i]!);
            fp8ActRow(q!, dnW, H, I, false, hr, yo);
            for (let o = 0; o < H; o++) ys[r * H + o] = yo[o]!;
          }
        }
        return;
      }
      // Scratch layout: [gate_up 2I*H | down H*I | x row H | h row I] as f32.
      const f = scratch.floats(3 * I * H + H + I);
      const guAt = 0, dnAt = 2 * I * H, xAt = 3 * I * H, hAt = xAt + H;
      for (let e = 0; e < E; e++) {
        const beg = off[e]!, cnt = off[e + 1]! - beg;
        if (cnt <= 0) continue;
        const gu = experts.gateUp[e], dn = experts.down[e];
        // NOTE: the contract of an empty slot (group_gemm.cu's `W == nullptr` return): an expert
        // with rows but no weights is skipped by both passes, its rows of hScratch and y left as
        // they were. Rows past offsets[E] belong to no expert of the table and are not touched
        // either (the device engine's identity experts, filled by cudaCopyRowRange).
        if (!gu || !dn) continue;
        if (beg < 0 || beg + cnt > R) fault(`offsets[${e}..${e + 1}] = ${beg}..${beg + cnt} reach outside rows 0..${R}`);
        // group_gemm_quant.cu: every weight dequantised to bf16(f32(code x scale)), then the bf16
        // GroupGemm's contract.
        expertToF32(q, gu, dn, H, I, f, guAt, dnAt);
        for (let r = beg; r < beg + cnt; r++) {
          widenBf16(xs.subarray(r * H, r * H + H), H, f, xAt);
          // Gate/up pass: f32 accumulators, SiLU(gate)*up in f32, stored as bf16.
          for (let i = 0; i < I; i++) {
            const g = fr(dotRows(f, xAt, f, guAt + i * H, H));
            const u = fr(dotRows(f, xAt, f, guAt + (I + i) * H, H));
            const hv = f32ToBf16(fr(siluF32(g) * u));
            hs[r * I + i] = hv;
          }
          // Down pass reads h back from hScratch (as the second launch does).
          widenBf16(hs.subarray(r * I, r * I + I), I, f, hAt);
          for (let o = 0; o < H; o++) ys[r * H + o] = dotRows(f, hAt, f, dnAt + o * I, I);
        }
      }
    },

    cudaQuantPaths: () => ({ fp8Act: true }),
    cudaGroupGemmBiasedFfn(x, offsets, experts, rows, guScratch, hScratch, y, opts, stream): void {
      if (!(experts instanceof EmuExpertTable)) throw typeError('experts must be a CudaExpertTable');
      const E = experts.numExperts, H = experts.hidden, I = experts.inter;
      const R = dim(rows, 'rows', 0, 1 << 28);
      if (typeof opts !== 'object' || opts === null) throw typeError('opts must be an object');
      const o = opts as Record<string, unknown>;
      const num = (key: string): number => {
        const v = o[key];
        if (typeof v !== 'number') throw typeError(`opts.${key} must be a number`);
        if (!(v > 0) || !Number.isFinite(v)) throw rangeError(`opts.${key} is ${cppDouble(v)}, expected a positive number`);
        return fr(v);
      };
      const alpha = num('alpha'), limit = num('limit');
      getStream(stream);
      const xb = alignedBuf(x, 'x', R * H * 2, 16);
      const ob = alignedBuf(offsets, 'offsets', (E + 1) * 4, 4);
      const gb = alignedBuf(guScratch, 'guScratch', R * 2 * I * 4, 8);
      const hb = alignedBuf(hScratch, 'hScratch', R * I * 2, 16);
      const yb = alignedBuf(y, 'y', R * H * 4, 8);
      const gub = nullish(o.gateUpBias) ? null : alignedBuf(o.gateUpBias, 'opts.gateUpBias', E * 2 * I * 4, 4);
      const dbb = nullish(o.downBias) ? null : alignedBuf(o.downBias, 'opts.downBias', E * H * 4, 4);
      if (!gub || !dbb) throw typeError('opts.gateUpBias and opts.downBias must be CudaBuffers');
      experts.check();
      ensureAlive();
      if (R <= 0) return;
      const off = i32Of(ob, 'offsets'), xs = u16Of(xb, 'x'), gus = f32Of(gb, 'guScratch'), hs = u16Of(hb, 'hScratch');
      const ys = f32Of(yb, 'y'), gbias = f32Of(gub, 'opts.gateUpBias'), dbias = f32Of(dbb, 'opts.downBias');
      const f = scratch.floats(3 * I * H + H + I);
      const guAt = 0, dnAt = 2 * I * H, xAt = 3 * I * H, hAt = xAt + H;
      for (let e = 0; e < E; e++) {
        const beg = off[e]!, cnt = off[e + 1]! - beg;
        if (cnt <= 0) continue;
        const gu = experts.gateUp[e], dn = experts.down[e];
        // NOTE: the empty-slot contract of cudaGroupGemmFfn (group_gemm.cu and biased_ffn.cu skip it).
        if (!gu || !dn) continue;
        if (beg < 0 || beg + cnt > R) fault(`offsets[${e}..${e + 1}] = ${beg}..${beg + cnt} reach outside rows 0..${R}`);
        // group_gemm_quant.cu's plain passes likewise.
        expertToF32(experts.q, gu, dn, H, I, f, guAt, dnAt);
        for (let r = beg; r < beg + cnt; r++) {
          widenBf16(xs.subarray(r * H, r * H + H), H, f, xAt);
          // Plain gate/up pass: f32 stores; then the bias (one f32 add) and the activation, stored bf16.
          for (let c = 0; c < 2 * I; c++) gus[r * 2 * I + c] = dotRows(f, xAt, f, guAt + c * H, H);
          for (let i = 0; i < I; i++) {
            const g = fr(gus[r * 2 * I + i]! + gbias[e * 2 * I + i]!);
            const u = fr(gus[r * 2 * I + I + i]! + gbias[e * 2 * I + I + i]!);
            hs[r * I + i] = f32ToBf16(clampedSwigluF32(g, u, alpha, limit));
          }
          widenBf16(hs.subarray(r * I, r * I + I), I, f, hAt);
          // Plain down pass (f32 store), then the bias kernel's f32 add.
          for (let o2 = 0; o2 < H; o2++) ys[r * H + o2] = fr(fr(dotRows(f, hAt, f, dnAt + o2 * I, I)) + dbias[e * H + o2]!);
        }
      }
    },

    cudaDenseGemm(x, m, w, n, k, y, bias, accumulate, backend, stream) {
      const M = dim(m, 'm'), N = dim(n, 'n', 8), K = dim(k, 'k', 8);
      if (N % 8 || K % 8) throw rangeError(`n and k must be multiples of 8 (n is ${N}, k is ${K})`);
      // 16 bytes for every operand (cp.async chunks, float2 stores, cuBLASLt's alignment floor).
      const xb = alignedBuf(x, 'x', M * K * 2, 16), wb = alignedBuf(w, 'w', N * K * 2, 16);
      const yb = alignedBuf(y, 'y', M * N * 4, 16);
      const bb = nullish(bias) ? null : alignedBuf(bias, 'bias', N * 4, 16);
      const acc = getBool(accumulate, 'accumulate');
      let be: 'auto' | 'cublaslt' | 'kernel' = 'auto';
      if (!nullish(backend)) {
        if (backend !== 'auto' && backend !== 'cublaslt' && backend !== 'kernel')
          throw typeError("backend must be 'auto', 'cublaslt' or 'kernel'");
        be = backend;
      }
      getStream(stream);
      ensureAlive();
      if (M <= 0) return be === 'cublaslt' ? 'cublaslt' : 'kernel';
      if (be === 'cublaslt')
        throw coded(new Error('cuBLASLt was requested but libcublasLt.so.13/.12 could not be loaded ' +
          '(install the CUDA math libraries or set EXPERTD_CUBLASLT_SO)'), 'E_CUDA');
      const f = scratch.floats(N * K + K);
      const wAt = 0, xAt = N * K;
      widenBf16(u16Of(wb, 'w'), N * K, f, wAt);
      denseRowsEpilogue(xb, yb, bb, acc, M, N, K, f, wAt, xAt);
      return 'kernel';
    },

    cudaDenseGemmQuant(x, m, w, n, k, quant, y, bias, accumulate, stream): void {
      const M = dim(m, 'm'), N = dim(n, 'n', 2), K = dim(k, 'k', 16);
      if (nullish(quant)) throw typeError('quant must be an object');
      // The binding parses the format with its defaults, then checks it for a plain GEMM's shape.
      const q = quantLayoutArg(quant, 32, 32)!;
      const why = deviceQuantDenseError(q, N, K);
      if (why) throw rangeError(why);
      const wBytes = quantMatrixBytes(q, N, K, false).totalBytes;
      const xb = alignedBuf(x, 'x', M * K * 2, 16), wb = alignedBuf(w, 'w', wBytes, 16);
      const yb = alignedBuf(y, 'y', M * N * 4, 8);
      const bb = nullish(bias) ? null : alignedBuf(bias, 'bias', N * 4, 4);
      const acc = getBool(accumulate, 'accumulate');
      getStream(stream);
      ensureAlive();
      if (M <= 0) return;
      const f = scratch.floats(N * K + K);
      const wAt = 0, xAt = N * K;
      // group_gemm_quant.cu's dequant: bf16(f32(code x scale)), then f32 accumulation.
      const wa = wb.alloc('w');
      dequantMatrixBf16(q, wa.bytes.subarray(wb.offset, wb.offset + wBytes), N, K, false, f.subarray(wAt, wAt + N * K));
      denseRowsEpilogue(xb, yb, bb, acc, M, N, K, f, wAt, xAt);
    },

    cudaRoute(logits, t, e, k, opts, ids, weights, counts, stream): void {
      const T = dim(t, 't'), E = dim(e, 'e', 1, 1024), K = dim(k, 'k', 1, E);
      if (typeof opts !== 'object' || opts === null) throw typeError('opts must be an object');
      const o = opts as CudaRouteOptions & Record<string, unknown>;
      if (o.scoring !== 'softmax' && o.scoring !== 'sigmoid') throw typeError("opts.scoring must be 'softmax' or 'sigmoid'");
      const optInt = (key: string, def: number) => {
        const v = o[key];
        if (nullish(v)) return def;
        if (typeof v !== 'number') throw typeError(`opts.${key} must be a number`);
        return v | 0;
      };
      const nGroup = optInt('nGroup', 1);
      const topkGroup = optInt('topkGroup', nGroup);
      if (nGroup < 1 || E % nGroup) throw rangeError(`opts.nGroup is ${nGroup}, expected a divisor of e`);
      if (topkGroup < 1 || topkGroup > nGroup) throw rangeError(`opts.topkGroup is ${topkGroup}, expected 1..${nGroup}`);
      const gs = typeof o.groupScore === 'string' ? o.groupScore : 'max';
      if (gs !== 'max' && gs !== 'top2sum') throw typeError("opts.groupScore must be 'max' or 'top2sum'");
      const top2 = gs === 'top2sum';
      if (top2 && nGroup > 1 && E / nGroup < 2) throw rangeError("opts.groupScore 'top2sum' needs at least 2 experts per group");
      if (nGroup > 1 && K > topkGroup * (E / nGroup))
        throw rangeError(`k is ${K}, expected at most topkGroup * e / nGroup = ${topkGroup * (E / nGroup)}`);
      const renorm = o.renormalize === true;
      const scale = typeof o.scale === 'number' ? fr(o.scale) : 1;
      let biasV: Float32Array | null = null;
      if (!nullish(o.bias)) {
        if (!(o.bias instanceof EmuBuffer)) throw typeError('opts.bias must be a CudaBuffer or null');
        if (o.bias.sizeBytes < E * 4) throw rangeError(`opts.bias.sizeBytes is ${o.bias.sizeBytes}, expected at least ${E * 4}`);
        o.bias.alloc('opts.bias');
        biasV = f32Of(o.bias, 'opts.bias');
      }
      const lb = buf(logits, 'logits', T * E * 4), ib = buf(ids, 'ids', T * K * 4);
      const wb = buf(weights, 'weights', T * K * 4), cb = buf(counts, 'counts', E * 4);
      getStream(stream);
      ensureAlive();
      const cnt = i32Of(cb, 'counts');
      cnt.fill(0, 0, E);
      if (T <= 0) return;
      const lg = f32Of(lb, 'logits'), idOut = i32Of(ib, 'ids'), wOut = f32Of(wb, 'weights');
      const f = scratch.floats(3 * E + nGroup);
      const scoreAt = 0, choiceAt = E, excludedAt = 2 * E, groupAt = 3 * E;
      const gsz = E / nGroup;
      for (let tok = 0; tok < T; tok++) {
        const l0 = tok * E;
        if (o.scoring === 'softmax') {
          let mx = -Infinity;
          for (let i = 0; i < E; i++) if (lg[l0 + i]! > mx) mx = lg[l0 + i]!;  // fmaxf: NaN ignored
          let sum = 0;
          for (let i = 0; i < E; i++) {
            const v = fr(Math.exp(fr(lg[l0 + i]! - mx)));
            f[scoreAt + i] = v;
            sum += v;  // double
          }
          const inv = fr(1 / sum);
          for (let i = 0; i < E; i++) f[scoreAt + i] = f[scoreAt + i]! * inv;
        } else {
          for (let i = 0; i < E; i++) f[scoreAt + i] = 1 / fr(1 + fr(Math.exp(-lg[l0 + i]!)));
        }
        for (let i = 0; i < E; i++) {
          f[choiceAt + i] = biasV ? f[scoreAt + i]! + biasV[i]! : f[scoreAt + i]!;
          f[excludedAt + i] = 0;
        }
        if (nGroup > 1 && topkGroup < nGroup) {
          for (let g = 0; g < nGroup; g++) {
            const c = choiceAt + g * gsz;
            let b0 = f[c]!, b1 = -Infinity, i0 = 0, i1 = -1;
            for (let i = 1; i < gsz; i++) {
              const v = f[c + i]!;
              if (rankBefore(v, i, b0, i0)) {
                b1 = b0; i1 = i0; b0 = v; i0 = i;
              } else if (i1 < 0 || rankBefore(v, i, b1, i1)) {
                b1 = v; i1 = i;
              }
            }
            f[groupAt + g] = top2 ? b0 + b1 : b0;
          }
          for (let g = 0; g < nGroup; g++) {
            let better = 0;
            for (let h = 0; h < nGroup; h++) if (rankBefore(f[groupAt + h]!, h, f[groupAt + g]!, g)) better++;
            if (better >= topkGroup) for (let i = 0; i < gsz; i++) f[excludedAt + g * gsz + i] = 1;
          }
        }
        let sum = 0;
        for (let j = 0; j < K; j++) {
          let bv = 0, bi = -1;
          for (let i = 0; i < E; i++)
            if (!f[excludedAt + i] && (bi < 0 || rankBefore(f[choiceAt + i]!, i, bv, bi))) { bv = f[choiceAt + i]!; bi = i; }
          f[excludedAt + bi] = 1;
          idOut[tok * K + j] = bi;
          wOut[tok * K + j] = f[scoreAt + bi]!;
          sum += f[scoreAt + bi]!;
          cnt[bi]!++;
        }
        if (renorm) {
          const denom = fr(fr(sum) + fr(1e-20));
          for (let j = 0; j < K; j++) wOut[tok * K + j] = wOut[tok * K + j]! / denom;
        }
        if (scale !== 1) for (let j = 0; j < K; j++) wOut[tok * K + j] = wOut[tok * K + j]! * scale;
      }
    },

    cudaPermute(x, t, h, ids, k, e, xPerm, permIndex, offsets, permDtype, stream): void {
      const T = dim(t, 't'), Hd = dim(h, 'h'), K = dim(k, 'k', 1, 1024), E = dim(e, 'e', 1, 1024);
      const pd = parseDtype(permDtype, 'permDtype');
      if (pd === 'f16') throw typeError("permDtype must be 'f32' or 'bf16'");
      const xb = buf(x, 'x', T * Hd * 4), idb = buf(ids, 'ids', T * K * 4);
      const xpb = buf(xPerm, 'xPerm', T * K * Hd * dtypeSize(pd));
      const pb = buf(permIndex, 'permIndex', T * K * 4), ob = buf(offsets, 'offsets', (E + 1) * 4);
      getStream(stream);
      ensureAlive();
      const n = T * K;
      const idv = i32Of(idb, 'ids'), perm = i32Of(pb, 'permIndex'), offs = i32Of(ob, 'offsets');
      // routing.cu's contract: an id outside 0..E-1 is skipped (counted nowhere, permIndex -1, no
      // row of xPerm), so offsets[E] counts the valid ids only.
      const valid = (p: number) => idv[p]! >= 0 && idv[p]! < E;
      // Counts -> offsets; ranks stable by (expert, position p = token * k + slot).
      const cursor = new Int32Array(E);
      for (let p = 0; p < n; p++) if (valid(p)) cursor[idv[p]!]!++;
      let run = 0;
      for (let ex = 0; ex < E; ex++) {
        const c = cursor[ex]!;
        offs[ex] = run;
        cursor[ex] = run;
        run += c;
      }
      offs[E] = run;
      for (let p = 0; p < n; p++) perm[p] = valid(p) ? cursor[idv[p]!]!++ : -1;
      if (n === 0 || Hd === 0) return;
      const xs = f32Of(xb, 'x');
      if (pd === 'f32') {
        const xp = f32Of(xpb, 'xPerm');
        for (let p = 0; p < n; p++)
          if (perm[p]! >= 0) xp.set(xs.subarray(Math.floor(p / K) * Hd, Math.floor(p / K) * Hd + Hd), perm[p]! * Hd);
      } else {
        const xp = u16Of(xpb, 'xPerm');
        for (let p = 0; p < n; p++) {
          if (perm[p]! < 0) continue;
          const s0 = Math.floor(p / K) * Hd, d0 = perm[p]! * Hd;
          for (let c = 0; c < Hd; c++) xp[d0 + c] = f32ToBf16(xs[s0 + c]!);
        }
      }
    },

    cudaGatherExpertColumns(x, offsets, e, rows, h, perm, out, stream): void {
      const E = dim(e, 'e', 1, 1 << 20), R = dim(rows, 'rows'), Hd = dim(h, 'h');
      const xb = buf(x, 'x', R * Hd * 2), ob = optBuf(offsets, 'offsets', (E + 1) * 4);
      if (!ob && E !== 1) throw rangeError('cudaGatherExpertColumns: without offsets e must be 1');
      const pb = buf(perm, 'perm', E * Hd * 4), outb = buf(out, 'out', R * Hd * 2);
      getStream(stream);
      ensureAlive();
      if (R <= 0 || Hd <= 0) return;
      const xs = u16Of(xb, 'x'), order = i32Of(pb, 'perm'), o = u16Of(outb, 'out');
      // No offsets: one order for every row (E = 1, every row below "offsets[1]").
      const offs = ob ? i32Of(ob, 'offsets') : Int32Array.of(0, R);
      if (xs.buffer === o.buffer && xs.byteOffset === o.byteOffset) throw rangeError('gatherExpertColumns: out must not be x');
      for (let r = 0; r < R; r++) {
        // routing.cu's kernel: the last expert whose offset is <= r; rows from offsets[E] on as they are.
        let ex = -1;
        if (r < offs[E]!) for (ex = E - 1; offs[ex]! > r; ex--);
        for (let c = 0; c < Hd; c++) o[r * Hd + c] = xs[r * Hd + (ex < 0 ? c : order[ex * Hd + c]!)]!;
      }
    },

    cudaUnpermuteCombine(yPerm, permIndex, weights, t, k, h, out, accumulate, stream): void {
      const T = dim(t, 't'), K = dim(k, 'k', 1, 1024), Hd = dim(h, 'h');
      const yb = buf(yPerm, 'yPerm', T * K * Hd * 4), pb = buf(permIndex, 'permIndex', T * K * 4);
      const wb = buf(weights, 'weights', T * K * 4), ob = buf(out, 'out', T * Hd * 4);
      const acc = getBool(accumulate, 'accumulate');
      getStream(stream);
      ensureAlive();
      if (T <= 0 || Hd <= 0) return;
      const yp = f32Of(yb, 'yPerm'), pidx = i32Of(pb, 'permIndex'), w = f32Of(wb, 'weights'), o = f32Of(ob, 'out');
      // routing.cu's contract: a slot whose permIndex is outside 0..t*k-1 (permute's -1 for a
      // skipped id) adds nothing; a token without a valid slot gets 0.
      const rows = T * K;
      // Multiply then add (no FMA), slot order, then add to out: each step an f32 rounding.
      for (let tok = 0; tok < T; tok++) {
        for (let c = 0; c < Hd; c++) {
          let s = 0, any = false;
          for (let j = 0; j < K; j++) {
            const r = pidx[tok * K + j]!;
            if (r < 0 || r >= rows) continue;
            const v = fr(w[tok * K + j]! * yp[r * Hd + c]!);
            s = any ? fr(s + v) : v;
            any = true;
          }
          o[tok * Hd + c] = acc ? o[tok * Hd + c]! + s : s;
        }
      }
    },

    cudaCausalConv1d(x, t, c, weight, bias, k, statePool, slots, seqStarts, numSeqs, silu, out, stream): void {
      const T = dim(t, 't'), C = dim(c, 'c', 1), K = dim(k, 'k', 1, 64), B = dim(numSeqs, 'numSeqs');
      const xb = buf(x, 'x', T * C * 4), wb = buf(weight, 'weight', C * K * 4), bb = optBuf(bias, 'bias', C * 4);
      const pb = buf(statePool, 'statePool', 0), sb = buf(slots, 'slots', B * 4), stb = buf(seqStarts, 'seqStarts', (B + 1) * 4);
      const act = getBool(silu, 'silu');
      const ob = buf(out, 'out', T * C * 4);
      getStream(stream);
      ensureAlive();
      if (B <= 0) return;
      const ks = K - 1;
      const poolSlots = ks ? Math.floor(pb.sizeBytes / (C * ks * 4)) : Infinity;
      const xs = f32Of(xb, 'x'), ws = f32Of(wb, 'weight'), bs = bb ? f32Of(bb, 'bias') : null;
      const ps = f32Of(pb, 'statePool'), sl = i32Of(sb, 'slots'), st = i32Of(stb, 'seqStarts'), os = f32Of(ob, 'out');
      const seqs = deltaSeqs(sl, st, B, T, poolSlots);
      const hist = new Float32Array(64);
      for (const { t0, t1, slot } of seqs) {
        for (let ch = 0; ch < C; ch++) {
          const sAt = (slot * C + ch) * ks;
          for (let j = 0; j < ks; j++) hist[j] = ps[sAt + j]!;
          const bc = bs ? bs[ch]! : 0;
          for (let tok = t0; tok < t1; tok++) {
            const at = tok * C + ch;
            const xv = xs[at]!;
            let acc = bc;
            for (let j = 0; j < ks; j++) acc = fr(acc + fr(ws[ch * K + j]! * hist[j]!));
            acc = fr(acc + fr(ws[ch * K + ks]! * xv));
            for (let j = 0; j + 1 < ks; j++) hist[j] = hist[j + 1]!;
            if (ks > 0) hist[ks - 1] = xv;
            os[at] = act ? siluF32(acc) : acc;
          }
          for (let j = 0; j < ks; j++) ps[sAt + j] = hist[j]!;
        }
      }
    },

    cudaGatedDeltaRule(q, k, v, g, beta, statePool, slots, seqStarts, numSeqs, out, opts, stream, seqLens): void {
      const p = deltaOpts(opts, DELTA_MAX_DK);
      const B = dim(numSeqs, 'numSeqs');
      const T = p.T, qk = p.Hk * p.Dk, vr = p.Hv * p.Dv;
      const span = (stride: number, row: number) => (T === 0 ? 0 : (T - 1) * stride + row);
      const qb = buf(q, 'q', span(p.qStride, qk) * 4), kb = buf(k, 'k', span(p.kStride, qk) * 4);
      const vb = buf(v, 'v', span(p.vStride, vr) * 4);
      const gb = buf(g, 'g', T * p.Hv * 4), bb = buf(beta, 'beta', T * p.Hv * 4);
      const pb = buf(statePool, 'statePool', 0), sb = buf(slots, 'slots', B * 4), stb = buf(seqStarts, 'seqStarts', (B + 1) * 4);
      const ob = buf(out, 'out', T * vr * 4);
      getStream(stream);
      let longest = T;
      if (seqLens !== undefined && seqLens !== null) {
        if (!(seqLens instanceof Int32Array)) throw typeError('seqLens must be a Int32Array');
        if (seqLens.length !== B) throw rangeError(`seqLens.length is ${seqLens.length}, expected ${B}`);
        longest = 0;
        seqLens.forEach((n, i) => {
          if (n < 0 || n > T) throw rangeError(`seqLens[${i}] is ${n}, expected 0..${T} (opts.T)`);
          longest = Math.max(longest, n);
        });
      }
      ensureAlive();
      if (B <= 0) return;
      const { Hk, Hv, Dk, Dv } = p;
      const per = Hv * Dk * Dv;
      const qs = f32Of(qb, 'q'), kss = f32Of(kb, 'k'), vs = f32Of(vb, 'v'), gs = f32Of(gb, 'g'), bs = f32Of(bb, 'beta');
      const ps = f32Of(pb, 'statePool'), os = f32Of(ob, 'out');
      const seqs = deltaSeqs(i32Of(sb, 'slots'), i32Of(stb, 'seqStarts'), B, T, Math.floor(pb.sizeBytes / (per * 4)));
      const qscale = fr(1 / Math.sqrt(Dk));
      const lanes = new Float64Array(32);
      // the chunked kernel is launched (and the recurrent one skips whole chunks) only when some
      // sequence may have a whole chunk, as deltanet.cu's host side decides
      const C = p.chunk, chunked = deltaChunked(C, Dk) && Math.min(longest, T) >= C;
      // q/k rows as both kernels normalise them (a warp per row: lane partials in double, the butterfly)
      const loadQ = (tok: number, kh: number, dst: Float32Array, at: number) => {
        const a = tok * p.qStride + kh * Dk;
        const iq = p.l2normQk ? fr(1 / fr(Math.sqrt(fr(fr(sumSquaresF64(qs, a, Dk, lanes)) + fr(1e-6))))) : 1;
        for (let d = 0; d < Dk; d++) dst[at + d] = fr((p.l2normQk ? fr(qs[a + d]! * iq) : qs[a + d]!) * qscale);
      };
      const loadK = (tok: number, kh: number, dst: Float32Array, at: number) => {
        const a = tok * p.kStride + kh * Dk;
        const ik = p.l2normQk ? fr(1 / fr(Math.sqrt(fr(fr(sumSquaresF64(kss, a, Dk, lanes)) + fr(1e-6))))) : 1;
        for (let d = 0; d < Dk; d++) dst[at + d] = p.l2normQk ? fr(kss[a + d]! * ik) : kss[a + d]!;
      };
      const qn = new Float32Array(Math.max(C, 1) * Dk), kn = new Float32Array(Math.max(C, 1) * Dk);
      const G = new Float32Array(C), Bt = new Float32Array(C), eG = new Float32Array(C), decN = new Float32Array(C);
      const A = new Float32Array(C * C), P = new Float32Array(C * C), X = new Float32Array(C), QS = new Float32Array(C);
      const dot = (a: Float32Array, ai: number, b: Float32Array, bi: number) => {
        let acc = 0;
        for (let d = 0; d < Dk; d++) acc = fr(acc + fr(a[ai + d]! * b[bi + d]!));
        return acc;
      };
      for (const { t0, t1, slot } of seqs) {
        const n = t1 - t0;
        const nc = chunked && n >= C ? Math.floor(n / C) : 0;
        for (let h = 0; h < Hv; h++) {
          const kh = Math.floor(h / (Hv / Hk));
          const S = ps.subarray((slot * Hv + h) * Dk * Dv, (slot * Hv + h + 1) * Dk * Dv);
          // the chunked kernel: whole chunks of C tokens (deltanet.cu, gated_delta_chunk_kernel)
          for (let c = 0; c < nc; c++) {
            const tc = t0 + c * C;
            for (let i = 0; i < C; i++) {
              loadK(tc + i, kh, kn, i * Dk);
              loadQ(tc + i, kh, qn, i * Dk);
              G[i] = i === 0 ? gs[tc * Hv + h]! : fr(G[i - 1]! + gs[(tc + i) * Hv + h]!);
              Bt[i] = bs[(tc + i) * Hv + h]!;
              eG[i] = fr(Math.exp(G[i]!));
            }
            for (let i = 0; i < C; i++) {
              decN[i] = fr(Math.exp(fr(G[C - 1]! - G[i]!)));
              for (let j = 0; j <= i; j++) {
                const dec = fr(Math.exp(fr(G[i]! - G[j]!)));
                if (j < i) A[i * C + j] = fr(fr(Bt[i]! * dot(kn, i * Dk, kn, j * Dk)) * dec);
                P[i * C + j] = fr(dot(qn, i * Dk, kn, j * Dk) * dec);
              }
            }
            for (let e = 0; e < Dv; e++) {
              for (let i = 0; i < C; i++) {
                let ks = 0, qsum = 0;
                for (let d = 0; d < Dk; d++) {
                  ks = fr(ks + fr(kn[i * Dk + d]! * S[d * Dv + e]!));
                  qsum = fr(qsum + fr(qn[i * Dk + d]! * S[d * Dv + e]!));
                }
                X[i] = fr(Bt[i]! * fr(vs[(tc + i) * p.vStride + h * Dv + e]! - fr(eG[i]! * ks)));
                QS[i] = qsum;
              }
              // V' = (I + A)^-1 X by forward substitution
              for (let i = 0; i < C; i++) {
                let s = 0;
                for (let j = 0; j < i; j++) s = fr(s + fr(A[i * C + j]! * X[j]!));
                X[i] = fr(X[i]! - s);
              }
              for (let i = 0; i < C; i++) {
                let o = fr(eG[i]! * QS[i]!);
                for (let j = 0; j <= i; j++) o = fr(o + fr(P[i * C + j]! * X[j]!));
                os[((tc + i) * Hv + h) * Dv + e] = o;
              }
              for (let d = 0; d < Dk; d++) {
                let sv = fr(eG[C - 1]! * S[d * Dv + e]!);
                for (let i = 0; i < C; i++) sv = fr(sv + fr(fr(decN[i]! * kn[i * Dk + d]!) * X[i]!));
                S[d * Dv + e] = sv;
              }
            }
          }
          // the recurrent kernel: the tail (or every token of a sequence shorter than a chunk)
          for (let tok = t0 + nc * C; tok < t1; tok++) {
            loadQ(tok, kh, qn, 0);
            loadK(tok, kh, kn, 0);
            const eg = fr(Math.exp(gs[tok * Hv + h]!));
            const bt = bs[tok * Hv + h]!;
            for (let e = 0; e < Dv; e++) {
              let kvm = 0;
              for (let d = 0; d < Dk; d++) kvm = fr(kvm + fr(kn[d]! * S[d * Dv + e]!));
              const delta = fr(fr(vs[tok * p.vStride + h * Dv + e]! - fr(eg * kvm)) * bt);
              let o = 0;
              for (let d = 0; d < Dk; d++) {
                const sv = fr(fr(eg * S[d * Dv + e]!) + fr(kn[d]! * delta));
                S[d * Dv + e] = sv;
                o = fr(o + fr(qn[d]! * sv));
              }
              os[(tok * Hv + h) * Dv + e] = o;
            }
          }
        }
      }
    },

    cudaGatedRmsNorm(x, z, weight, eps, rows, d, out, stream): void {
      const R = dim(rows, 'rows'), D = dim(d, 'd', 1);
      const xb = buf(x, 'x', R * D * 4), zb = buf(z, 'z', R * D * 4), wb = buf(weight, 'weight', D * 4);
      const epsD = getDouble(eps, 'eps');
      if (!Number.isFinite(epsD) || epsD < 0) throw rangeError(`eps is ${cppDouble(epsD)}, expected a finite number >= 0`);
      const ob = buf(out, 'out', R * D * 4);
      getStream(stream);
      ensureAlive();
      if (R <= 0) return;
      const ep = fr(epsD);
      const xs = f32Of(xb, 'x'), zs = f32Of(zb, 'z'), ws = f32Of(wb, 'weight'), os = f32Of(ob, 'out');
      const lanes = new Float64Array(32);
      for (let r = 0; r < R; r++) {
        const at = r * D;
        const ss = sumSquaresF64(xs, at, D, lanes);
        const inv = fr(1 / fr(Math.sqrt(fr(fr(ss / D) + ep))));
        for (let i = 0; i < D; i++) os[at + i] = fr(fr(ws[i]! * fr(xs[at + i]! * inv)) * siluF32(zs[at + i]!));
      }
    },

    cudaRmsNorm(x, rows, dimArg, w, eps, out, residual, stream): void {
      const R = dim(rows, 'rows'), D = dim(dimArg, 'dim', 1);
      const xb = buf(x, 'x', R * D * 4), wb = buf(w, 'w', D * 4);
      const ep = fr(getDouble(eps, 'eps'));
      const ob = buf(out, 'out', R * D * 4), rb = optBuf(residual, 'residual', R * D * 4);
      getStream(stream);
      ensureAlive();
      if (R <= 0) return;
      const xs = f32Of(xb, 'x'), ws = f32Of(wb, 'w'), os = f32Of(ob, 'out'), rs = rb ? f32Of(rb, 'residual') : null;
      for (let r = 0; r < R; r++) {
        const at = r * D;
        let ss = 0;
        for (let i = 0; i < D; i++) {
          let v = xs[at + i]!;
          if (rs) {
            v = fr(rs[at + i]! + v);
            rs[at + i] = v;
          }
          ss += v * v;  // double
        }
        const inv = fr(1 / fr(Math.sqrt(fr(fr(ss / D) + ep))));
        const src = rs ?? xs;
        for (let i = 0; i < D; i++) os[at + i] = ws[i]! * fr(src[at + i]! * inv);
      }
    },

    cudaRope(x, t, heads, rowStride, headStride, offset, positions, invFreq, rotDim, attnScale, interleaved, stream): void {
      const T = dim(t, 't'), Hn = dim(heads, 'heads', 1), rs = dim(rowStride, 'rowStride', 1);
      const hs = dim(headStride, 'headStride', 0), off = dim(offset, 'offset', 0);
      const rot = dim(rotDim, 'rotDim', 2, 4096);  // cos/sin of a position in shared memory
      if (rot % 2) throw rangeError(`rotDim is ${rot}, expected an even number`);
      // Heads are rotated in parallel on the device: they must not share a column.
      if (Hn > 1 && hs < rot)
        throw rangeError(`headStride is ${hs}, expected at least rotDim = ${rot} when heads > 1 (heads must not overlap)`);
      const span = (Hn - 1) * hs + off + rot;
      if (span > rs) throw rangeError(`heads, headStride, offset and rotDim reach column ${span}, beyond rowStride ${rs}`);
      const xb = buf(x, 'x', T ? ((T - 1) * rs + span) * 4 : 0);
      const pb = buf(positions, 'positions', T * 4), ib = buf(invFreq, 'invFreq', (rot / 2) * 4);
      const scale = fr(getDouble(attnScale, 'attnScale'));
      const il = getBool(interleaved, 'interleaved');
      getStream(stream);
      ensureAlive();
      const half = rot / 2;
      if (T <= 0) return;
      const xs = f32Of(xb, 'x'), pos = i32Of(pb, 'positions'), inv = f32Of(ib, 'invFreq');
      const cs = scratch.floats(2 * half);
      for (let tok = 0; tok < T; tok++) {
        const p = fr(pos[tok]!);
        for (let i = 0; i < half; i++) {
          const angle = fr(p * inv[i]!);
          cs[i] = fr(Math.cos(angle)) * scale;
          cs[half + i] = fr(Math.sin(angle)) * scale;
        }
        for (let hd = 0; hd < Hn; hd++) {
          const base = tok * rs + off + hd * hs;
          for (let i = 0; i < half; i++) {
            const ia = base + (il ? 2 * i : i), ib2 = base + (il ? 2 * i + 1 : i + half);
            const a = xs[ia]!, b = xs[ib2]!, c = cs[i]!, s = cs[half + i]!;
            xs[ia] = fr(a * c) - fr(b * s);
            xs[ib2] = fr(b * c) + fr(a * s);
          }
        }
      }
    },

    cudaSiluMul(gu, t, i, out, stream): void {
      const T = dim(t, 't'), I = dim(i, 'i');
      const gb = buf(gu, 'gu', T * 2 * I * 4), ob = buf(out, 'out', T * I * 4);
      getStream(stream);
      ensureAlive();
      if (T * I === 0) return;
      const g = f32Of(gb, 'gu'), o = f32Of(ob, 'out');
      for (let tok = 0; tok < T; tok++)
        for (let c = 0; c < I; c++) o[tok * I + c] = siluF32(g[tok * 2 * I + c]!) * g[tok * 2 * I + I + c]!;
    },

    cudaClampedSwiglu(gu, t, i, alpha, limit, out, stream): void {
      const T = dim(t, 't'), I = dim(i, 'i');
      const pos = (v: unknown, name: string): number => {
        if (typeof v !== 'number') throw typeError(`${name} must be a number`);
        if (!(v > 0) || !Number.isFinite(v)) throw rangeError(`${name} is ${cppDouble(v)}, expected a positive number`);
        return fr(v);
      };
      const a = pos(alpha, 'alpha'), l = pos(limit, 'limit');
      getStream(stream);
      const gb = buf(gu, 'gu', T * 2 * I * 4), ob = buf(out, 'out', T * I * 4);
      ensureAlive();
      if (T * I === 0) return;
      const g = f32Of(gb, 'gu'), o = f32Of(ob, 'out');
      for (let tok = 0; tok < T; tok++)
        for (let c = 0; c < I; c++) o[tok * I + c] = clampedSwigluF32(g[tok * 2 * I + c]!, g[tok * 2 * I + I + c]!, a, l);
    },

    cudaEmbedding(table, dtype, v, h, ids, t, out, stream): void {
      const dt = parseDtype(dtype, 'dtype');
      const V = dim(v, 'v', 1), Hd = dim(h, 'h', 1), T = dim(t, 't');
      const tb = buf(table, 'table', V * Hd * dtypeSize(dt)), ib = buf(ids, 'ids', T * 4);
      const ob = buf(out, 'out', T * Hd * 4);
      getStream(stream);
      ensureAlive();
      if (T <= 0) return;
      const idv = i32Of(ib, 'ids'), o = f32Of(ob, 'out');
      const f32t = dt === 'f32' ? f32Of(tb, 'table') : null, u16t = dt === 'f32' ? null : u16Of(tb, 'table');
      const f16 = dt === 'f16' ? f16Table() : null;
      for (let tok = 0; tok < T; tok++) {
        const id = idv[tok]!, o0 = tok * Hd;
        if (id < 0 || id >= V) {  // ids live on the device: a bad one poisons its row
          o.fill(NaN, o0, o0 + Hd);
          continue;
        }
        const s0 = id * Hd;
        if (f32t) o.set(f32t.subarray(s0, s0 + Hd), o0);
        else if (f16) for (let c = 0; c < Hd; c++) o[o0 + c] = f16[u16t![s0 + c]!]!;
        else for (let c = 0; c < Hd; c++) o[o0 + c] = bf16ToF32(u16t![s0 + c]!);
      }
    },

    cudaSoftmax(x, rows, cols, out, log, stream): void {
      const R = dim(rows, 'rows'), C = dim(cols, 'cols', 1);
      const xb = buf(x, 'x', R * C * 4), ob = buf(out, 'out', R * C * 4);
      const lg = getBool(log, 'log');
      getStream(stream);
      ensureAlive();
      const xs = f32Of(xb, 'x'), o = f32Of(ob, 'out');
      for (let r = 0; r < R; r++) {
        const at = r * C;
        let mx = -Infinity;
        for (let i = 0; i < C; i++) if (xs[at + i]! > mx) mx = xs[at + i]!;  // fmaxf: NaN ignored
        let s = 0;
        for (let i = 0; i < C; i++) {
          const e = fr(Math.exp(fr(xs[at + i]! - mx)));
          if (!lg) o[at + i] = e;
          s += e;  // double
        }
        if (lg) {
          const lse = fr(Math.log(s));
          for (let i = 0; i < C; i++) o[at + i] = fr(xs[at + i]! - mx) - lse;
        } else {
          const inv = fr(1 / s);
          for (let i = 0; i < C; i++) o[at + i] = o[at + i]! * inv;
        }
      }
    },

    cudaTopN(x, rows, cols, n, ids, vals, stream): void {
      const R = dim(rows, 'rows'), C = dim(cols, 'cols', 1), N = dim(n, 'n', 1, C);
      const xb = buf(x, 'x', R * C * 4), ib = buf(ids, 'ids', R * N * 4), vb = buf(vals, 'vals', R * N * 4);
      getStream(stream);
      ensureAlive();
      const xs = f32Of(xb, 'x'), idOut = i32Of(ib, 'ids'), vOut = f32Of(vb, 'vals');
      // The first N of the strict order rank_before (what the kernel's N argmax rounds produce),
      // by insertion into a sorted list.
      for (let r = 0; r < R; r++) {
        const at = r * C, o0 = r * N;
        let filled = 0;
        for (let i = 0; i < C; i++) {
          const v = xs[at + i]!;
          if (filled === N && !rankBefore(v, i, vOut[o0 + N - 1]!, idOut[o0 + N - 1]!)) continue;
          let p = filled < N ? filled : N - 1;
          while (p > 0 && rankBefore(v, i, vOut[o0 + p - 1]!, idOut[o0 + p - 1]!)) {
            vOut[o0 + p] = vOut[o0 + p - 1]!;
            idOut[o0 + p] = idOut[o0 + p - 1]!;
            p--;
          }
          vOut[o0 + p] = v;
          idOut[o0 + p] = i;
          if (filled < N) filled++;
        }
      }
    },

    cudaSampleBatch(logits, rows, vocabSize, batch, out, stream): void {
      const R = dim(rows, 'rows', 0, 1 << 20), V = dim(vocabSize, 'vocabSize', 1, 2 ** 30);
      const lb = alignedBuf(logits, 'logits', R * V * 4, 4);
      getStream(stream);
      ensureAlive();
      // The kernel is native/cpu/sampling.cc line for line (sampling.cu) and the binding parses
      // with the same parse_sample_batch: the CPU call is its contract, checks and results alike.
      native.sampleBatch(f32Of(lb, 'logits').subarray(0, R * V), R, V, batch, out);
    },

    cudaKvCacheWrite(k, v, t, slots, kCache, vCache, kvHeads, dk, dv, vStride, numSlots, stream,
                     kvDtype, kScales, vScales): void {
      const T = dim(t, 't'), KVH = dim(kvHeads, 'kvHeads', 1), DK = dim(dk, 'dk', 1);
      const DV = dim(dv, 'dv', 0), VS = dim(vStride, 'vStride', 0);
      const S = getInt(numSlots, 'numSlots', 0, 2 ** 40);
      const hasV = !nullish(v);
      if (hasV && VS < DV) throw rangeError(`vStride is ${VS}, expected at least dv = ${DV}`);
      const kb = buf(k, 'k', T * KVH * DK * 4);
      const vb = hasV ? buf(v, 'v', T * KVH * DV * 4) : null;
      const sb = buf(slots, 'slots', T * 4);
      const dt = kvDtypeArg(kvDtype, 'kvDtype');
      const es = kvDtypeBytes(dt);
      const kcb = alignedBuf(kCache, 'kCache', S * KVH * DK * es, es);
      const vcb = hasV ? alignedBuf(vCache, 'vCache', S * KVH * VS * es, es) : null;
      getStream(stream);
      const ksc = dt === 'fp8' ? kvScalesArg(kScales, 'kScales', KVH) : null;
      const vsc = dt === 'fp8' && hasV ? kvScalesArg(vScales, 'vScales', KVH) : null;
      ensureAlive();
      if (T <= 0) return;
      const ks = f32Of(kb, 'k'), sl = i32Of(sb, 'slots'), kc = kvArrayOf(kcb, dt, 'kCache');
      const vs = vb ? f32Of(vb, 'v') : null, vc = vcb ? kvArrayOf(vcb, dt, 'vCache') : null;
      for (let tok = 0; tok < T; tok++) {
        const slot = sl[tok]!;
        if (slot < 0) continue;
        if (slot >= S) fault(`slots[${tok}] is ${slot}, expected < numSlots = ${S}`);
        for (let hh = 0; hh < KVH; hh++)
          for (let e = 0; e < DK; e++)
            kc[(slot * KVH + hh) * DK + e] = kvEncode(dt, ks[(tok * KVH + hh) * DK + e]!, ksc?.[hh] ?? 1);
        if (!vs || !vc) continue;
        for (let hh = 0; hh < KVH; hh++)
          for (let e = 0; e < DV; e++)
            vc[(slot * KVH + hh) * VS + e] = kvEncode(dt, vs[(tok * KVH + hh) * DV + e]!, vsc?.[hh] ?? 1);
      }
    },

    cudaPagedAttention(q, kCache, vCache, seqInfo, blockTables, opts, out, stream): void {
      if (typeof opts !== 'object' || opts === null) throw typeError('opts must be an object');
      const o = opts as CudaAttentionOptions & Record<string, unknown>;
      const req = (key: string, min: number, max: number, def: number, required: boolean): number => {
        const v = o[key];
        if (nullish(v)) {
          if (required) throw typeError(`opts.${key} must be a number`);
          return def;
        }
        if (typeof v !== 'number') throw typeError(`opts.${key} must be a number`);
        if (v !== Math.floor(v) || v < min || v > max)
          throw rangeError(`opts.${key} is ${cppDouble(v)}, expected an integer in ${min}..${max}`);
        return v;
      };
      const numSeqs = req('numSeqs', 0, 1 << 20, 0, true);
      const heads = req('heads', 1, 4096, 0, true);
      const kvHeads = req('kvHeads', 1, heads, 0, true);
      if (heads % kvHeads) throw rangeError('opts.heads must be a multiple of opts.kvHeads');
      const dk = req('dk', 1, 4096, 0, true);
      const dv = req('dv', 1, 512, 0, true);
      const vStride = req('vStride', 1, 1 << 16, dv, false);
      const vOffset = req('vOffset', 0, 1 << 16, 0, false);
      if (vOffset + dv > vStride) throw rangeError('opts.vOffset + opts.dv exceeds opts.vStride');
      const bs = req('blockSize', 1, 1 << 16, 0, true);
      const maxBlocks = req('maxBlocks', 1, 1 << 24, 0, true);
      if (typeof o.scale !== 'number') throw typeError('opts.scale must be a number');
      const scale = fr(o.scale);
      const window = req('slidingWindow', 0, 2 ** 30, 0, false);
      const qRowStride = req('qRowStride', heads * dk, 2 ** 30, heads * dk, false);
      const total = req('totalTokens', 0, 1 << 28, 0, true);
      const maxCtx = req('maxContext', 1, 2 ** 30, 0, true);
      const numBlocks = req('numBlocks', 1, 2 ** 30, 0, true);
      const qb = buf(q, 'q', total ? ((total - 1) * qRowStride + heads * dk) * 4 : 0);
      const dt = kvDtypeArg(o.kvDtype, 'opts.kvDtype');
      const es = kvDtypeBytes(dt);
      const kScales = dt === 'fp8' ? kvScalesArg(o.kScales, 'opts.kScales', kvHeads) : null;
      const vScales = dt === 'fp8' ? kvScalesArg(o.vScales, 'opts.vScales', kvHeads) : null;
      const kcb = alignedBuf(kCache, 'kCache', numBlocks * bs * kvHeads * dk * es, es);
      const vcb = alignedBuf(vCache, 'vCache', numBlocks * bs * kvHeads * vStride * es, es);
      const sib = buf(seqInfo, 'seqInfo', numSeqs * 3 * 4);
      const btb = buf(blockTables, 'blockTables', numSeqs * maxBlocks * 4);
      const ob = buf(out, 'out', total * heads * dv * 4);
      const snb = nullish(o.sinks) ? null : alignedBuf(o.sinks, 'opts.sinks', heads * 4, 4);
      getStream(stream);
      ensureAlive();
      if (total <= 0 || numSeqs <= 0) return;
      const sinks = snb ? f32Of(snb, 'opts.sinks') : null;
      // The cache's values as f32 (the dequantised cache the kernel reads; MLA reads V with K's scale).
      const shareKv = kcb.sameAs(vcb) && vStride === dk;
      const kc = dequantCache(kvArrayOf(kcb, dt, 'kCache'), dt, kScales, kvHeads, dk);
      const vc = shareKv ? kc : dequantCache(kvArrayOf(vcb, dt, 'vCache'), dt, vScales, kvHeads, vStride);
      const qs = f32Of(qb, 'q');
      const si = i32Of(sib, 'seqInfo'), bt = i32Of(btb, 'blockTables'), os = f32Of(ob, 'out');
      const group = heads / kvHeads;
      for (let s = 0; s < numSeqs; s++) {
        const qStart = si[3 * s]!, qLen = si[3 * s + 1]!, ctx = si[3 * s + 2]!;
        if (qLen <= 0) continue;
        if (qStart < 0 || qStart + qLen > total) fault(`seqInfo[${s}] rows ${qStart}..${qStart + qLen} outside totalTokens ${total}`);
        // NOTE: stricter than the device, on purpose: attention.cu reads no key at or past
        // min(maxContext, maxBlocks * blockSize) (a wrong result, not a fault), where the emulator
        // refuses such a ctxLen outright so that an engine bug shows up here.
        if (ctx > maxCtx) precondition(`seqInfo[${s}].ctxLen ${ctx} > maxContext ${maxCtx}`);
        if (Math.ceil(ctx / bs) > maxBlocks) precondition(`seqInfo[${s}].ctxLen ${ctx} needs more than maxBlocks ${maxBlocks} blocks`);
        for (let b = 0; b < Math.ceil(ctx / bs); b++) {
          const blk = bt[s * maxBlocks + b]!;
          if (blk < 0 || blk >= numBlocks) fault(`blockTables[${s}][${b}] is ${blk}, outside 0..${numBlocks - 1}`);
        }
        const sc = scratch.doubles(ctx + dv);  // [scores ctx | output accumulators dv]
        for (let i = 0; i < qLen; i++) {
          const pos = ctx - qLen + i, lo = window > 0 ? Math.max(0, pos - window + 1) : 0;
          const row = qStart + i;
          for (let hd = 0; hd < heads; hd++) {
            const kvh = Math.floor(hd / group), q0 = row * qRowStride + hd * dk;
            let mx = -Infinity;
            for (let j = lo; j <= pos; j++) {
              const crow = (bt[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              let d = 0;
              for (let e = 0; e < dk; e++) d += qs[q0 + e]! * kc[crow * dk + e]!;
              d *= scale;
              sc[j] = d;
              if (d > mx) mx = d;
            }
            let sum = 0;
            for (let j = lo; j <= pos; j++) sum += (sc[j] = Math.exp(sc[j]! - mx));
            // The sink: in the denominator only, once (after attention.cu's split-K merge).
            if (sinks) sum += Math.exp(sinks[hd]! - mx);
            const o0 = (row * heads + hd) * dv;
            // A row with no visible key divides 0 by 0 (NaN), as the kernel's 0 * (1 / 0).
            sc.fill(0, ctx, ctx + dv);
            for (let j = lo; j <= pos; j++) {
              const crow = (bt[s * maxBlocks + Math.floor(j / bs)]! * bs + (j % bs)) * kvHeads + kvh;
              const p = sc[j]!, v0 = crow * vStride + vOffset;
              for (let e = 0; e < dv; e++) sc[ctx + e] += p * vc[v0 + e]!;
            }
            for (let e = 0; e < dv; e++) os[o0 + e] = sc[ctx + e]! / sum;
          }
        }
      }
    },

    // --- glue for the device engine
    cudaGemmF32(x, m, w, wDtype, n, k, y, bias, accumulate, stream): void {
      const M = dim(m, 'm'), N = dim(n, 'n'), K = dim(k, 'k');
      if (wDtype !== 'f32' && wDtype !== 'bf16') throw typeError("wDtype must be 'f32' or 'bf16'");
      const xb = buf(x, 'x', M * K * 4), wb = buf(w, 'w', N * K * dtypeSize(wDtype));
      const yb = buf(y, 'y', M * N * 4), bb = optBuf(bias, 'bias', N * 4);
      const acc = getBool(accumulate, 'accumulate');
      getStream(stream);
      ensureAlive();
      if (M === 0 || N === 0) return;
      const xs = f32Of(xb, 'x'), ys = f32Of(yb, 'y'), bs = bb ? f32Of(bb, 'bias') : null;
      let ws: Float32Array;
      if (wDtype === 'f32') ws = f32Of(wb, 'w');
      else {
        ws = scratch.floats(N * K);
        widenBf16(u16Of(wb, 'w'), N * K, ws, 0);
      }
      for (let r = 0; r < M; r++)
        for (let o = 0; o < N; o++) {
          // glue.cu's contract: each product rounded to f32, the products summed in double, then
          // s = (accumulate ? y : 0) + bias + sum in double, rounded to f32 once.
          let sum = 0;
          for (let i = 0, xa = r * K, wa = o * K; i < K; i++) sum += fr(xs[xa + i]! * ws[wa + i]!);
          let sd = acc ? ys[r * N + o]! : 0;
          if (bs) sd += bs[o]!;
          const v = fr(sd + sum);
          ys[r * N + o] = v;
        }
    },
    cudaAdd(y, x, n, stream): void {
      const cnt = getInt(n, 'n', 0, 2 ** 42);
      const yb = buf(y, 'y', cnt * 4), xb = buf(x, 'x', cnt * 4);
      getStream(stream);
      ensureAlive();
      if (cnt === 0) return;
      const ys = f32Of(yb, 'y'), xs = f32Of(xb, 'x');
      for (let i = 0; i < cnt; i++) ys[i] = ys[i]! + xs[i]!;
    },
    cudaGatedAdd(out, y, gate, t, h, stream): void {
      const T = dim(t, 't'), Hd = dim(h, 'h');
      const ob = buf(out, 'out', T * Hd * 4), yb = buf(y, 'y', T * Hd * 4), gb = buf(gate, 'gate', T * 4);
      getStream(stream);
      ensureAlive();
      if (T * Hd === 0) return;
      const os = f32Of(ob, 'out'), ys = f32Of(yb, 'y'), gs = f32Of(gb, 'gate');
      for (let tok = 0; tok < T; tok++) {
        // glue.cu: the sigmoid, product and sum in double, one rounding (the Float32Array store).
        const sg = 1 / (1 + Math.exp(-gs[tok]!));
        for (let c = 0; c < Hd; c++) os[tok * Hd + c] = os[tok * Hd + c]! + sg * ys[tok * Hd + c]!;
      }
    },
    cudaSigmoidMul(x, gate, n, stream): void {
      const cnt = getInt(n, 'n', 0, 2 ** 42);
      getStream(stream);
      const xb = buf(x, 'x', cnt * 4), gb = buf(gate, 'gate', cnt * 4);
      ensureAlive();
      if (cnt === 0) return;
      const xs = f32Of(xb, 'x'), gs = f32Of(gb, 'gate');
      // glue.cu: sigmoid and product in double, one rounding (the Float32Array store).
      for (let i = 0; i < cnt; i++) xs[i] = xs[i]! * (1 / (1 + Math.exp(-gs[i]!)));
    },
    cudaDeltaGates(ba, t, hv, negA, dtBias, g, beta, stream): void {
      const T = dim(t, 't'), Hv = dim(hv, 'hv');
      getStream(stream);
      const bab = buf(ba, 'ba', T * 2 * Hv * 4), nb = buf(negA, 'negA', Hv * 4), db = buf(dtBias, 'dtBias', Hv * 4);
      const gb = buf(g, 'g', T * Hv * 4), bb = buf(beta, 'beta', T * Hv * 4);
      ensureAlive();
      if (T * Hv === 0) return;
      const bas = f32Of(bab, 'ba'), ns = f32Of(nb, 'negA'), ds = f32Of(db, 'dtBias'), gs = f32Of(gb, 'g'), bs = f32Of(bb, 'beta');
      for (let tok = 0; tok < T; tok++) {
        for (let h = 0; h < Hv; h++) {
          bs[tok * Hv + h] = 1 / (1 + Math.exp(-bas[tok * 2 * Hv + h]!));
          const v = fr(bas[tok * 2 * Hv + Hv + h]! + ds[h]!);
          gs[tok * Hv + h] = ns[h]! * (v > 20 ? v : Math.log1p(Math.exp(v)));
        }
      }
    },
    cudaClamp(x, n, limit, stream): void {
      const cnt = getInt(n, 'n', 0, 2 ** 42);
      const xb = buf(x, 'x', cnt * 4);
      const lim = fr(getDouble(limit, 'limit'));
      getStream(stream);
      ensureAlive();
      if (cnt === 0) return;
      const xs = f32Of(xb, 'x');
      // NaN stays NaN (torch.clamp); -0 and 0 compare equal and keep their sign.
      for (let i = 0; i < cnt; i++) {
        const v = xs[i]!;
        if (v > lim) xs[i] = lim;
        else if (v < -lim) xs[i] = -lim;
      }
    },
    cudaCopy2D(dst, dstOffsetBytes, dstPitchBytes, src, srcOffsetBytes, srcPitchBytes, widthBytes, rows, stream): void {
      const doff = getInt(dstOffsetBytes, 'dstOffsetBytes', 0, BYTES_MAX);
      const dp = getInt(dstPitchBytes, 'dstPitchBytes', 0, BYTES_MAX);
      const soff = getInt(srcOffsetBytes, 'srcOffsetBytes', 0, BYTES_MAX);
      const sp = getInt(srcPitchBytes, 'srcPitchBytes', 0, BYTES_MAX);
      const wd = getInt(widthBytes, 'widthBytes', 0, BYTES_MAX);
      const R = dim(rows, 'rows');
      if (dp < wd) throw rangeError(`dstPitchBytes is ${dp}, expected at least widthBytes = ${wd}`);
      if (sp < wd) throw rangeError(`srcPitchBytes is ${sp}, expected at least widthBytes = ${wd}`);
      const db = buf(dst, 'dst', R ? doff + (R - 1) * dp + wd : 0);
      const sb = buf(src, 'src', R ? soff + (R - 1) * sp + wd : 0);
      getStream(stream);
      ensureAlive();
      const d = bytesOf(db), s = bytesOf(sb);
      for (let r = 0; r < R; r++) d.set(s.subarray(soff + r * sp, soff + r * sp + wd), doff + r * dp);
    },
    cudaCopyRowRange(dst, src, offsets, lo, hi, rowBytes, maxRows, stream): void {
      const L = dim(lo, 'lo');
      const Hh = dim(hi, 'hi', L);
      const rb = getInt(rowBytes, 'rowBytes', 0, BYTES_MAX);
      const mr = dim(maxRows, 'maxRows');
      const db = buf(dst, 'dst', mr * rb), sb = buf(src, 'src', mr * rb);
      const ob = buf(offsets, 'offsets', (Hh + 1) * 4);
      getStream(stream);
      ensureAlive();
      const off = i32Of(ob, 'offsets');
      // Rows [offsets[lo], offsets[hi]) clipped to [0, maxRows): the buffers hold maxRows rows.
      const r0 = Math.max(0, off[L]!), r1 = Math.min(off[Hh]!, mr);
      if (r1 <= r0 || rb === 0) return;
      bytesOf(db).set(bytesOf(sb).subarray(r0 * rb, r1 * rb), r0 * rb);
    },

    // NCCL as the CPU addon's loopback group: emulated devices in worker threads of one process
    // (each its own emulator) exchange device buffers; the unique id names the group. With
    // options.ncclStore (rank processes), a Gloo group through the store the id names.
    cudaNcclUniqueId(): Uint8Array {
      if (options.ncclStore) return storeId(options.ncclStore);
      return Uint8Array.from({ length: 128 }, () => Math.floor(Math.random() * 256));
    },
    cudaNcclJoin(uniqueId: Uint8Array, worldSize: number, rank: number, timeoutMs?: number): CudaCommGroup {
      if (!(uniqueId instanceof Uint8Array) || uniqueId.length !== 128)
        throw rangeError(`uniqueId.length is ${(uniqueId as Uint8Array | undefined)?.length}, expected 128`);
      const ms = nullish(timeoutMs) ? 600_000 : getInt(timeoutMs, 'timeoutMs', 1, 2147483647);
      const across = parseStoreId(uniqueId);
      const g = across
        ? native.glooJoin({ host: across.host, port: across.port, prefix: `nccl-emu-${across.nonce}`, rank, worldSize, timeoutMs: ms })
        : native.loopbackJoin(`nccl-emu-${Buffer.from(uniqueId).toString('hex').slice(0, 32)}`, worldSize, rank, ms);
      const deviceBytes = (b: CudaBuffer, what: string) => bytesOf(unwrap(b, what));
      return {
        rank, worldSize, backend: 'nccl',
        all2allv(send, sendBytes, recv, recvBytes, stream) {
          getStream(stream);
          ensureAlive();
          g.all2allv(deviceBytes(send, 'send'), sendBytes, deviceBytes(recv, 'recv'), recvBytes);
        },
        all2allCounts: (send, recv) => g.all2allCounts(send, recv),
        barrier: () => g.barrier(),
        dispose: () => g.dispose(),
      };
    },
  };

  const TILES: readonly CudaGemmTile[] = ['auto', 'small', 'large', 'sm90', 'sm90-swizzle', 'sm90-persistent'];
  /** opts.fp8Path of cudaGroupGemmFfn (after parseTile checked opts is an object). */
  function parseFp8Path(opts: unknown): CudaFp8Path {
    const t = nullish(opts) ? undefined : (opts as { fp8Path?: unknown }).fp8Path;
    if (nullish(t)) return 'auto';
    if (t === 'auto' || t === 'dequant' || t === 'act') return t;
    throw typeError("opts.fp8Path must be 'auto', 'dequant' or 'act'");
  }

  /**
   * group_gemm_quant.cu's FP8-activation pass for one row: v (k values) quantized per 128 to e4m3
   * with s = amax / 448; out[o] = sum over blocks of acc + p * (s_x * s_w), p the block's sum of
   * e4m3 x e4m3 products (one f32 rounding, as the bf16 GroupGemm's emulation), each step an f32 rounding.
   */
  function fp8ActRow(q: DeviceQuant, w: Uint8Array, n: number, k: number, gateUp: boolean, v: Float32Array,
                     out: Float64Array) {
    const b = quantMatrixBytes(q, n, k, gateUp);
    const KB = Math.ceil(k / 128);
    const xa = new Float64Array(k), sx = new Float64Array(KB);
    for (let kb = 0; kb < KB; kb++) {
      const c1 = Math.min(k, kb * 128 + 128);
      let amax = 0;
      for (let c = kb * 128; c < c1; c++) amax = Math.max(amax, Math.abs(v[c]!));
      const sc = fr(amax / 448);
      sx[kb] = sc;
      for (let c = kb * 128; c < c1; c++) xa[c] = sc > 0 ? fp8ToF32(f32ToFp8(fr(v[c]! / sc))) : 0;
    }
    for (let o = 0; o < n; o++) {
      let acc = 0;
      for (let kb = 0; kb < KB; kb++) {
        let p = 0, sw = 0;
        for (let c = kb * 128; c < Math.min(k, kb * 128 + 128); c++) {
          const el = quantElement(q, w, b, n, k, gateUp, o, c);
          p += xa[c]! * el.code;
          sw = el.scale;
        }
        acc = fr(acc + fr(fr(p) * fr(sx[kb]! * sw)));
      }
      out[o] = acc;
    }
  }

  function parseTile(opts: unknown): CudaGemmTile {
    if (nullish(opts)) return 'auto';
    if (typeof opts !== 'object') throw typeError('opts must be an object');
    const t = (opts as { tile?: unknown }).tile;
    if (nullish(t)) return 'auto';
    if (TILES.includes(t as CudaGemmTile)) return t as CudaGemmTile;
    throw typeError("opts.tile must be 'auto', 'small', 'large', 'sm90', 'sm90-swizzle' or 'sm90-persistent'");
  }

  let f16Decode: Float32Array | null = null;
  /** All 65536 f16 bit patterns as f32 (dtype.h's f16_to_f32, which __half2float matches). */
  function f16Table(): Float32Array {
    if (!f16Decode) {
      const all = Uint16Array.from({ length: 65536 }, (_, i) => i);
      f16Decode = new Float32Array(65536);
      native.convert(all, 'f16', f16Decode, 'f32');
    }
    return f16Decode;
  }

  const faultAt = options.faultAt ?? faultFromEnv();
  if (faultAt) {
    const op = (addon as unknown as Record<string, (...a: unknown[]) => unknown>)[faultAt.op];
    if (typeof op !== 'function') throw new Error(`faultAt: no op ${faultAt.op}`);
    let calls = 0;
    (addon as unknown as Record<string, unknown>)[faultAt.op] = (...args: unknown[]) => {
      if (++calls === faultAt.calls) fault(`injected at call ${calls} of ${faultAt.op}`);
      return op.apply(addon, args);
    };
  }
  return addon;
}

/**
 * Stream ordering made observable: work enqueued on a CudaStream (not the default stream) is held
 * back until something orders it (the stream's or an event's synchronize, another stream waiting on
 * an event recorded after it, cudaSynchronize), while the default stream runs at once. Code that
 * forgets an event or a sync then reads stale data in the tests, as it could on a GPU. Copies follow
 * CUDA's rules for pageable host memory (synchronous with their stream) and pinned memory (queued:
 * the host bytes are read when the copy runs). Deferred calls return undefined.
 */
export function withLazyStreams(cu: CudaAddon, opts: { lazyCount?: number } = {}): CudaAddon {
  // Only the first lazyCount streams created are held back; later ones run at once. With the model's
  // main stream lazy and its side stream eager, a side stream that starts before its fork reads
  // stale inputs; with both lazy, a join that is missing does.
  // opts is read at each stream's creation: a test may lower lazyCount between creations.
  let created = 0;
  let left = 0;
  const queues = new Map<object, (() => void)[]>();
  const pinned = new WeakSet<ArrayBufferLike>();
  /** One record() of an event: done once the recording stream's work before it has run. */
  interface Marker { done: boolean; stream: object | null }
  const current = new WeakMap<object, Marker>();
  const flush = (s: object) => {
    const q = queues.get(s);
    while (q && q.length) q.shift()!();
  };
  const flushAll = () => { for (const s of queues.keys()) flush(s); };
  /** Runs the recording stream's queue until that record of the event is reached. */
  const flushTo = (m: Marker | undefined) => {
    const q = m?.stream ? queues.get(m.stream) : undefined;
    while (m && !m.done && q && q.length) q.shift()!();
  };
  const Base = cu.CudaStream as unknown as new (priority?: number) => CudaStream;
  class LazyStream extends Base {
    constructor(priority?: number) {
      super(priority);
      if (created++ < (opts.lazyCount ?? Infinity)) queues.set(this, []);
    }
    override synchronize(): void { flush(this); super.synchronize(); }
    override query(): boolean { return (queues.get(this)?.length ?? 0) === 0; }
    override dispose(): void {
      // CUDA lets a destroyed stream's work finish later, racing whatever the caller frees next
      // (buffers, pinned memory): counted, for tests that ask that nothing was left behind.
      left += queues.get(this)?.length ?? 0;
      queues.delete(this);
      super.dispose();
    }
    override waitEvent(event: CudaEvent): void {
      super.waitEvent(event);
      // As cudaStreamWaitEvent: the event's most recent record at the time of this call.
      const m = current.get(event);
      const q = queues.get(this);
      if (q) q.push(() => flushTo(m));
      else flushTo(m);
    }
  }
  const EventBase = cu.CudaEvent as unknown as new (timing?: boolean) => CudaEvent;
  class LazyEvent extends EventBase {
    override record(stream?: CudaStream | null): void {
      super.record(stream);
      if (stream instanceof LazyStream && queues.has(stream)) {
        const m: Marker = { done: false, stream };
        current.set(this, m);
        queues.get(stream)!.push(() => { m.done = true; });
      } else {
        current.set(this, { done: true, stream: null });
      }
    }
    override synchronize(): void { flushTo(current.get(this)); super.synchronize(); }
    override query(): boolean { return current.get(this)?.done ?? true; }
  }
  const hostBuffer = (v: unknown): ArrayBufferLike | null =>
    v instanceof ArrayBuffer ? v : ArrayBuffer.isView(v) ? v.buffer : null;
  const out: Record<string, unknown> = { ...cu, CudaStream: LazyStream, CudaEvent: LazyEvent };
  for (const [name, fn] of Object.entries(cu)) {
    if (typeof fn !== 'function' || !name.startsWith('cuda')) continue;
    const f = fn as (...a: unknown[]) => unknown;
    out[name] = (...args: unknown[]) => {
      if (name === 'cudaSynchronize') flushAll();
      if (name === 'cudaPinnedBuffer') {
        const b = f.apply(cu, args) as ArrayBuffer;
        pinned.add(b);
        return b;
      }
      const s = args.find((a) => a instanceof LazyStream && queues.has(a)) as LazyStream | undefined;
      if (!s) return f.apply(cu, args);
      const host = name === 'cudaCopyToHost' ? hostBuffer(args[0]) : name === 'cudaCopyToDevice' ? hostBuffer(args[2]) : null;
      // cudaSampleBatch returns its results through pageable copies: it runs in order, done on return.
      if ((host && !pinned.has(host)) || name === 'cudaSampleBatch') {
        // Pageable host memory: the copy is ordered after the stream's work and done (or staged) on return.
        flush(s);
        return f.apply(cu, args);
      }
      queues.get(s)!.push(() => { f.apply(cu, args); });
      return undefined;
    };
  }
  workLeft.set(out, () => left);
  return out as unknown as CudaAddon;
}

const workLeft = new WeakMap<object, () => number>();

/** Operations still queued on lazy streams of `cu` (from withLazyStreams) when they were disposed. */
export function lazyWorkLeftOnDispose(cu: CudaAddon): number {
  const f = workLeft.get(cu);
  if (!f) throw new TypeError('lazyWorkLeftOnDispose: not an addon from withLazyStreams');
  return f();
}
