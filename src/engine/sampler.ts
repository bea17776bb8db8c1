// Token sampling from one row of logits: logit bias, penalties, greedy or temperature + top-k +
// top-p + min-p, and OpenAI-style logprobs. O(V) passes over reused scratch: V is ~150K for
// current vocabularies and this runs once per sequence per decode step.

import { Rng } from './rng.js';
import type { SamplingParams, TokenLogprob } from './types.js';

/** Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): 1/T would overflow anyway. */
export const GREEDY_TEMPERATURE = 1e-5;
/** OpenAI caps top_logprobs at 20. */
export const MAX_TOP_LOGPROBS = 20;
/**
 * Nucleus mass that falls short of top_p by less than this (relative) counts as reaching it:
 * float32 logits carry ~1e-7 relative error, so a user's top_p = 0.8 over probabilities
 * 0.5 + 0.3 keeps two tokens, not three.
 */
const TOP_P_REL_TOLERANCE = 1e-6;
/** Top-k up to this size is found with a k-heap in one pass; larger k uses quickselect. */
const HEAP_SELECT_MAX_K = 1024;

export interface SampleResult {
  tokenId: number;
  /** Present when logprobs were requested (params.logprobs is a number). */
  logprob?: number;
  /** Present when params.logprobs > 0: the top alternatives, highest first. */
  top?: { tokenId: number; logprob: number }[];
}

/**
 * Per-request sampling state: the parameters, the request's own RNG stream and the token
 * history that the penalties read. Create one per sequence; call addOutputToken for every
 * generated token (it survives preemption: recomputation does not touch it).
 */
export class SamplingState {
  readonly params: SamplingParams;
  readonly rng: Rng;
  readonly seed: number;
  /** token id -> occurrences among generated tokens (presence/frequency penalties). */
  readonly outputCounts = new Map<number, number>();
  /** Ids seen in prompt or output (repetition penalty); empty when that penalty is off. */
  readonly seenIds = new Set<number>();
  /** Logit bias, parsed once: [numBiased] ids and values. */
  readonly biasIds: Int32Array;
  readonly biasValues: Float32Array;
  /** Top alternatives to report; -1 = no logprobs at all. */
  readonly numTopLogprobs: number;

  /**
   * @param stream independent RNG stream for the same seed (choice i of an n > 1 request).
   */
  constructor(params: SamplingParams, promptTokenIds: ArrayLike<number>, vocabSize: number,
    stream = 0) {
    validateParams(params);
    this.params = params;
    this.seed = params.seed ?? Rng.randomSeed();
    this.rng = new Rng(this.seed, stream);
    this.numTopLogprobs = params.logprobs == null ? -1 : params.logprobs;

    const bias = Object.entries(params.logitBias ?? {});
    this.biasIds = new Int32Array(bias.length);
    this.biasValues = new Float32Array(bias.length);
    bias.forEach(([key, value], i) => {
      const id = Number(key);
      if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
        throw new RangeError(`logitBias key ${key} is not a token id in 0..${vocabSize - 1}`);
      }
      if (!Number.isFinite(value)) throw new RangeError(`logitBias[${key}] is ${value}, expected a finite number`);
      this.biasIds[i] = id;
      this.biasValues[i] = value;
    });

    if (params.repetitionPenalty !== 1) {
      for (let i = 0; i < promptTokenIds.length; i++) this.seenIds.add(promptTokenIds[i]!);
    }
  }

  addOutputToken(tokenId: number): void {
    this.outputCounts.set(tokenId, (this.outputCounts.get(tokenId) ?? 0) + 1);
    if (this.params.repetitionPenalty !== 1) this.seenIds.add(tokenId);
  }
}

