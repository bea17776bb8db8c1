// StopMatcher against a plain reference: random texts cut into random pieces, random stop strings.
// What was emitted must always be a prefix of the reference answer, and the whole must equal it.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { StopMatcher } from '../src/server/stop-strings.js';
import { fileSeed } from './helpers/seed.js';

let s = fileSeed(0x1234567) || 1; // xorshift32 stays 0 from 0
const rand = () => { s ^= s << 13; s >>>= 0; s ^= s >>> 17; s ^= s << 5; s >>>= 0; return s / 4294967296; };
const ALPHA = ['a', 'b', 'c', 'ab', 'é', '€', '😀', ' '];
const randText = (n: number) => Array.from({ length: n }, () => ALPHA[Math.floor(rand() * ALPHA.length)]).join('');

test('StopMatcher matches the reference on 3000 random cases', () => {
  for (let t = 0; t < 3000; t++) {
    const text = randText(1 + Math.floor(rand() * 40));
    const stops = Array.from({ length: 1 + Math.floor(rand() * 3) }, () => randText(1 + Math.floor(rand() * 3)));
    // Reference: cut at the earliest occurrence of any stop string.
    let cut = -1;
    let which: string | null = null;
    for (const st of stops) {
      const i = text.indexOf(st);
      if (i >= 0 && (cut < 0 || i < cut)) { cut = i; which = st; }
    }
    const expected = cut >= 0 ? text.slice(0, cut) : text;
    // Feed in random pieces on code point boundaries (the detokenizer never splits a character).
    const chars = [...text];
    const m = new StopMatcher(stops);
    let out = '';
    let stopped: string | null = null;
    for (let i = 0; i < chars.length && stopped === null;) {
      const k = 1 + Math.floor(rand() * 4);
      const r = m.push(chars.slice(i, i + k).join(''));
      i += k;
      out += r.text;
      stopped = r.stopped;
      assert.ok(expected.startsWith(out), `emitted ${JSON.stringify(out)} is not a prefix of ${JSON.stringify(expected)}`);
    }
    if (stopped === null) out += m.flush();
    assert.equal(out, expected, `text ${JSON.stringify(text)} stops ${JSON.stringify(stops)}`);
    if (cut >= 0) assert.equal(text.indexOf(stopped!), cut);
    else assert.equal(stopped, null);
    void which;
  }
});

test('StopMatcher holds back a possible prefix, then releases it', () => {
  const m = new StopMatcher(['STOP']);
  assert.deepEqual(m.push('abcST'), { text: 'abc', stopped: null });
  assert.deepEqual(m.push('x'), { text: 'STx', stopped: null });
  assert.deepEqual(m.push('S'), { text: '', stopped: null });
  assert.deepEqual(m.push('TOP and more'), { text: '', stopped: 'STOP' });
  const n = new StopMatcher(['end']);
  assert.deepEqual(n.push('the en', false), { text: 'the en', stopped: null }, 'matching off (min_tokens) passes text through');
  assert.deepEqual(n.push('d'), { text: 'd', stopped: null });
  const none = new StopMatcher([]);
  assert.deepEqual(none.push('anything'), { text: 'anything', stopped: null });
});
