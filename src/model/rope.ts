// RoPE inverse frequencies as transformers' ROPE_INIT_FUNCTIONS compute them ('default', 'linear',
// 'dynamic' at load, 'yarn', 'llama3'), step by step in float32 like torch does, so the engine's
// cos/sin tables match HF bit for bit (up to torch's pow rounding).
//
// Torch semantics copied here: `scalar OP f32 tensor` casts the scalar to f32 and rounds every op to
// f32; `1.0 / t` and `c / t` are `reciprocal(t) * c`; `base ** t` is a f32 pow of fround(base).

export class RopeConfigError extends Error {}

const f = Math.fround;

export const SUPPORTED_ROPE_TYPES = ['default', 'linear', 'dynamic', 'yarn', 'llama3'] as const;

export interface RopeParams {
  ropeType: string;
  theta: number;
  /** Rotated dims (head_dim * partial_rotary_factor). */
  dim: number;
  maxPositionEmbeddings: number;
  /** The rope_parameters / rope_scaling dict as given (plus standardised keys). */
  params: Record<string, unknown>;
}

export interface RopeResult {
  invFreq: Float32Array;   // [dim / 2]
  attnScale: number;       // multiplies cos/sin (YaRN attention factor)
}

/** `base ** (arange(0, dim, 2) / dim)` in f32. */
function posFreqs(theta: number, dim: number): Float32Array {
  const out = new Float32Array(dim / 2);
  const b = f(theta);
  for (let i = 0; i < dim / 2; i++) out[i] = f(Math.pow(b, f((2 * i) / dim)));
  return out;
}

function defaultInvFreq(theta: number, dim: number): Float32Array {
  const p = posFreqs(theta, dim);
  for (let i = 0; i < p.length; i++) p[i] = f(1 / p[i]!);
  return p;
}

function numParam(params: Record<string, unknown>, key: string, ropeType: string): number {
  const v = params[key];
  if (typeof v !== 'number' || !Number.isFinite(v))
    throw new RopeConfigError(`rope_type '${ropeType}' needs a numeric '${key}' in rope_parameters ` +
      `(got ${JSON.stringify(v)})`);
  return v;
}

/** get_mscale of transformers' yarn (and yarn_get_mscale of DeepSeek). */
export function yarnGetMscale(scale: number, mscale = 1): number {
  if (scale <= 1) return 1.0;
  return 0.1 * mscale * Math.log(scale) + 1.0;
}

/**
 * x ** -0.5 correctly rounded, as Python's `head_dim ** -0.5` (C pow) gives it; Math.pow and
 * 1 / Math.sqrt are each off by one ulp for some integers. Exact comparison of the neighbours.
 */
export function invSqrt(x: number): number {
  const y = 1 / Math.sqrt(x);
  if (!Number.isInteger(x) || x <= 0 || !Number.isFinite(y)) return y;
  const buf = new DataView(new ArrayBuffer(8));
  const bits = (v: number): bigint => { buf.setFloat64(0, v); return buf.getBigUint64(0); };
  const fromBits = (b: bigint): number => { buf.setBigUint64(0, b); return buf.getFloat64(0); };
  // |c^2 x - 1| exactly: c = m * 2^e with integer m.
  const err = (c: number): bigint => {
    let m = c;
    let e = 0;
    while (!Number.isInteger(m)) { m *= 2; e--; }
    const M = BigInt(m);
    const d = M * M * BigInt(x) - (1n << BigInt(-2 * e));
    return d < 0n ? -d : d;
  };
  let best = y;
  let bestErr = err(y);
  for (const c of [fromBits(bits(y) - 1n), fromBits(bits(y) + 1n)]) {
    const ce = err(c);
    // Errors are compared at different scales of 2^-2e; bring both to the finer one.
    if (compareScaled(ce, c, bestErr, best) < 0) { best = c; bestErr = ce; }
  }
  return best;
}

function scaleExp(c: number): number {
  let m = c;
  let e = 0;
  while (!Number.isInteger(m)) { m *= 2; e--; }
  return e;
}

/** Compares |c1^2 x - 1| and |c2^2 x - 1| given err = that value * 2^(-2 e) for each. */
function compareScaled(err1: bigint, c1: number, err2: bigint, c2: number): number {
  const s1 = -2 * scaleExp(c1);
  const s2 = -2 * scaleExp(c2);
  const a = s2 > s1 ? err1 << BigInt(s2 - s1) : err1;
  const b = s1 > s2 ? err2 << BigInt(s1 - s2) : err2;
  return a < b ? -1 : a > b ? 1 : 0;
}

