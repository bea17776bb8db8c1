// Seeds for tests that draw random data, so that a failure can be replayed: EXPERTD_TEST_SEED=N
// replaces every seed drawn here, and each seed is printed as a test diagnostic saying so.
import { randomInt } from 'node:crypto';
import { before, type TestContext } from 'node:test';

/** EXPERTD_TEST_SEED as an integer 0..2^32-1, or null when unset. */
function envSeed(): number | null {
  const v = process.env.EXPERTD_TEST_SEED;
  if (v === undefined || v === '') return null;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > 0xffffffff) {
    throw new RangeError(`EXPERTD_TEST_SEED is '${v}', expected an integer 0..4294967295`);
  }
  return n;
}

/**
 * The seed a test draws its data from: EXPERTD_TEST_SEED when set, else `fixed` (tests whose data
 * was always the same keep it), else a fresh one per run. Where a test derives several seeds from
 * one (`seed + i`), pass the first as `fixed`.
 */
export function pickSeed(fixed?: number): { seed: number; from: string } {
  const env = envSeed();
  if (env !== null) return { seed: env, from: 'EXPERTD_TEST_SEED' };
  if (fixed !== undefined) return { seed: fixed, from: 'fixed' };
  return { seed: randomInt(0, 2 ** 32), from: 'fresh' };
}

function describe(seed: number, from: string, what?: string): string {
  return `${what ? `${what}: ` : ''}seed ${seed} (${from}); replay with EXPERTD_TEST_SEED=${seed}`;
}

/** A test's seed (see pickSeed), printed as a diagnostic of `t`. */
export function testSeed(t: TestContext, fixed?: number, what?: string): number {
  const { seed, from } = pickSeed(fixed);
  t.diagnostic(describe(seed, from, what));
  return seed;
}

/**
 * A seed for a generator at a file's top level (shared by its tests), printed once as a
 * diagnostic of the file's root.
 */
export function fileSeed(fixed?: number, what?: string): number {
  const { seed, from } = pickSeed(fixed);
  // The root's hook context is a TestContext (SuiteContext in the types' union has no diagnostic).
  before((t) => (t as TestContext).diagnostic(describe(seed, from, what)));
  return seed;
}
