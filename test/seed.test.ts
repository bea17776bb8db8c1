// The tests' seed helper (helpers/seed.ts): EXPERTD_TEST_SEED wins, a fixed seed stays fixed, and
// without either each run draws a fresh one.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { pickSeed } from './helpers/seed.js';

function withEnv<T>(value: string | undefined, f: () => T): T {
  const saved = process.env.EXPERTD_TEST_SEED;
  if (value === undefined) delete process.env.EXPERTD_TEST_SEED;
  else process.env.EXPERTD_TEST_SEED = value;
  try {
    return f();
  } finally {
    if (saved === undefined) delete process.env.EXPERTD_TEST_SEED;
    else process.env.EXPERTD_TEST_SEED = saved;
  }
}

test('EXPERTD_TEST_SEED replaces fixed and fresh seeds; fixed stays fixed; fresh differs per draw', () => {
  assert.deepEqual(withEnv('4242', () => pickSeed(7)), { seed: 4242, from: 'EXPERTD_TEST_SEED' });
  assert.deepEqual(withEnv('4242', () => pickSeed()), { seed: 4242, from: 'EXPERTD_TEST_SEED' });
  assert.deepEqual(withEnv(undefined, () => pickSeed(7)), { seed: 7, from: 'fixed' });
  assert.deepEqual(withEnv('', () => pickSeed(7)), { seed: 7, from: 'fixed' });
  const fresh = withEnv(undefined, () => Array.from({ length: 4 }, () => pickSeed()));
  assert.ok(fresh.every((s) => s.from === 'fresh' && Number.isInteger(s.seed) && s.seed >= 0 && s.seed < 2 ** 32));
  // Four draws from 2^32 all equal: a fixed value posing as fresh (chance 2^-96 otherwise).
  assert.ok(new Set(fresh.map((s) => s.seed)).size > 1, 'fresh seeds differ');
  for (const bad of ['abc', '-1', '1.5', '4294967296'])
    assert.throws(() => withEnv(bad, () => pickSeed()), { name: 'RangeError', message: `EXPERTD_TEST_SEED is '${bad}', expected an integer 0..4294967295` });
});