function validateParams(p: SamplingParams): void {
  const check = (ok: boolean, name: string, value: unknown, expected: string): void => {
    if (!ok) throw new RangeError(`${name} is ${value}, expected ${expected}`);
  };
  check(Number.isFinite(p.temperature) && p.temperature >= 0, 'temperature', p.temperature, '>= 0');
  check(p.topP > 0 && p.topP <= 1, 'topP', p.topP, 'in (0, 1]');
  check(Number.isInteger(p.topK) && p.topK >= -1, 'topK', p.topK, '-1, 0 (off) or a positive integer');
  check(p.minP >= 0 && p.minP <= 1, 'minP', p.minP, 'in [0, 1]');
  check(Number.isFinite(p.repetitionPenalty) && p.repetitionPenalty > 0, 'repetitionPenalty',
    p.repetitionPenalty, '> 0');
  check(Number.isFinite(p.presencePenalty), 'presencePenalty', p.presencePenalty, 'a finite number');
  check(Number.isFinite(p.frequencyPenalty), 'frequencyPenalty', p.frequencyPenalty, 'a finite number');
  if (p.logprobs != null) {
    check(Number.isInteger(p.logprobs) && p.logprobs >= 0 && p.logprobs <= MAX_TOP_LOGPROBS,
      'logprobs', p.logprobs, `an integer 0..${MAX_TOP_LOGPROBS} or null`);
  }
}

/**
 * Samples rows of logits of one vocabulary size. Owns the scratch, so keep one per engine
 * worker (not per request) and do not share it between threads.
 */
export class Sampler {
  readonly vocabSize: number;
  /** [V] f32: the row after bias and penalties (what logprobs are computed from). */
  private readonly work: Float32Array;
  /** [V] candidate token ids and their weights exp((x - max) / T) after each filter. */
  private readonly candIds: Int32Array;
  private readonly candWeights: Float64Array;
  /** [V] f64 scratch for selection and the nucleus sort. */
  private readonly scratch: Float64Array;
  /** [<= 20] running top-n for logprobs. */
  private readonly topValues = new Float64Array(MAX_TOP_LOGPROBS);
  private readonly topIds = new Int32Array(MAX_TOP_LOGPROBS);

  constructor(vocabSize: number) {
    if (!Number.isInteger(vocabSize) || vocabSize < 1) {
      throw new RangeError(`vocabSize is ${vocabSize}, expected a positive integer`);
    }
    this.vocabSize = vocabSize;
    this.work = new Float32Array(vocabSize);
    this.candIds = new Int32Array(vocabSize);
    this.candWeights = new Float64Array(vocabSize);
    this.scratch = new Float64Array(vocabSize);
  }

  /**
   * @param logits [V] f32, one row; not modified.
   * @param bitmask [ceil(V/32)] grammar bitmask (xgrammar's layout: bit j of word i allows token
   *   32i + j), applied first: a disallowed token's logit becomes -Infinity.
   * Does not record the sampled token: call state.addOutputToken once it is accepted.
   */
  sample(logits: Float32Array, state: SamplingState, bitmask?: Int32Array | null): SampleResult {
    const V = this.vocabSize;
    if (logits.length !== V) throw new RangeError(`logits.length is ${logits.length}, expected ${V}`);
    const p = state.params;
    const w = this.work;
    w.set(logits);
    if (bitmask) applyBitmask(w, bitmask);

    // vLLM order: bias, then repetition penalty, then presence/frequency penalties.
    for (let i = 0; i < state.biasIds.length; i++) w[state.biasIds[i]!]! += state.biasValues[i]!;
    const rp = p.repetitionPenalty;
    if (rp !== 1) {
      for (const id of state.seenIds) {
        const x = w[id]!;
        w[id] = x > 0 ? x / rp : x * rp;
      }
    }
    const presence = p.presencePenalty;
    const frequency = p.frequencyPenalty;
    if (presence !== 0 || frequency !== 0) {
      for (const [id, count] of state.outputCounts) w[id]! -= presence + frequency * count;
    }

    const tokenId = p.temperature < GREEDY_TEMPERATURE ? argmax(w) : this.sampleRandom(state);
    const result: SampleResult = { tokenId };
    if (state.numTopLogprobs >= 0) {
      // OpenAI reports the model's distribution after bias/penalties, before temperature and
      // truncation, so logprobs do not depend on the sampling knobs.
      const lse = logSumExp(w);
      result.logprob = w[tokenId]! - lse;
      if (state.numTopLogprobs > 0) result.top = this.topLogprobs(state.numTopLogprobs, lse);
    }
    return result;
  }

