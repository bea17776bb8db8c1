// The whole native surface of the addon in one typed interface. Everything the rest of expertd
// knows about native code is declared here; src/native/index.ts is the only file that loads it.
//
// Conventions: activations are Float32Array; bf16/f16 data travels as Uint16Array; small plans
// (ids, offsets, counts) are Int32Array. Shapes are given in comments as [rows, cols]. Argument
// errors throw TypeError/RangeError with code 'E_INVALID_ARG'; a disposed handle 'E_DISPOSED'.

export type DType = 'f32' | 'bf16' | 'f16';
/** A host KV cache array: Float32Array (f32), Uint16Array (bf16 bits), Uint8Array (fp8 e4m3 bits). */
export type KvArray = Float32Array | Uint16Array | Uint8Array;
export type SimdLevel = 'amx' | 'avx512bf16' | 'avx512' | 'avx2' | 'neon' | 'scalar';

export interface Capabilities {
  arch: 'x64' | 'arm64' | 'other';
  simd: SimdLevel;
  isa: {
    avx2: boolean; fma: boolean; f16c: boolean; avx512f: boolean; avx512bw: boolean;
    avx512vl: boolean; avx512bf16: boolean; avx512vnni: boolean; avx512vbmi: boolean;
    amxBf16: boolean; amxInt8: boolean; neon: boolean;
  };
  /** bf16 dot-product kernels are in use (fast mode runs at full speed). */
  bf16Dot: boolean;
  /**
   * Fast-mode bf16 DenseGemm / GroupGemm run on AMX tiles (tdpbf16ps), every call, one row
   * included (simd is then 'amx'); false: vdpbf16ps (bf16Dot) or the f32 kernels.
   */
  amxTiles: boolean;
  /**
   * int8 dot-product kernels (AVX512-VNNI vpdpbusd) run int8/int4 weights in
   * fast mode; without them the portable integer kernel computes the same numbers.
   */
  int8Dot: boolean;
  threads: number;
  hardwareThreads: number;
  build: 'portable' | 'full';
  cudaCompiled: boolean;
  cudaDevices: number;
  /**
   * Why cudaGetDeviceCount failed ("cudaErrorInsufficientDriver (CUDA driver version is insufficient
   * for CUDA runtime version)", "cudaErrorNoDevice (no CUDA-capable device is detected)"), or null when
   * it succeeded or the build has no CUDA.
   */
  cudaError: string | null;
  /** cudaDriverGetVersion (1000 * major + 10 * minor; 0: no driver, or no CUDA in the build). */
  cudaDriverVersion: number;
  /** cudaRuntimeGetVersion of the runtime linked in (0 without CUDA). */
  cudaRuntimeVersion: number;
  ncclFound: boolean;
  /** Built with Gloo: glooJoin (multi-process CPU ranks) works. */
  gloo: boolean;
}

/** Formats `--quantize` produces at load (MXFP4 is read from checkpoints only). */
export type QuantFormat = 'int8' | 'int4' | 'fp8';

/** An ordered list of weights for the pool's read-ahead (NativeAddon.prefetchList / prefetch). */
export interface PrefetchList { readonly __prefetchList: unique symbol }

/** A weight W[n, k] repacked once into the kernels' blocked layout (native memory). */
export interface PackedWeight {
  readonly n: number;
  readonly k: number;
  readonly dtype: DType;
  readonly kind: 'plain' | 'gate_up';
  /** Quantized storage (dtype is then 'f32', what the kernels compute in), or null. */
  readonly quant: QuantFormat | 'mxfp4' | null;
  /** Bytes held: elements or codes, plus scales. */
  readonly sizeBytes: number;
  readonly disposed: boolean;
  dispose(): void;
}

/** Per-layer expert slots: expert e -> (gate_up [2I, H], down [H, I]). */
export interface ExpertTable {
  readonly numExperts: number;
  set(expert: number, gateUp: PackedWeight, down: PackedWeight): void;
  clear(expert: number): void;
  has(expert: number): boolean;
  /** New handles sharing expert e's weights (dispose them when done), or null when the slot is empty. */
  get(expert: number): { gateUp: PackedWeight; down: PackedWeight } | null;
  dispose(): void;
}

export type WeightSource = Float32Array | Uint16Array;

export interface RouteOptions {
  scoring: 'softmax' | 'sigmoid';
  /** [E] score-correction bias, used to choose experts but not as weights (DeepSeek-V3). */
  bias?: Float32Array | null;
  /** Group-limited top-k when nGroup > 1. */
  nGroup?: number;
  topkGroup?: number;
  /** 'max' (DeepSeek-V2 group_limited_greedy) or 'top2sum' (DeepSeek-V3 noaux_tc). */
  groupScore?: 'max' | 'top2sum';
  renormalize?: boolean;
  scale?: number;
}

export interface AttentionOptions {
  numSeqs: number;
  heads: number;
  kvHeads: number;
  dk: number;
  dv: number;
  /** floats per kv head in vCache rows (default dv); MLA passes dk with vCache = kCache. */
  vStride?: number;
  vOffset?: number;
  blockSize: number;
  /** columns of blockTables */
  maxBlocks: number;
  scale: number;
  /** 0 = none */
  slidingWindow?: number;
  /** floats between token rows of q (default heads * dk) */
  qRowStride?: number;
  /**
   * fp8 caches only: static dequantisation scales per kv head ([kvHeads] f32, value = e4m3 x
   * scale). MLA (vCache = kCache) reads values with kScales.
   */
  kScales?: Float32Array;
  vScales?: Float32Array;
  /**
   * [heads] attention sinks (gpt-oss): a learned logit per query head in the softmax denominator
   * only, out = sum_j e^(s_j) v_j / (sum_j e^(s_j) + e^(sink)). Absent = none.
   */
  sinks?: Float32Array | null;
}

export interface CommGroup {
  readonly rank: number;
  readonly worldSize: number;
  readonly backend: 'loopback' | 'gloo' | 'nccl';
  /** Send sendBytes[r] bytes to rank r (consecutive in send), receive recvBytes[r] from each. */
  all2allv(send: Uint8Array, sendBytes: Float64Array, recv: Uint8Array, recvBytes: Float64Array): void;
  /** Exchange one value per peer: recv[r] = value this rank's index of rank r's send. */
  all2allCounts(send: Float64Array, recv: Float64Array): void;
  barrier(): void;
  /**
   * all2allv on the group's comm thread, after every collective queued before it (blocking ones
   * included); returns at once. send and recv must not be touched until the op is done.
   */
  all2allvAsync(send: Uint8Array, sendBytes: Float64Array, recv: Uint8Array, recvBytes: Float64Array): CommOp;
  /**
   * Benchmarks: every later all2allv also takes max(bytes to peers, bytes from peers) / bytesPerSecond,
   * slept on the thread that runs it (0: off).
   */
  setSimulatedLink(bytesPerSecond: number): void;
  dispose(): void;
}