export function computeRope(p: RopeParams): RopeResult {
  const { dim, theta, params } = p;
  if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0)
    throw new RopeConfigError(`the rotary dimension is ${dim}; it must be a positive even integer`);
  switch (p.ropeType) {
    case 'default':
    // 'dynamic' equals default until a sequence outgrows max_position_embeddings, which the engine
    // never allows (maxContext = max_position_embeddings).
    case 'dynamic':
      return { invFreq: defaultInvFreq(theta, dim), attnScale: 1 };
    case 'linear': {
      const factor = f(numParam(params, 'factor', 'linear'));
      const inv = defaultInvFreq(theta, dim);
      for (let i = 0; i < inv.length; i++) inv[i] = f(inv[i]! / factor);
      return { invFreq: inv, attnScale: 1 };
    }
    case 'llama3':
      return { invFreq: llama3(p), attnScale: 1 };
    case 'yarn':
      return yarn(p);
    default:
      throw new RopeConfigError(`rope_type '${p.ropeType}' is not supported; supported: ` +
        SUPPORTED_ROPE_TYPES.join(', '));
  }
}

function llama3(p: RopeParams): Float32Array {
  const { params } = p;
  const factor = numParam(params, 'factor', 'llama3');
  const low = numParam(params, 'low_freq_factor', 'llama3');
  const high = numParam(params, 'high_freq_factor', 'llama3');
  const old = numParam(params, 'original_max_position_embeddings', 'llama3');
  const lowWavelen = f(old / low);
  const highWavelen = f(old / high);
  const inv = defaultInvFreq(p.theta, p.dim);
  const out = new Float32Array(inv.length);
  const twoPi = f(2 * Math.PI);
  for (let i = 0; i < inv.length; i++) {
    const x = inv[i]!;
    const wavelen = f(f(1 / x) * twoPi);
    let llama = wavelen > lowWavelen ? f(x / f(factor)) : x;
    const smooth = f(f(f(f(1 / wavelen) * f(old)) - f(low)) / f(high - low));
    const smoothed = f(f(f(f(1 - smooth) * llama) / f(factor)) + f(smooth * llama));
    const medium = !(wavelen < highWavelen) && !(wavelen > lowWavelen);
    if (medium) llama = smoothed;
    out[i] = llama;
  }
  return out;
}

function yarn(p: RopeParams): RopeResult {
  const { params, dim, theta } = p;
  const ompe = numParam(params, 'original_max_position_embeddings', 'yarn');
  let factor = params.factor as number | null | undefined;
  if (factor === null || factor === undefined) factor = p.maxPositionEmbeddings / ompe;
  if (typeof factor !== 'number' || !Number.isFinite(factor))
    throw new RopeConfigError(`rope_type 'yarn' has a non-numeric factor ${JSON.stringify(factor)}`);
  const mscale = params.mscale as number | undefined;
  const mscaleAllDim = params.mscale_all_dim as number | undefined;
  let attnScale = params.attention_factor as number | null | undefined;
  if (attnScale === null || attnScale === undefined) {
    attnScale = mscale && mscaleAllDim
      ? yarnGetMscale(factor, mscale) / yarnGetMscale(factor, mscaleAllDim)
      : yarnGetMscale(factor);
  }
  const betaFast = (params.beta_fast as number | undefined) || 32;
  const betaSlow = (params.beta_slow as number | undefined) || 1;
  const truncate = params.truncate === undefined ? true : Boolean(params.truncate);

  const correctionDim = (rot: number): number =>
    (dim * Math.log(ompe / (rot * 2 * Math.PI))) / (2 * Math.log(theta));
  let low = correctionDim(betaFast);
  let high = correctionDim(betaSlow);
  if (truncate) {
    low = Math.floor(low);
    high = Math.ceil(high);
  }
  low = Math.max(low, 0);
  high = Math.min(high, dim - 1);
  if (low === high) high += 0.001;  // transformers: prevent singularity

  const pos = posFreqs(theta, dim);
  const inv = new Float32Array(dim / 2);
  const fFactor = f(factor);
  const fLow = f(low);
  const span = f(high - low);
  for (let i = 0; i < dim / 2; i++) {
    const extrapolation = f(1 / pos[i]!);
    const interpolation = f(1 / f(fFactor * pos[i]!));
    const ramp = Math.min(1, Math.max(0, f(f(i - fLow) / span)));
    const extrapFactor = f(1 - ramp);
    inv[i] = f(f(interpolation * f(1 - extrapFactor)) + f(extrapolation * extrapFactor));
  }
  return { invFreq: inv, attnScale };
}