  private sampleRandom(state: SamplingState): number {
    const p = state.params;
    const V = this.vocabSize;
    const w = this.work;
    const ids = this.candIds;
    const weights = this.candWeights;
    const invT = 1 / p.temperature;

    // Top-k on the raw values (scaling by 1/T is monotone). Ties with the k-th value are kept,
    // as HF and vLLM do.
    const k = p.topK > 0 && p.topK < V ? p.topK : 0;
    const kth = k > 0 ? kthLargest(w, k, this.scratch) : -Infinity;
    let max = -Infinity;
    for (let i = 0; i < V; i++) if (w[i]! > max) max = w[i]!;

    let n = 0;
    let sum = 0;
    for (let i = 0; i < V; i++) {
      const x = w[i]!;
      if (x >= kth) {
        const e = fastExp((x - max) * invT);
        if (e > 0) {   // exact underflow: can never be drawn, and NaN fails this too
          ids[n] = i;
          weights[n] = e;
          sum += e;
          n++;
        }
      }
    }

    if (n === 0) return argmax(w);   // every logit -inf or NaN: nothing to draw from

    if (p.topP < 1 && n > 1) {
      const cutoff = nucleusCutoff(weights, n, sum, p.topP, this.scratch);
      [n, sum] = compact(ids, weights, n, cutoff);
    }
    // The largest weight is exactly exp(0) = 1 and survives every filter, so min-p's
    // "prob >= minP * maxProb" is "weight >= minP".
    if (p.minP > 0 && n > 1) [n, sum] = compact(ids, weights, n, p.minP);

    const u = state.rng.nextFloat() * sum;
    let acc = 0;
    for (let j = 0; j < n; j++) {
      acc += weights[j]!;
      if (u < acc) return ids[j]!;
    }
    return ids[n - 1]!;   // u landed in the rounding gap at the top end
  }

  /** The n best of the work row as logprobs, highest first, ties to the lower id. */
  private topLogprobs(count: number, lse: number): { tokenId: number; logprob: number }[] {
    return topLogprobsOf(this.work, count, lse, this.topValues, this.topIds);
  }
}

/**
 * A logits row's logprob of `tokenId` and its `count` best alternatives, as the sampler reports a
 * sampled token's (the raw distribution: log-softmax of the row). Prompt logprobs use it.
 */
export function rowLogprobs(row: Float32Array, tokenId: number, count: number): TokenLogprob {
  const lse = logSumExp(row);
  const n = Math.min(count, MAX_TOP_LOGPROBS);
  const top = n > 0 ? topLogprobsOf(row, n, lse, new Float64Array(n), new Int32Array(n)) : [];
  return { tokenId, logprob: row[tokenId]! - lse, top };
}

/** The `count` best of w as logprobs (w - lse), highest first, ties to the lower id; vals / ids: scratch of count. */
function topLogprobsOf(w: Float32Array, count: number, lse: number, vals: Float64Array, ids: Int32Array):
    { tokenId: number; logprob: number }[] {
  const n = Math.min(count, w.length);
  let size = 0;
  for (let i = 0; i < w.length; i++) {
    const x = w[i]!;
    if (size === n && !(x > vals[n - 1]!)) continue;
    if (x !== x) continue;
    let j = size < n ? size++ : n - 1;
    // Strict < keeps an earlier (lower) id ahead of an equal value.
    while (j > 0 && vals[j - 1]! < x) {
      vals[j] = vals[j - 1]!;
      ids[j] = ids[j - 1]!;
      j--;
    }
    vals[j] = x;
    ids[j] = i;
  }
  const top: { tokenId: number; logprob: number }[] = [];
  for (let j = 0; j < size; j++) top.push({ tokenId: ids[j]!, logprob: vals[j]! - lse });
  return top;
}

/** Number of Int32 words of a grammar bitmask over V tokens. */
export function bitmaskWords(vocabSize: number): number {
  return Math.ceil(vocabSize / 32);
}