/** A queued collective (CommGroup.all2allvAsync). */
export interface CommOp {
  /** Blocks until the op finished (throws its error, or after timeoutMs); seconds it took on the comm thread. */
  wait(timeoutMs: number): number;
  done(): boolean;
}

// --- CUDA (full build with EXPERTD_WITH_CUDA only; absent from the portable addon) ---------------
// Device data lives in CudaBuffer handles; ops take buffers plus dims, enqueue on a stream (the
// device's default stream when `stream` is omitted or null) and return at once. Activations are
// f32 buffers; GEMM operands bf16; plans (ids, offsets, counts, seqInfo, blockTables) int32.

/** Device memory from the caching allocator; dispose() returns it to the cache. */
export interface CudaBuffer {
  readonly sizeBytes: number;
  readonly device: number;
  readonly disposed: boolean;
  /** A handle on [offsetBytes, offsetBytes + sizeBytes) sharing this allocation. */
  view(offsetBytes: number, sizeBytes: number): CudaBuffer;
  dispose(): void;
}

export interface CudaStream {
  readonly disposed: boolean;
  synchronize(): void;
  /** true when all enqueued work is done */
  query(): boolean;
  waitEvent(event: CudaEvent): void;
  dispose(): void;
}

export interface CudaEvent {
  record(stream?: CudaStream | null): void;
  synchronize(): void;
  query(): boolean;
  /** this.elapsedMs(start): milliseconds between two timing events */
  elapsedMs(start: CudaEvent): number;
  dispose(): void;
}

/**
 * A quantized CudaExpertTable: each slot holds one buffer per matrix in the device layout of
 * native/include/expertd/cuda_quant.h (codes, then scales at a 16-byte boundary; written by
 * src/model/cuda-quant.ts). int8: one scale per output row (group 0); int4: group 32 or 128;
 * fp8: e4m3 with blockRows x group block scales (default 128 x 128); mxfp4: e2m1 with e8m0 per 32.
 */
export interface CudaQuantLayout {
  format: 'int8' | 'int4' | 'fp8' | 'mxfp4';
  group?: number;
  blockRows?: number;
  /** int8 / int4: the matrices carry zero points (AWQ, GPTQ sym false), value = (code - zero) * scale. */
  zeros?: boolean;
}

/**
 * Per-layer expert slots on the device: expert e -> (gate_up [2I, H] bf16, down [H, I] bf16), or
 * with `quant` the same matrices quantized (CudaQuantLayout; the GroupGemm dequantises them).
 */
export interface CudaExpertTable {
  readonly numExperts: number;
  /** The table's quantization (group and, for fp8, blockRows filled in), or null for bf16. */
  readonly quant: CudaQuantLayout | null;
  set(expert: number, gateUp: CudaBuffer, down: CudaBuffer): void;
  clear(expert: number): void;
  has(expert: number): boolean;
  dispose(): void;
}

export interface CudaDeviceInfo {
  name: string;
  computeCapability: string;
  smCount: number;
  totalBytes: number;
  l2Bytes: number;
  sharedMemPerBlockOptinBytes: number;
}

export interface CudaMemInfo {
  freeBytes: number; totalBytes: number;
  allocatedBytes: number; cachedBytes: number; peakBytes: number;
  deviceMallocs: number; cacheHits: number;
}

export interface CudaRouteOptions extends Omit<RouteOptions, 'bias'> {
  /** [E] f32 on the device */
  bias?: CudaBuffer | null;
}

export interface CudaAttentionOptions extends Omit<AttentionOptions, 'sinks'> {
  /**
   * [heads] f32 on the device: attention sinks (gpt-oss), in each row's softmax denominator only,
   * added once after the split-K merge. Absent = none.
   */
  sinks?: CudaBuffer | null;
  /**
   * Element type of kCache / vCache (default f32); fp8 takes opts.kScales / vScales (host arrays,
   * at most 256 kv heads: they travel by value in the kernel's arguments).
   */
  kvDtype?: 'f32' | 'bf16' | 'fp8';
  /** rows of q and out */
  totalTokens: number;
  /**
   * Must be >= every ctxLen in seqInfo: the engine computes it from its host copy of seqInfo (the
   * binding cannot read the device copy). It sizes the split-K grid; the kernel reads no key at or
   * past min(maxContext, maxBlocks * blockSize), so a larger ctxLen gives a wrong result (rows
   * left with no visible key come out NaN) but never a fault. The emulator throws E_CUDA for it.
   */
  maxContext: number;
  /** blocks in kCache/vCache */
  numBlocks: number;
}

export interface CudaCommGroup {
  readonly rank: number;
  readonly worldSize: number;
  readonly backend: 'nccl';
  /** Device buffers; enqueued on `stream` when given, else blocking on the group's own stream. */
  all2allv(send: CudaBuffer, sendBytes: Float64Array, recv: CudaBuffer, recvBytes: Float64Array,
           stream?: CudaStream | null): void;
  all2allCounts(send: Float64Array, recv: Float64Array): void;
  barrier(): void;
  dispose(): void;
}

/**
 * The sm_90a GroupGemm path (wgmma + TMA) on the current device: 'unchecked' (could run, its
 * one-time self-check against the mma.sync kernel has not run yet), 'passed', 'failed' (the check
 * disagreed or raised a CUDA error: mma.sync is kept for the process), 'unavailable' (not compute
 * capability 9.0, no sm_90a code, no device, or EXPERTD_DISABLE_SM90=1). reason says why.
 */
/**
 * GroupGemm tiles: 'small'/'large' mma.sync; 'sm90' the sm_90a wgmma + TMA kernel in grid order;
 * 'sm90-swizzle' the same kernel in group-M tile order within an expert (an expert's weight tile is
 * read by 8 row tiles close in time, from L2); 'sm90-persistent' one CTA per SM walking that order
 * (static tile scheduler, setmaxnreg). The two variants are opt-in only until measured on a GPU.
 */
export type CudaGemmTile = 'auto' | 'small' | 'large' | 'sm90' | 'sm90-swizzle' | 'sm90-persistent';

/**
 * Quantized tables (CudaQuantLayout): 'dequant' dequantises every weight to bf16 in registers for
 * bf16 mma.sync (sm_80+, every format); 'act' (fp8 tables with 128-column blocks, sm_89+) quantizes x
 * and h per (row, 128 k) to e4m3 and multiplies on FP8 tensor cores, DeepSeek-V3's recipe (contract:
 * native/include/expertd/cuda_quant.h); 'auto' is 'dequant' unless EXPERTD_FP8_ACT=1 and 'act' can run.
 */
export type CudaFp8Path = 'auto' | 'dequant' | 'act';

export interface CudaLibrary { path: string | null; tried: string[] }

export interface CudaGemmPaths {
  sm90: 'unchecked' | 'passed' | 'failed' | 'unavailable';
  reason?: string;
}