/** Sets every token whose bit is clear in bitmask ([ceil(V/32)] words) to -Infinity. */
export function applyBitmask(w: Float32Array, bitmask: Int32Array): void {
  const V = w.length;
  const words = bitmaskWords(V);
  if (bitmask.length !== words) throw new RangeError(`bitmask.length is ${bitmask.length}, expected ${words}`);
  for (let i = 0; i < words; i++) {
    const bits = bitmask[i]!;
    if (bits === -1) continue;
    const end = Math.min(32, V - 32 * i);
    for (let j = 0; j < end; j++) if (((bits >>> j) & 1) === 0) w[32 * i + j] = -Infinity;
  }
}

const LOG2E = 1.4426950408889634;
const LN2 = 0.6931471805599453;
/** [2100] f64: 2^(k - 1075), covering every double exponent including subnormals. */
const POW2 = Float64Array.from({ length: 2100 }, (_, k) => 2 ** (k - 1075));

/**
 * exp(x) to ~3e-10 relative error, 0 below the subnormal range; about twice as fast as
 * Math.exp in V8 (which is a call, where this inlines), and exp is most of a sample's cost.
 */
export function fastExp(x: number): number {
  const t = x * LOG2E;
  if (!(t > -1074)) return t === t ? 0 : NaN;
  if (t > 1023) return Infinity;
  const k = Math.floor(t + 0.5);
  const r = (t - k) * LN2;   // |r| <= ln2 / 2: a degree-8 Taylor series is within 3e-10
  const poly = 1 + r * (1 + r * (1 / 2 + r * (1 / 6 + r * (1 / 24 + r * (1 / 120 + r * (1 / 720 +
    r * (1 / 5040 + r * (1 / 40320))))))));
  return poly * POW2[k + 1075]!;
}

/** Index of the largest value, the lowest index among equals; NaNs never win. */
export function argmax(x: Float32Array): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < x.length; i++) {
    if (x[i]! > bestValue) {
      bestValue = x[i]!;
      best = i;
    }
  }
  return best;
}

/** log(sum(exp(x))) accumulated in f64. */
export function logSumExp(x: Float32Array): number {
  let max = -Infinity;
  for (let i = 0; i < x.length; i++) if (x[i]! > max) max = x[i]!;
  if (max === -Infinity) return -Infinity;
  let sum = 0;
  for (let i = 0; i < x.length; i++) sum += fastExp(x[i]! - max);
  return max + Math.log(sum);
}

/**
 * The k-th largest of values (NaNs ignored; -Infinity when fewer than k are numbers).
 * scratch: [values.length] f64, clobbered.
 */
export function kthLargest(values: Float32Array, k: number, scratch: Float64Array): number {
  const V = values.length;
  const s = scratch;
  if (k <= HEAP_SELECT_MAX_K) {
    // Min-heap of the k largest in s[0..k): most values fail the single compare with the root.
    let size = 0;
    for (let i = 0; i < V; i++) {
      const x = values[i]!;
      if (size < k) {
        if (x !== x) continue;
        let c = size++;
        while (c > 0) {
          const parent = (c - 1) >> 1;
          if (s[parent]! <= x) break;
          s[c] = s[parent]!;
          c = parent;
        }
        s[c] = x;
      } else if (x > s[0]!) {
        siftDownRoot(s, size, x);
      }
    }
    return size < k ? -Infinity : s[0]!;
  }
  let n = 0;
  for (let i = 0; i < V; i++) if (values[i] === values[i]) s[n++] = values[i]!;
  return n < k ? -Infinity : quickselectLargest(s, n, k);
}

/**
 * Top-p over weights[0..n) (unnormalised, sum = their total): the smallest weight kept, where
 * the kept set is the smallest set of highest weights whose mass reaches topP * sum. A
 * mass-tracking quickselect, O(n) expected, never a sort: a flat tail (a high-entropy
 * position) may put most of the vocabulary inside the nucleus. A peaked distribution is
 * settled on the few weights above sum / 1000 (at most 1000 of them).
 * scratch: [n] f64, clobbered.
 */