export interface CudaAddon {
  CudaBuffer: unknown;
  CudaStream: new (priority?: number) => CudaStream;
  CudaEvent: new (timing?: boolean) => CudaEvent;
  CudaExpertTable: new (numExperts: number, hidden: number, inter: number, quant?: CudaQuantLayout | null) => CudaExpertTable;
  cudaDeviceCount(): number;
  cudaDeviceInfo(device: number): CudaDeviceInfo;
  cudaSetDevice(device: number): void;
  /** A sticky CUDA error happened: the process must restart (/health answers 503). */
  cudaDeviceLost(): boolean;
  cudaSynchronize(): void;
  cudaMemInfo(): CudaMemInfo;
  cudaEmptyCache(): void;
  cudaBuffer(sizeBytes: number, stream?: CudaStream | null): CudaBuffer;
  /** Page-locked host memory (expert weights in RAM): async copies at full link speed. */
  cudaPinnedBuffer(sizeBytes: number): ArrayBuffer;
  cudaCopyToDevice(dst: CudaBuffer, dstOffsetBytes: number, src: ArrayBufferView | ArrayBuffer,
                   stream?: CudaStream | null): void;
  /** Synchronous for pageable dst; asynchronous into a cudaPinnedBuffer (sync the stream). */
  cudaCopyToHost(dst: ArrayBufferView | ArrayBuffer, src: CudaBuffer, srcOffsetBytes: number,
                 stream?: CudaStream | null): void;
  cudaCopyDevice(dst: CudaBuffer, dstOffsetBytes: number, src: CudaBuffer, srcOffsetBytes: number,
                 sizeBytes: number, stream?: CudaStream | null): void;
  /** Sets every byte (0xff poisons f32 and bf16 with NaN). */
  cudaFill(dst: CudaBuffer, byteValue: number, stream?: CudaStream | null): void;
  /** The cuBLASLt library loaded (its file), or null (DenseGemm then uses the in-house kernel). */
  cudaCublasLt(): string | null;
  /**
   * The run-time loaded libraries (loads them on first call): the file taken (null: none) and
   * every candidate tried, in order, with what happened ("<path>: loaded", "<path>: <dlerror>",
   * "<path>: has no <symbol>"). Order: $EXPERTD_CUBLASLT_SO / $EXPERTD_NCCL_SO; the pip wheels'
   * nvidia/cu13/lib and nvidia/<package>/lib under every Python site folder (PYTHONPATH, the
   * interpreters on PATH, venvs, the system's); then the loader path.
   */
  cudaLibraries(): { cublasLt: CudaLibrary; nccl: CudaLibrary };
  cudaConvert(src: CudaBuffer, srcDtype: DType, dst: CudaBuffer, dstDtype: DType, n: number,
              stream?: CudaStream | null): void;
  /**
   * x [rows, H] bf16, offsets [E+1] i32 (expert e owns rows [offsets[e], offsets[e+1]), E = the
   * table's numExperts) -> hScratch [rows, I] bf16, y [rows, H] f32. Only rows of experts with
   * weights in the table are written: an expert with rows but an empty slot, and rows past
   * offsets[E] (LongCat-Flash's identity experts, beyond the table, which the engine fills with
   * cudaCopyRowRange), keep their contents in hScratch and y. x and hScratch must start 16-byte
   * aligned, y 8-byte, offsets 4-byte (RangeError otherwise).
   * tile 'auto' picks the mma.sync tiles by shape, or the sm_90a wgmma kernel for prefill shapes once
   * its self-check passed (cudaGemmPaths); 'sm90' forces that kernel, 'sm90-swizzle' and
   * 'sm90-persistent' its variants (E_INVALID_ARG where unavailable; see CudaGemmTile).
   */
  cudaGroupGemmFfn(x: CudaBuffer, offsets: CudaBuffer, experts: CudaExpertTable, rows: number,
                   hScratch: CudaBuffer, y: CudaBuffer,
                   opts?: { tile?: CudaGemmTile; fp8Path?: CudaFp8Path } | null,
                   stream?: CudaStream | null): void;
  /** Whether the FP8-activation GroupGemm (CudaFp8Path 'act') can run on the current device. */
  cudaQuantPaths(): { fp8Act: boolean };
  /**
   * gpt-oss's experts in one call (two plain GroupGemm passes): guScratch [rows, 2I] f32 = x Wgu^T,
   * + opts.gateUpBias [E, 2I] ([gate (I) | up (I)] per expert), the clamped SwiGLU of
   * cudaClampedSwiglu -> hScratch [rows, I] bf16, y [rows, H] f32 = h Wdown^T + opts.downBias [E, H].
   * Roundings: each bias add and each activation step one f32 rounding; h rounded to bf16 once.
   * Same empty-slot contract as cudaGroupGemmFfn. x and hScratch 16-byte aligned, guScratch and y 8.
   * A quantized table (--quantize) runs the dequantising GroupGemm's plain passes: each weight
   * bf16(f32(code x scale)), then the same arithmetic (its FP8-activation path is not used here).
   */
  cudaGroupGemmBiasedFfn(x: CudaBuffer, offsets: CudaBuffer, experts: CudaExpertTable, rows: number,
                         guScratch: CudaBuffer, hScratch: CudaBuffer, y: CudaBuffer,
                         opts: { gateUpBias: CudaBuffer; downBias: CudaBuffer; alpha: number; limit: number },
                         stream?: CudaStream | null): void;
  /** State of the GroupGemm kernel paths on the current device (see CudaGemmPaths). */
  cudaGemmPaths(): CudaGemmPaths;
  /**
   * Runs the sm_90a self-check now when it has not run on the current device, and returns the
   * verdict (as cudaGemmPaths). Call it before forcing an sm90 tile: a broken kernel then shows as
   * 'failed' with a reason, from a small problem, rather than as a fault in the forced call.
   */
  cudaSm90SelfCheck(): CudaGemmPaths;
  /**
   * y [m, n] f32 (+)= x [m, k] bf16 * w [n, k]^T bf16 (+ bias [n] f32); returns the backend used.
   * x, w, y and bias must start 16-byte aligned (RangeError otherwise).
   */
  cudaDenseGemm(x: CudaBuffer, m: number, w: CudaBuffer, n: number, k: number, y: CudaBuffer,
                bias: CudaBuffer | null, accumulate: boolean,
                backend?: 'auto' | 'cublaslt' | 'kernel' | null,
                stream?: CudaStream | null): 'cublaslt' | 'kernel';
  /**
   * --quantize-dense: y [m, n] f32 (+)= x [m, k] bf16 * W^T (+ bias [n] f32), W [n, k] one matrix in
   * quant's layout (cuda_quant.h; not gate_up), each weight dequantised to bf16(f32(code x scale)) as
   * the quantized GroupGemm does, f32 accumulate; epilogue (acc + bias) + old y, each an f32 add.
   * k a multiple of 16 (8-bit codes) or 32 (4-bit), n even; x and w 16-byte aligned, y 8, bias 4.
   */
  cudaDenseGemmQuant(x: CudaBuffer, m: number, w: CudaBuffer, n: number, k: number, quant: CudaQuantLayout,
                     y: CudaBuffer, bias: CudaBuffer | null, accumulate: boolean, stream?: CudaStream | null): void;
  cudaRoute(logits: CudaBuffer, t: number, e: number, k: number, opts: CudaRouteOptions,
            ids: CudaBuffer, weights: CudaBuffer, counts: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * x [t, h] f32 -> xPerm [t*k, h] (permDtype) grouped by expert, stable (expert, token, slot);
   * permIndex [t*k] i32 = the xPerm row of each (token, slot); offsets [e+1] i32. An id outside
   * 0..e-1 (device data: not checked before the launch) is skipped: it gets permIndex -1 and no
   * row, offsets count the valid ids only (offsets[e] <= t*k), and rows from offsets[e] on stay
   * unwritten.
   */
  cudaPermute(x: CudaBuffer, t: number, h: number, ids: CudaBuffer, k: number, e: number,
              xPerm: CudaBuffer, permIndex: CudaBuffer, offsets: CudaBuffer, permDtype: 'f32' | 'bf16',
              stream?: CudaStream | null): void;
  /**
   * Act-order experts: out [rows, h] bf16 = x [rows, h] bf16 (expert-contiguous by offsets [e+1] i32) with
   * each row's columns in its expert's input order, out[r, j] = x[r, perm[ex * h + j]] (perm [e, h] i32,
   * every entry in 0..h-1: device data, not checked); rows from offsets[e] on are copied. offsets null (e
   * must be 1): every row in perm's order (a dense Linear's act-order input). out must not be x.
   */
  cudaGatherExpertColumns(x: CudaBuffer, offsets: CudaBuffer | null, e: number, rows: number, h: number, perm: CudaBuffer,
                          out: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * out [t, h] (+)= sum over slots j of weights[t, j] * yPerm[permIndex[t, j]] (f32; no FMA, slot
   * order). A slot whose permIndex is outside 0..t*k-1 (permute's -1) adds nothing; a token
   * with no valid slot gets 0.
   */
  cudaUnpermuteCombine(yPerm: CudaBuffer, permIndex: CudaBuffer, weights: CudaBuffer, t: number,
                       k: number, h: number, out: CudaBuffer, accumulate: boolean,
                       stream?: CudaStream | null): void;
  cudaRmsNorm(x: CudaBuffer, rows: number, dim: number, w: CudaBuffer, eps: number, out: CudaBuffer,
              residual: CudaBuffer | null, stream?: CudaStream | null): void;
  /**
   * causalConv1dBatch on the device: x, out [t, c] f32, weight [c, k], bias [c] | null, statePool
   * [slots, c, k-1]; slots [numSeqs] and seqStarts [numSeqs+1] are device int32 buffers (a slot
   * outside the pool or a sequence outside 0..t traps: the device is lost). k <= 64.
   */
  cudaCausalConv1d(x: CudaBuffer, t: number, c: number, weight: CudaBuffer, bias: CudaBuffer | null,
                   k: number, statePool: CudaBuffer, slots: CudaBuffer, seqStarts: CudaBuffer,
                   numSeqs: number, silu: boolean, out: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * gatedDeltaRuleBatch on the device (statePool [slots, Hv, Dk, Dv]; slots and seqStarts as
   * cudaCausalConv1d); Dk <= 256. A sequence of n >= opts.chunk tokens runs chunkwise (floor(n /
   * chunk) whole chunks, then the recurrence for the tail); decode steps and shorter sequences run the
   * recurrence. chunk 1, and a chunk whose kernel would need more than 96 KiB of shared memory
   * (chunk 64 fits Dk <= 139, chunk 32 every Dk), run the recurrence for every token.
   * seqLens [numSeqs] (optional, host): the lengths seqStarts gives, a launch hint: without it the
   * chunked kernel is launched whenever T >= opts.chunk (its blocks for short sequences return at
   * once); with it only when some entry is >= chunk (an understated length runs that sequence by
   * the recurrence). RangeError for an entry outside 0..T or a length other than numSeqs.
   */
  cudaGatedDeltaRule(q: CudaBuffer, k: CudaBuffer, v: CudaBuffer, g: CudaBuffer, beta: CudaBuffer,
                     statePool: CudaBuffer, slots: CudaBuffer, seqStarts: CudaBuffer, numSeqs: number,
                     out: CudaBuffer, opts: DeltaRuleOptions, stream?: CudaStream | null,
                     seqLens?: Int32Array | null): void;
  /** gatedRmsNorm on the device. */
  cudaGatedRmsNorm(x: CudaBuffer, z: CudaBuffer, weight: CudaBuffer, eps: number, rows: number, d: number,
                   out: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * Rotates columns [offset + h * headStride, + rotDim) of each row of x [t, rowStride] f32 for
   * h < heads, in place. rotDim is even and <= 4096 (cos/sin in shared memory); heads rotate in
   * parallel, so headStride >= rotDim when heads > 1 (RangeError otherwise).
   */
  cudaRope(x: CudaBuffer, t: number, heads: number, rowStride: number, headStride: number,
           offset: number, positions: CudaBuffer, invFreq: CudaBuffer, rotDim: number,
           attnScale: number, interleaved: boolean, stream?: CudaStream | null): void;
  cudaSiluMul(gu: CudaBuffer, t: number, i: number, out: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * gpt-oss: out [t, i] f32 = (clamp(up, -limit, limit) + 1) * g / (1 + e^(-alpha g)), g = min(gate,
   * limit), from gu [t, gate (i) | up (i)] f32; every operation one f32 rounding.
   */
  cudaClampedSwiglu(gu: CudaBuffer, t: number, i: number, alpha: number, limit: number, out: CudaBuffer,
                    stream?: CudaStream | null): void;
  cudaEmbedding(table: CudaBuffer, dtype: DType, v: number, h: number, ids: CudaBuffer, t: number,
                out: CudaBuffer, stream?: CudaStream | null): void;
  cudaSoftmax(x: CudaBuffer, rows: number, cols: number, out: CudaBuffer, log: boolean,
              stream?: CudaStream | null): void;
  cudaTopN(x: CudaBuffer, rows: number, cols: number, n: number, ids: CudaBuffer, vals: CudaBuffer,
           stream?: CudaStream | null): void;
  /**
   * The batched sampler over logits [rows, vocabSize] f32 on the device (sampleBatch's arguments
   * otherwise): one copy up, one kernel, one copy down; returns with out and batch.rngState filled.
   */
  cudaSampleBatch(logits: CudaBuffer, rows: number, vocabSize: number, batch: SampleBatchArgs,
                  out: SampleBatchOut, stream?: CudaStream | null): void;
  /**
   * numSlots = numBlocks * blockSize of the caches. kvDtype (default f32) is the caches' element
   * type, rounded as kvCacheWrite does; fp8 takes kScales (and vScales with v), host [kvHeads].
   */
  cudaKvCacheWrite(k: CudaBuffer, v: CudaBuffer | null, t: number, slots: CudaBuffer,
                   kCache: CudaBuffer, vCache: CudaBuffer | null, kvHeads: number, dk: number,
                   dv: number, vStride: number, numSlots: number, stream?: CudaStream | null,
                   kvDtype?: 'f32' | 'bf16' | 'fp8', kScales?: Float32Array | null,
                   vScales?: Float32Array | null): void;
  cudaPagedAttention(q: CudaBuffer, kCache: CudaBuffer, vCache: CudaBuffer, seqInfo: CudaBuffer,
                     blockTables: CudaBuffer, opts: CudaAttentionOptions, out: CudaBuffer,
                     stream?: CudaStream | null): void;
  // --- glue for the device engine (small kernels; semantics fixed by test/cuda.test.ts)
  /**
   * Reference-precision GEMM on CUDA cores (routers, gates, odd shapes): y [m, n] f32 (+)=
   * x [m, k] f32 * w [n, k]^T (w f32 or bf16) (+ bias [n] f32); any m, n, k. Per output: the f32
   * products x*w summed in double, then s = (accumulate ? y : 0) + bias + sum in double, in that
   * order, rounded to f32 once.
   */
  cudaGemmF32(x: CudaBuffer, m: number, w: CudaBuffer, wDtype: 'f32' | 'bf16', n: number, k: number,
              y: CudaBuffer, bias: CudaBuffer | null, accumulate: boolean, stream?: CudaStream | null): void;
  /** y[i] += x[i] for i < n (f32). */
  cudaAdd(y: CudaBuffer, x: CudaBuffer, n: number, stream?: CudaStream | null): void;
  /**
   * out [t, h] += sigmoid(gate[t]) * y [t, h] (f32; Qwen2-MoE's shared-expert gate): sigmoid as
   * 1 / (1 + exp(-g)), product and sum in double, rounded to f32 once.
   */
  cudaGatedAdd(out: CudaBuffer, y: CudaBuffer, gate: CudaBuffer, t: number, h: number,
               stream?: CudaStream | null): void;
  /** x[i] = min(max(x[i], -limit), limit) for i < n (f32; OLMoE's clip_qkv; NaN kept; limit >= 0). */
  cudaClamp(x: CudaBuffer, n: number, limit: number, stream?: CudaStream | null): void;
  /**
   * x[i] *= sigmoid(gate[i]) for i < n (f32; Qwen3-Next's attention output gate): sigmoid as
   * 1 / (1 + exp(-g)) and the product in double, rounded to f32 once (the CPU engine's arithmetic).
   */
  cudaSigmoidMul(x: CudaBuffer, gate: CudaBuffer, n: number, stream?: CudaStream | null): void;
  /**
   * Gated DeltaNet's per-head gates from ba [t, b (hv) | a (hv)] f32: beta [t, hv] = sigmoid(b), g [t, hv]
   * = negA * softplus(f32(a + dtBias)) (negA = -exp(A_log), dtBias: [hv] f32; softplus with torch's
   * threshold 20), in double, each rounded to f32 once (the CPU engine's arithmetic).
   */
  cudaDeltaGates(ba: CudaBuffer, t: number, hv: number, negA: CudaBuffer, dtBias: CudaBuffer, g: CudaBuffer,
                 beta: CudaBuffer, stream?: CudaStream | null): void;
  /**
   * rows x widthBytes from src (pitch srcPitchBytes) to dst (pitch dstPitchBytes): strided slices.
   * widthBytes <= both pitches; the slices must not overlap.
   */
  cudaCopy2D(dst: CudaBuffer, dstOffsetBytes: number, dstPitchBytes: number, src: CudaBuffer,
             srcOffsetBytes: number, srcPitchBytes: number, widthBytes: number, rows: number,
             stream?: CudaStream | null): void;
  /**
   * Copies rows [offsets[lo], offsets[hi]) of src to the same rows of dst (rowBytes each), the
   * range read on the device from offsets (i32); maxRows bounds it (identity experts' rows): both
   * ends are clamped to [0, maxRows], and an empty or reversed range copies nothing.
   */
  cudaCopyRowRange(dst: CudaBuffer, src: CudaBuffer, offsets: CudaBuffer, lo: number, hi: number,
                   rowBytes: number, maxRows: number, stream?: CudaStream | null): void;
  /** 128 bytes that rank 0 creates and the rendezvous hands to every rank. */
  cudaNcclUniqueId(): Uint8Array;
  /**
   * Blocks until worldSize ranks have joined (run it in a worker), at most timeoutMs (default 600000;
   * then E_COMM, the communicator aborted). timeoutMs also bounds every later collective of the
   * group: one that does not finish in time aborts the group (E_COMM then, and on every later call).
   */
  cudaNcclJoin(uniqueId: Uint8Array, worldSize: number, rank: number, timeoutMs?: number): CudaCommGroup;
}

/** A byte range of a file (a checkpoint tensor, or one expert's slice of a fused tensor). */
export interface FileRange {
  path: string;
  offset: number;
  sizeBytes: number;
}

/**
 * One expert cache slot fill: gate [I, H], up [I, H], down [H, I] row-major in `dtype` read from
 * the files, repacked into dst.gateUp ([2I, H] gate_up) and dst.down ([H, I] plain) in place.
 */
/**
 * One slot fill: gate [I, H], up [I, H], down [H, I] rows; or (layout 'gpt_oss') the checkpoint's
 * gateUp [H, 2I] (gate = even columns, up = odd) and down [I, H], rearranged on the copy thread.
 */
export interface ExpertLoadJob {
  layout?: 'rows' | 'gpt_oss';
  gate?: FileRange;
  up?: FileRange;
  gateUp?: FileRange;
  down: FileRange;
  dtype: DType;
  dst: { gateUp: PackedWeight; down: PackedWeight };
  /** Higher runs first; FIFO among equals. Infinity: a demand miss. */
  priority: number;
  /** SIMULATION: the copy thread also sleeps this long after the load (a host-to-device link). */
  delayUs?: number;
  /**
   * An FP8 checkpoint's expert kept in FP8: gate/up/down are e4m3 codes, these their scale ranges
   * (weight_scale_inv / weight_scale; fp8Scales says how they are stored); dst are fp8 weights of
   * group bc; dtype is ignored.
   */
  fp8Block?: [number, number];
  gateScale?: FileRange;
  upScale?: FileRange;
  downScale?: FileRange;
  /**
   * How the *Scale ranges hold the scales: dtype 'f32' (default), 'bf16' or 'f16'; form 'grid'
   * (default: [ceil(rows / br), ceil(cols / bc)]), 'channel' (one per output row; fp8Block rows 1)
   * or 'tensor' (one per matrix), spread onto the grid on the copy thread.
   */
  fp8Scales?: { dtype?: 'f32' | 'bf16' | 'f16'; form?: 'grid' | 'channel' | 'tensor' };
}

export interface ExpertLoaderStats {
  /** Copy thread busy: reads + repack + simulated sleeps. */
  busySeconds: number;
  readSeconds: number;
  simulatedSeconds: number;
  jobsDone: number;
  bytesRead: number;
}

/**
 * A copy thread of its own (not the compute pool) that runs expert loads in priority order.
 * NOTE: a slot whose load is in flight must not be read (bound into a table, computed with)
 * before wait() returns for its ticket.
 */
export interface ExpertLoader {
  /** Queues a load; returns its ticket. Never blocks. */
  submit(job: ExpertLoadJob): number;
  /** True when the load finished (or failed). */
  poll(ticket: number): boolean;
  /**
   * Blocks until the load is done, raising it to the top priority if it has not started, and
   * forgets the ticket. Returns null, or the error text when the read or repack failed.
   */
  wait(ticket: number): string | null;
  /** Drops a load that has not started (true; the ticket is forgotten); false when running or done. */
  cancel(ticket: number): boolean;
  /** Loads queued or running. */
  readonly inFlight: number;
  stats(): ExpertLoaderStats;
  readonly disposed: boolean;
  /** Finishes the running load, drops the queued ones, joins the thread. */
  dispose(): void;
}

/**
 * The rows of one sampler call. Lists are CSR: row r's entries are [offsets[r], offsets[r+1]).
 */
export interface SampleBatchArgs {
  /** [rows, 8] f64: temperature, topP, topK, minP, repetitionPenalty, presencePenalty,
   *  frequencyPenalty, numTopLogprobs (-1 = no logprobs). */
  params: Float64Array;
  /** [rows, 4] xoshiro128** states (Rng.getState), advanced in place. */
  rngState: Uint32Array;
  biasOffsets: Int32Array; biasIds: Int32Array; biasValues: Float32Array;
  /** Distinct ids of prompt and output (repetition penalty). */
  seenOffsets: Int32Array; seenIds: Int32Array;
  /** Distinct output ids and their counts (presence / frequency penalties). */
  countOffsets: Int32Array; countIds: Int32Array; countValues: Int32Array;
  /** [masks, ceil(V/32)] grammar bitmasks (bit set = allowed) and each row's mask (-1 = none). */
  bitmask?: Int32Array | null;
  bitmaskRows?: Int32Array | null;
}

export interface SampleBatchOut {
  tokenIds: Int32Array;       // [rows]
  logprobs: Float64Array;     // [rows] (NaN where not requested)
  topIds: Int32Array;         // [rows, 20]
  topLogprobs: Float64Array;  // [rows, 20]
  topCounts: Int32Array;      // [rows]
}

/**
 * Shapes of one gatedDeltaRule call (the field's letters: T tokens, Hk q/k heads, Hv v heads, Dk,
 * Dv head dims). Hv is a multiple of Hk; v head h reads q/k head h / (Hv / Hk) (HF's
 * repeat_interleave).
 */
export interface DeltaRuleOptions {
  T: number;
  Hk: number;
  Hv: number;
  Dk: number;
  Dv: number;
  /** q, k = x * rsqrt(sum(x^2) + 1e-6) before use (Qwen3-Next: true). */
  l2normQk: boolean;
  /** Chunk length of the chunkwise (T > 1) algorithm, 1..256; default 64. */
  chunk?: number;
  /** Floats between token rows of q / k / v (default Hk*Dk, Hk*Dk, Hv*Dv): lets q, k and v be
   * column slices (subarray) of one mixed_qkv [T, 2*Hk*Dk + Hv*Dv] buffer, without copies. */
  qStride?: number;
  kStride?: number;
  vStride?: number;
}

/** CUDA members are present only in a full build (capabilities().cudaCompiled). */
export interface NativeAddon extends Partial<CudaAddon> {
  // --- core
  capabilities(): Capabilities;
  /** 0 = all hardware threads; returns the count in use. */
  setNumThreads(threads: number): number;
  /**
   * Forces a dispatch level (tests, benchmarks): 'scalar' the portable kernels, 'avx2' AVX2 + FMA
   * with every AVX-512 bit off (the GEMM kernels of CPUs without AVX-512), 'avx512' AVX-512
   * without bf16 or int8 dot products, 'avx512bf16' bf16 dot products without AMX tiles or int8 dot
   * products, 'noamx' everything the CPU has but AMX tiles (fast-mode bf16 GEMMs on vdpbf16ps),
   * 'amx' everything the CPU has, AMX tiles included; 'auto' is 'amx' when the process started with
   * EXPERTD_AMX=1 (AMX tiles are opt-in: prefill 2-4x faster, decode batch 1 15-35% slower on the
   * bench models), else 'noamx'. A level only takes away. Returns the level now in effect.
   */
  setSimdLevel(level: 'auto' | 'scalar' | 'avx2' | 'avx512' | 'avx512bf16' | 'noamx' | 'amx'): SimdLevel;
  /** A zeroed, 64-byte aligned buffer owned by native code. */
  allocHostBuffer(sizeBytes: number): ArrayBuffer;

  // --- weights and GEMMs
  /**
   * src [n, k] row-major in `dtype` -> packed weight. With `format`, quantized at load: int8
   * (symmetric, one scale per output row when group is 0), int4 (symmetric, groups of `group` k,
   * 32 or 128), fp8 e4m3 (absmax/448 block scales of 128 rows x `group` k, as FP8 checkpoints);
   * the kernels read it directly (activations f32).
   */
  packWeight(src: WeightSource, dtype: DType, n: number, k: number, format?: QuantFormat, group?: number): PackedWeight;
  /** gate [i, h], up [i, h] -> one gate_up weight of n = 2i (SiLU(gate)*up fused downstream). */
  packGateUp(gate: WeightSource, up: WeightSource, dtype: DType, i: number, h: number,
             format?: QuantFormat, group?: number): PackedWeight;
  /**
   * An FP8 checkpoint weight kept in FP8: codes [n, k] e4m3fn, scaleInv [ceil(n/br), ceil(k/bc)]
   * f32 (weight_scale_inv). With upCodes/upScaleInv (same shapes) the result is a gate_up weight
   * of 2n rows.
   */
  packFp8(codes: Uint8Array, scaleInv: Float32Array, n: number, k: number, br: number, bc: number,
          upCodes?: Uint8Array | null, upScaleInv?: Float32Array | null): PackedWeight;
  /**
   * An MXFP4 checkpoint weight kept in MXFP4: blocks [n, k/32, 16] (two e2m1 per byte, low nibble
   * first), scales [n, k/32] e8m0. With the up pair: a gate_up weight of 2n rows.
   */
  packMxfp4(blocks: Uint8Array, scales: Uint8Array, n: number, k: number,
            upBlocks?: Uint8Array | null, upScales?: Uint8Array | null): PackedWeight;
  /** Re-packs new MXFP4 contents (packMxfp4's arrays) into an MXFP4 weight of the same geometry
   * (expert cache slots of an MXFP4 checkpoint); a gate_up weight needs the up pair. */
  repackMxfp4Into(dst: PackedWeight, blocks: Uint8Array, scales: Uint8Array,
                  upBlocks?: Uint8Array | null, upScales?: Uint8Array | null): void;
  /**
   * An int8 / int4 weight quantized elsewhere (compressed-tensors checkpoints) kept as its codes:
   * codes [n, k] one signed value per element (int4: -8..7), scales [n, ceil(k / group)] f32 (int8:
   * group 0, one scale per row, scales [n]); value = code * scale, or (code - zero) * scale with
   * zeros (Int8Array laid out as the scales: AWQ, asymmetric GPTQ); perm [k]: the input order of the
   * codes' columns (act-order GPTQ; DenseGemm and GroupGemm's gate_up pass gather x by it). With upCodes/upScales (same
   * shapes) the result is a gate_up weight of 2n rows. scaleDtype: how an int4 weight holds its
   * scales ('f32' by default; 'bf16' / 'f16' take half the bytes and need every scale exact in that
   * dtype, as a checkpoint's bf16 / f16 scales are); int8 keeps f32.
   */
  packInt(codes: Int8Array, scales: Float32Array, n: number, k: number, format: 'int8' | 'int4', group: number,
          upCodes?: Int8Array | null, upScales?: Float32Array | null, scaleDtype?: DType,
          zeros?: Int8Array | null, upZeros?: Int8Array | null, perm?: Int32Array | null): PackedWeight;
  /** packInt's arrays into an existing int8 / int4 weight of the same geometry and group (expert
   * cache slots), in place; a gate_up weight needs the up pair, a weight with zero points its zeros. */
  repackIntInto(dst: PackedWeight, codes: Int8Array, scales: Float32Array,
                upCodes?: Int8Array | null, upScales?: Float32Array | null,
                zeros?: Int8Array | null, upZeros?: Int8Array | null, perm?: Int32Array | null): void;
  /** Re-packs new contents into an existing weight of the same geometry (expert cache slots; a
   * quantized slot re-quantizes them). */
  repackInto(dst: PackedWeight, src: WeightSource, dtype: DType, up?: WeightSource | null): void;
  /** packFp8's contents into an existing fp8 weight of group bc (expert cache slots), in place. */
  repackFp8Into(dst: PackedWeight, codes: Uint8Array, scaleInv: Float32Array, br: number, bc: number,
                upCodes?: Uint8Array | null, upScaleInv?: Float32Array | null): void;
  /** Reads element (row, col) of a packed weight as a number (tests). */
  packedWeightAt(w: PackedWeight, row: number, col: number): number;
  /** y[m, n] (+)= x[m, k] * w^T (+ bias[n]). fast: bf16 dot products (fast mode). */
  denseGemm(x: Float32Array, m: number, w: PackedWeight, y: Float32Array,
            bias: Float32Array | null, accumulate: boolean, fast: boolean): void;
  /**
   * The weights some GEMMs read, in that order, as a list for prefetch(). It holds them weakly
   * (disposing one frees it as usual; the list then skips it).
   */
  prefetchList(...weights: PackedWeight[]): PrefetchList;
  /**
   * The pool's idle workers read `list` into the cache, in order, while this thread runs the serial
   * code between GEMMs (a decode step's norms, rope, routing, JS). Replaces the previous hint (null
   * clears it); parts the last hints or GEMMs read are skipped. Results never depend on it.
   */
  prefetch(list: PrefetchList | null): void;
  /** Bytes the pool's workers have read for prefetch() hints since the process started. */
  prefetchedBytes(): number;
  /**
   * What the packed weights' host allocator holds: weights of 8 MiB and more get their own 2 MiB-aligned
   * mapping (dedicated), the others share 32 MiB chunks; both advised MADV_HUGEPAGE (hugePages: the
   * kernel accepted that once). Linux only; zeros elsewhere.
   */
  weightMemory(): { chunks: number; dedicated: number; mappedBytes: number; liveBytes: number;
    liveAllocations: number; hugePages: boolean };
  /** Fused expert FFN: rows [offsets[e], offsets[e+1]) of x go through expert e. x, y [rows, H]. */
  groupGemmFfn(x: Float32Array, offsets: Int32Array, experts: ExpertTable, y: Float32Array,
               fast: boolean): void;
  ExpertTable: new (numExperts: number, hidden: number, inter: number) => ExpertTable;

  // --- MoE routing and permutation
  /** logits [t, e] -> ids [t, k], weights [t, k], counts [e]. */
  route(logits: Float32Array, t: number, e: number, k: number, opts: RouteOptions,
        ids: Int32Array, weights: Float32Array, counts: Int32Array): void;
  /** x [t, h] -> xPerm [t*k, h] expert-contiguous; permIndex [t*k]; offsets [e+1]. */
  permute(x: Float32Array, t: number, h: number, ids: Int32Array, k: number, e: number,
          xPerm: Float32Array, permIndex: Int32Array, offsets: Int32Array): void;
  /** out[t] (+)= sum_j weights[t, j] * yPerm[permIndex[t*k + j]]. */
  unpermuteCombine(yPerm: Float32Array, permIndex: Int32Array, weights: Float32Array,
                   t: number, k: number, h: number, out: Float32Array, accumulate: boolean): void;

  // --- elementwise
  /** out = rmsnorm(x) * w per row; with residual: residual += x, out = rmsnorm(residual) * w. */
  rmsNorm(x: Float32Array, rows: number, dim: number, w: Float32Array, eps: number,
          out: Float32Array, residual: Float32Array | null): void;
  /** In place on x viewed as [t][heads] with rowStride/headStride; dims [offset, offset+rotDim). */
  rope(x: Float32Array, t: number, heads: number, rowStride: number, headStride: number,
       offset: number, positions: Int32Array, invFreq: Float32Array, attnScale: number,
       interleaved: boolean): void;
  /** gu [t, 2i] (gate | up) -> out [t, i]. */
  siluMul(gu: Float32Array, t: number, i: number, out: Float32Array): void;
  /** table [v, h] (checkpoint dtype) gathered at ids -> out [t, h] f32. */
  embedding(table: WeightSource, dtype: DType, v: number, h: number, ids: Int32Array,
            out: Float32Array): void;
  softmax(x: Float32Array, rows: number, cols: number, out: Float32Array, log: boolean): void;
  /** n largest per row, descending, ties to the lower index. */
  topN(x: Float32Array, rows: number, cols: number, n: number, ids: Int32Array,
       vals: Float32Array): void;
  /** Element conversion between f32 (Float32Array) and bf16/f16 (Uint16Array). */
  convert(src: WeightSource, srcDtype: DType, dst: WeightSource, dstDtype: DType): void;
  /** fp8 e4m3 [rows, cols] with block scales [ceil(rows/br), ceil(cols/bc)] -> bf16. */
  dequantFp8(src: Uint8Array, scaleInv: Float32Array, rows: number, cols: number,
             blockRows: number, blockCols: number, dst: Uint16Array): void;

  // --- Gated DeltaNet (Qwen3-Next / Qwen3.5 linear attention; f32)
  /**
   * Depthwise causal conv over time: x [t, c], weight [c, k], bias [c] | null, convState [c, k-1]
   * in/out (the last k-1 inputs per channel, oldest first; zeros for a new sequence) -> out [t, c]
   * (SiLU applied when silu). Calls continue a sequence: split calls equal one call bit for bit.
   * out may be x. k <= 64.
   */
  causalConv1d(x: Float32Array, t: number, c: number, weight: Float32Array,
               bias: Float32Array | null, k: number, convState: Float32Array, silu: boolean,
               out: Float32Array): void;
  /**
   * causalConv1d over a batch: sequence b owns rows [seqStarts[b], seqStarts[b+1]) of x and out
   * and the state at statePool[slots[b] * c * (k-1)...]; slots distinct. Each sequence gets the
   * bits it would get alone.
   */
  causalConv1dBatch(x: Float32Array, t: number, c: number, weight: Float32Array,
                    bias: Float32Array | null, k: number, statePool: Float32Array, slots: Int32Array,
                    seqStarts: Int32Array, silu: boolean, out: Float32Array): void;
  /**
   * Gated delta rule of one sequence: q, k [T, Hk, Dk], v [T, Hv, Dv], g [T, Hv] (log decay),
   * beta [T, Hv], state [Hv, Dk, Dv] in/out (HF's recurrent_state), out [T, Hv, Dv]. q is scaled
   * by Dk^-0.5. T == 1 is the recurrent (decode) step, T > 1 the chunkwise algorithm.
   */
  gatedDeltaRule(q: Float32Array, k: Float32Array, v: Float32Array, g: Float32Array,
                 beta: Float32Array, state: Float32Array, out: Float32Array,
                 opts: DeltaRuleOptions): void;
  /**
   * gatedDeltaRule over a batch (opts.T = all tokens): sequence b owns token rows
   * [seqStarts[b], seqStarts[b+1]) and the state at statePool[slots[b] * Hv*Dk*Dv...]; slots
   * distinct. Threaded over (sequence, head); each sequence gets the bits it would get alone.
   */
  gatedDeltaRuleBatch(q: Float32Array, k: Float32Array, v: Float32Array, g: Float32Array,
                      beta: Float32Array, statePool: Float32Array, slots: Int32Array,
                      seqStarts: Int32Array, out: Float32Array, opts: DeltaRuleOptions): void;
  /** Qwen3NextRMSNormGated: out = (weight * (x * rsqrt(mean(x^2) + eps))) * SiLU(z) per row of d
   * (the weight as is, not 1 + w). x, z, out [rows, d]; out may be x. */
  gatedRmsNorm(x: Float32Array, z: Float32Array, weight: Float32Array, eps: number, rows: number,
               d: number, out: Float32Array): void;

  // --- sampling
  /**
   * One engine step's sampler over logits [rows, vocabSize] (src/engine/batch-sampler.ts builds
   * the arguments); threaded over rows; advances batch.rngState in place.
   */
  sampleBatch(logits: Float32Array, rows: number, vocabSize: number, batch: SampleBatchArgs,
              out: SampleBatchOut): void;

  // --- attention
  /**
   * k [t, kvHeads, dk], v [t, kvHeads, dv] (or null for MLA) into cache slots. The cache's element
   * type is its array's: Float32Array f32, Uint16Array bf16 (nearest even), Uint8Array fp8 e4m3
   * (e4m3(x / scale), nearest even, saturated to +-448; kScales / vScales [kvHeads] required).
   */
  kvCacheWrite(k: Float32Array, v: Float32Array | null, t: number, slots: Int32Array,
               kCache: KvArray, vCache: KvArray | null, kvHeads: number, dk: number,
               dv: number, vStride: number, kScales?: Float32Array | null,
               vScales?: Float32Array | null): void;
  /**
   * seqInfo [numSeqs, 3] = (qStart, qLen, ctxLen); blockTables [numSeqs, maxBlocks]. kCache and
   * vCache hold f32, bf16 or fp8 (as in kvCacheWrite), read directly.
   */
  pagedAttention(q: Float32Array, kCache: KvArray, vCache: KvArray,
                 seqInfo: Int32Array, blockTables: Int32Array, opts: AttentionOptions,
                 out: Float32Array): void;

  // --- I/O
  /** Maps a file read-only; the ArrayBuffer unmaps when collected. */
  mmapFile(path: string): ArrayBuffer;
  /** Releases a mmapFile mapping's resident pages (MADV_DONTNEED; later reads fault them back). */
  dropMappedPages(buffer: ArrayBuffer): void;
  /** pread of length bytes at offset into dst (real I/O, no mapping). */
  readFileRange(path: string, offset: number, dst: Uint8Array): void;

  // --- expert loader (the offloader's copy thread)
  ExpertLoader: new () => ExpertLoader;
  /** A zero weight of the given geometry: an expert cache slot for an ExpertLoader to fill. */
  allocPackedWeight(dtype: DType, kind: 'plain' | 'gate_up', n: number, k: number,
                    format?: QuantFormat, group?: number): PackedWeight;

  // --- comm
  /** Joins an in-process loopback group (blocks until worldSize ranks joined or timeout). */
  loopbackJoin(group: string, worldSize: number, rank: number, timeoutMs: number): CommGroup;
  /**
   * Joins a multi-process CPU group over Gloo (TCP), rendezvous through the StoreServer
   * (src/dist/store.ts) at host:port. NOTE: blocks the calling thread until every rank has
   * connected, so call it in a worker thread or a rank process, never on a thread that must serve
   * the store or HTTP. Fails with code E_COMM within timeoutMs if a rank does not come, and every
   * later collective fails with E_COMM within timeoutMs of a peer being lost; E_UNSUPPORTED when
   * the build has no Gloo (capabilities().gloo). The group may be used from one thread other than
   * the joining one (its collectives run one at a time).
   */
  glooJoin(options: GlooJoinOptions): CommGroup;
}

export interface GlooJoinOptions {
  /** The rendezvous store (rank 0's StoreServer). */
  host: string;
  port: number;
  /** Store key prefix of this group: unique per group (and per restart) on a shared store. */
  prefix: string;
  rank: number;
  worldSize: number;
  /** Bounds the join and every later collective. */
  timeoutMs: number;
  /** Address peers connect to this rank at; default: the local address of the store connection. */
  listenHost?: string;
}