export function nucleusCutoff(weights: Float64Array, n: number, sum: number, topP: number,
  scratch: Float64Array): number {
  const target = topP * sum * (1 - TOP_P_REL_TOLERANCE);
  const threshold = sum * 1e-3;
  let m = 0;
  let mass = 0;
  for (let j = 0; j < n; j++) {
    const x = weights[j]!;
    if (x >= threshold) {
      scratch[m++] = x;
      mass += x;
    }
  }
  if (mass < target) {
    m = n;
    scratch.set(weights.subarray(0, n));
  }
  return weightedSelect(scratch, m, target);
}

/**
 * The largest v among a[0..m) (all > 0) such that the values >= v hold mass >= target;
 * reorders a. 0 (keep everything) if rounding leaves the whole mass short of target.
 */
function weightedSelect(a: Float64Array, m: number, target: number): number {
  let lo = 0;
  let hi = m - 1;
  let need = target;
  while (lo <= hi) {
    const { pivot, lt, gt, greater, equal } = partitionDescending(a, lo, hi);
    if (greater >= need) {
      hi = lt - 1;
    } else if (greater + equal >= need) {
      return pivot;
    } else {
      need -= greater + equal;
      lo = gt + 1;
    }
  }
  return 0;
}

const part = { pivot: 0, lt: 0, gt: 0, greater: 0, equal: 0 };

/**
 * One three-way partition of a[lo..hi] in descending order around a median-of-three pivot:
 * [lo, lt) > pivot, [lt, gt] == pivot, (gt, hi] < pivot; greater and equal are the sums of the
 * first two parts. Runs of equal values (masked logits) cost one pass, not quadratic time.
 * Returns a shared object (read it before the next call).
 */
function partitionDescending(a: Float64Array, lo: number, hi: number): typeof part {
  const mid = (lo + hi) >>> 1;
  const x = a[lo]!, y = a[mid]!, z = a[hi]!;
  const pivot = x < y ? (y < z ? y : x < z ? z : x) : (x < z ? x : y < z ? z : y);
  let lt = lo, i = lo, gt = hi;
  let greater = 0, equal = 0;
  while (i <= gt) {
    const v = a[i]!;
    if (v > pivot) {
      a[i] = a[lt]!;
      a[lt] = v;
      lt++;
      i++;
      greater += v;
    } else if (v < pivot) {
      a[i] = a[gt]!;
      a[gt] = v;
      gt--;
    } else {
      equal += v;
      i++;
    }
  }
  part.pivot = pivot;
  part.lt = lt;
  part.gt = gt;
  part.greater = greater;
  part.equal = equal;
  return part;
}

/** Keeps entries with weight >= cutoff, in order; returns the new count and total. */
function compact(ids: Int32Array, weights: Float64Array, n: number, cutoff: number): [number, number] {
  let m = 0;
  let sum = 0;
  for (let j = 0; j < n; j++) {
    const x = weights[j]!;
    if (x >= cutoff) {
      ids[m] = ids[j]!;
      weights[m] = x;
      sum += x;
      m++;
    }
  }
  return [m, sum];
}

/** Replaces the root of the min-heap h[0..size) with x and restores the heap. */
function siftDownRoot(h: Float64Array, size: number, x: number): void {
  let i = 0;
  for (;;) {
    let c = 2 * i + 1;
    if (c >= size) break;
    if (c + 1 < size && h[c + 1]! < h[c]!) c++;
    if (h[c]! >= x) break;
    h[i] = h[c]!;
    i = c;
  }
  h[i] = x;
}

/**
 * The k-th largest of a[0..n) (1 <= k <= n), reordering a. Three-way partitions, so runs of
 * equal values (masked logits) cost one pass, not quadratic time.
 */
export function quickselectLargest(a: Float64Array, n: number, k: number): number {
  let lo = 0;
  let hi = n - 1;
  const target = k - 1;   // index in descending order
  while (lo < hi) {
    const { pivot, lt, gt } = partitionDescending(a, lo, hi);
    if (target < lt) hi = lt - 1;
    else if (target > gt) lo = gt + 1;
    else return pivot;
  }
  return a[lo]!;
}
