// Structured outputs: the token bitmask against a plain reference, xgrammar's matcher on a fixture
// vocabulary (eos only where the grammar is complete), and the real daemon on random-weight
// fixtures through the openai client: json_schema / json_object / regex / choice / EBNF outputs that
// parse and validate (ajv), and invalid ones refused with a 400 that says why.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';

import AjvModule from 'ajv';
import { APIError } from 'openai';

import { applyTokenBitmask, bitmaskWords } from '../src/engine/token-bitmask.js';
import { packageRoot } from '../src/native/index.js';
import { GrammarEngine, vocabForGrammar } from '../src/structured/grammar-engine.js';
import { choiceEbnf, xgrammarSchema } from '../src/structured/grammar-spec.js';
import { tokenBytes, utf8Step, Utf8Guard, UTF8_INVALID } from '../src/structured/utf8-guard.js';
import { startDaemon, stopDaemon, type Daemon } from './helpers/daemon.js';
import { Rng } from '../src/engine/rng.js';
import { testSeed } from './helpers/seed.js';

const Ajv = AjvModule.default ?? AjvModule;
const fixture = (name: string) => path.join(packageRoot(), 'test', 'fixtures', name);

test('applyTokenBitmask: disallowed logits become -inf, allowed ones are untouched (against a per-id reference)', (t) => {
  const rng = new Rng(testSeed(t));
  for (const V of [1, 31, 32, 33, 100, 1024, 1000]) {
    const logits = Float32Array.from({ length: V }, () => rng.nextFloat() * 20 - 10);
    const mask = new Int32Array(bitmaskWords(V));
    // Words of every kind: all allowed (-1), none (0), and mixed.
    for (let w = 0; w < mask.length; w++) mask[w] = w % 3 === 0 ? -1 : w % 3 === 1 ? 0 : (rng.nextFloat() * 2 ** 32) | 0;
    const expected = Float32Array.from(logits, (x, id) => (mask[id >> 5]! >>> (id & 31)) & 1 ? x : -Infinity);
    const out = logits.slice();
    applyTokenBitmask(out, mask);
    assert.deepEqual(out, expected, `V=${V}`);
  }
  assert.throws(() => applyTokenBitmask(new Float32Array(33), new Int32Array(1)), /mask.length is 1, expected 2 for 33 logits/);
});

test('xgrammarSchema: length-bounded strings become a pattern without quotes, backslashes or control characters', () => {
  const s = JSON.parse(xgrammarSchema(JSON.stringify({
    type: 'object', properties: { a: { type: 'string', maxLength: 5 }, b: { type: 'string', minLength: 2, pattern: 'x+' }, c: { type: 'string' } },
  }))) as { properties: Record<string, Record<string, unknown>> };
  const re = new RegExp(s.properties.a!.pattern as string);
  assert.ok(re.test('abcde') && !re.test('abcdef') && !re.test('a"b') && !re.test('a\\b') && !re.test('a\u001eb'));
  assert.equal(s.properties.a!.maxLength, undefined);
  assert.deepEqual(s.properties.b, { type: 'string', minLength: 2, pattern: 'x+' }, 'a pattern of its own is left alone');
  assert.deepEqual(s.properties.c, { type: 'string' });
  assert.equal(choiceEbnf(['a"b', 'c\\d\n']), 'root ::= "a\\"b" | "c\\\\d\\n"');
});

test('GrammarEngine: the mask allows eos only once the grammar is complete; the cache compiles a spec once', async () => {
  const dir = fixture('qwen3_moe');
  const V = 1024;
  const eos = 2;
  const v = vocabForGrammar(dir, V);
  assert.equal(v.vocabType, 'byte_fallback');
  const engine = await GrammarEngine.create(dir, V, [eos], 2);
  const spec = { type: 'choice' as const, choices: ['yes', 'no'] };
  const m = await engine.matcher(spec);
  const mask = new Int32Array(bitmaskWords(V));
  const allowed = () => { m.fillMask(mask); return [...Array(V).keys()].filter((id) => (mask[id >> 5]! >>> (id & 31)) & 1); };
  const first = allowed();
  assert.ok(!first.includes(eos), 'eos is not allowed before anything was generated');
  assert.ok(first.length > 0 && first.length < V);
  // Walk the grammar greedily by the vocabulary's own strings until eos is allowed.
  const text = (id: number) => v.encodedVocab[id]!.replace(/^<0x([0-9A-F]{2})>$/, (_, h: string) => String.fromCharCode(parseInt(h, 16)));
  let out = '';
  for (let step = 0; step < 4 && !allowed().includes(eos); step++) {
    const ids = allowed();
    const id = ids.find((i) => text(i) === 'y' || text(i) === 'n') ?? ids[0]!;
    assert.ok(m.accept(id));
    out += text(id);
  }
  assert.ok(out === 'yes' || out === 'no', `walked to a complete choice (${JSON.stringify(out)})`);
  assert.deepEqual(allowed(), [eos], 'complete: only eos remains');
  assert.equal(m.terminated, false);
  assert.ok(m.accept(eos));
  assert.equal(m.terminated, true);
  m.dispose();
  const before = engine.compiles;
  (await engine.matcher(spec)).dispose();
  assert.equal(engine.compiles, before, 'the second matcher of a spec reuses its compiled grammar');
  await engine.compile({ type: 'regex', pattern: 'a+' });
  await engine.compile({ type: 'regex', pattern: 'b+' });
  assert.equal(engine.cacheSize, 2, 'the LRU holds its capacity');
  await assert.rejects(engine.compile({ type: 'ebnf', grammar: 'root ::= undefined_rule' }), /Rule "undefined_rule" is not defined/);
});

test('Utf8Guard: the decoder states agree with a strict UTF-8 decoder on random byte strings', (t) => {
  const rng = new Rng(testSeed(t));
  const strict = new TextDecoder('utf-8', { fatal: true });
  const interesting = [0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf4, 0xf5, 0xf7, 0xf8, 0xff];
  for (let i = 0; i < 20000; i++) {
    const bytes = Uint8Array.from({ length: 1 + Math.floor(rng.nextFloat() * 5) }, () => interesting[Math.floor(rng.nextFloat() * interesting.length)]!);
    let s = 0;
    for (const b of bytes) if (s !== UTF8_INVALID) s = utf8Step(s, b);
    let valid = true;
    try { strict.decode(bytes); } catch { valid = false; }
    // Complete and valid <=> the walk ends between characters; a valid prefix never goes invalid.
    assert.equal(s === 0, valid, `bytes ${Buffer.from(bytes).toString('hex')}`);
  }
  // On a byte-fallback vocabulary: after E0 only A0..BF may follow; F5 never starts anything.
  const vocab = ['<s>', '</s>', ...Array.from({ length: 256 }, (_, b) => `<0x${b.toString(16).toUpperCase().padStart(2, '0')}>`), '▁a'];
  const guard = new Utf8Guard(tokenBytes(vocab, 'byte_fallback', new Set([0, 1])), vocab.length);
  const id = (b: number) => 2 + b;
  const allowedAfter = (state: number) => {
    const mask = new Int32Array(bitmaskWords(vocab.length)).fill(-1);
    guard.restrict(mask, state);
    return [...vocab.keys()].filter((i) => (mask[i >> 5]! >>> (i & 31)) & 1);
  };
  const afterE0 = guard.after(0, id(0xe0));
  assert.deepEqual(allowedAfter(afterE0), Array.from({ length: 0x20 }, (_, k) => id(0xa0 + k)));
  assert.ok(!allowedAfter(0).includes(id(0xf5)) && !allowedAfter(0).includes(id(0xc0)));
  assert.ok(allowedAfter(0).includes(1) && !allowedAfter(afterE0).includes(1), 'eos only between characters');
  assert.ok(allowedAfter(0).includes(vocab.length - 1));
});

// A schema whose every value is bounded, so that even a random-weight model finishes it.
const personSchema = {
  type: 'object',
  properties: {
    name: { type: 'string', maxLength: 12 },
    age: { type: 'integer', minimum: 0, maximum: 150 },
    role: { type: 'string', enum: ['admin', 'user', 'guest'] },
    active: { type: 'boolean' },
    tags: { type: 'array', items: { type: 'string', maxLength: 6 }, maxItems: 3 },
  },
  required: ['name', 'age', 'role', 'active', 'tags'],
  additionalProperties: false,
};

async function withDaemon(model: string, fn: (d: Daemon) => Promise<void>): Promise<void> {
  const d = await startDaemon(['--model', fixture(model)]);
  try {
    await fn(d);
  } finally {
    await stopDaemon(d);
  }
}

async function errorOf(p: Promise<unknown>): Promise<APIError> {
  try {
    await p;
  } catch (e) {
    if (e instanceof APIError) return e;
    throw e;
  }
  assert.fail('expected an API error');
}

for (const model of ['qwen3_moe', 'mixtral', 'deepseek_v3']) {
  test(`json_schema on ${model} (random weights): every choice parses and validates, chat and completions, streamed and not`, async () => {
    const validate = new Ajv({ strict: true }).compile(personSchema);
    const check = (text: string, what: string) => {
      let value: unknown;
      assert.doesNotThrow(() => { value = JSON.parse(text); }, `${what}: ${JSON.stringify(text)} parses`);
      assert.ok(validate(value), `${what}: ${text} validates: ${JSON.stringify(validate.errors)}`);
    };
    await withDaemon(model, async (d) => {
      const response_format = { type: 'json_schema' as const, json_schema: { name: 'person', schema: personSchema, strict: true } };
      const chat = await d.client.chat.completions.create({
        messages: [{ role: 'user', content: 'Describe a person.' }], max_tokens: 200, temperature: 1, seed: 7, n: 4, response_format,
      } as never) as unknown as { choices: { message: { content: string }; finish_reason: string }[] };
      assert.equal(chat.choices.length, 4);
      for (const [i, c] of chat.choices.entries()) {
        assert.equal(c.finish_reason, 'stop', `choice ${i} ends because the grammar is complete`);
        check(c.message.content, `chat choice ${i}`);
      }
      const greedy = await d.client.completions.create({ prompt: 'JSON:', max_tokens: 200, temperature: 0, response_format } as never) as unknown as { choices: { text: string; finish_reason: string }[] };
      check(greedy.choices[0]!.text, 'completions, greedy');
      const stream = await d.client.chat.completions.create({
        model, messages: [{ role: 'user', content: 'Again.' }], max_tokens: 200, temperature: 1, seed: 11, stream: true, response_format,
      });
      let text = '';
      let finish: string | null = null;
      for await (const chunk of stream) {
        text += chunk.choices[0]?.delta?.content ?? '';
        finish = chunk.choices[0]?.finish_reason ?? finish;
      }
      assert.equal(finish, 'stop');
      check(text, 'streamed chat');
    });
  });
}

test('json_object, guided_regex, guided_choice, guided_grammar and guided_json; invalid ones are 400s that say why', async () => {
  await withDaemon('qwen3_moe', async (d) => {
    const c = d.client;
    const completion = async (extra: Record<string, unknown>, seed: number) => {
      const r = await c.completions.create({ prompt: 'Answer:', max_tokens: 64, temperature: 1, seed, ...extra } as never) as unknown as { choices: { text: string; finish_reason: string }[] };
      return r.choices[0]!;
    };
    for (let seed = 1; seed <= 3; seed++) {
      const regex = await completion({ guided_regex: '[a-z]{2,4}-[0-9]{3}' }, seed);
      assert.match(regex.text, /^[a-z]{2,4}-[0-9]{3}$/);
      assert.equal(regex.finish_reason, 'stop');
      const choice = await completion({ guided_choice: ['red', 'green', 'say "blue"'] }, seed);
      assert.ok(['red', 'green', 'say "blue"'].includes(choice.text), choice.text);
      const ebnf = await completion({ guided_grammar: 'root ::= "(" digit ("," digit)* ")"\ndigit ::= [0-9]' }, seed);
      assert.match(ebnf.text, /^\([0-9](,[0-9])*\)$/);
      const json = await completion({ guided_json: JSON.stringify({ type: 'object', properties: { ok: { type: 'boolean' } }, required: ['ok'] }) }, seed);
      assert.equal(typeof (JSON.parse(json.text) as { ok: unknown }).ok, 'boolean');
    }
    // json_object: a JSON object, whatever its content (only bounded by max_tokens on a random model).
    const obj = await c.chat.completions.create({ model: 'qwen3_moe', messages: [{ role: 'user', content: 'x' }], max_tokens: 400, temperature: 0, response_format: { type: 'json_object' } });
    if (obj.choices[0]!.finish_reason === 'stop') assert.equal(typeof JSON.parse(obj.choices[0]!.message.content!), 'object');
    else assert.match(obj.choices[0]!.message.content!, /^\{/);

    const bad = async (extra: Record<string, unknown>, param: string, reason: RegExp) => {
      const e = await errorOf(c.completions.create({ prompt: 'x', max_tokens: 4, ...extra } as never));
      assert.equal(e.status, 400, JSON.stringify(extra));
      assert.equal((e.error as { param: string }).param, param);
      assert.equal((e.error as { type: string }).type, 'invalid_request_error');
      assert.match(e.message, reason);
    };
    await bad({ response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'objec' } } } },
      'response_format.json_schema.schema', /JSON Schema cannot be used for structured output: Unsupported type "objec"/);
    await bad({ response_format: { type: 'json_schema', json_schema: { name: 'x' } } }, 'response_format.json_schema', /needs a JSON Schema/);
    await bad({ response_format: { type: 'xml' } }, 'response_format.type', /must be one of 'text', 'json_object', 'json_schema'/);
    await bad({ guided_regex: '([a-z]' }, 'guided_regex', /regular expression cannot be used.*parenthesis is not closed/);
    await bad({ guided_grammar: 'root ::= missing' }, 'guided_grammar', /EBNF grammar cannot be used.*Rule "missing" is not defined/);
    await bad({ guided_json: '{"type": ' }, 'guided_json', /it is not JSON/);
    await bad({ guided_choice: [] }, 'guided_choice', /non-empty array/);
    await bad({ guided_regex: 'a', guided_choice: ['a'] }, 'guided_choice', /Only one kind of structured output per request: this one sets 'guided_regex' and 'guided_choice'/);
    // Many refusals in a row (each one costs xgrammar's checker its wasm instance), then a valid one still works.
    for (let i = 0; i < 100; i++) await bad({ guided_json: { type: `t${i}` } }, 'guided_json', new RegExp(`Unsupported type "t${i}"`));
    const after = await completion({ guided_choice: ['ok'] }, 1);
    assert.equal(after.text, 'ok');
    // A plain request on the same daemon is unconstrained as before.
    const free = await completion({}, 1);
    assert.equal(typeof free.text, 'string');
  });
});

test('the fixtures this test uses have byte-fallback tokenizers (the vocabulary xgrammar is given)', () => {
  for (const m of ['qwen3_moe', 'mixtral', 'deepseek_v3']) {
    const cfg = JSON.parse(fs.readFileSync(path.join(fixture(m), 'config.json'), 'utf8')) as { vocab_size: number };
    assert.equal(vocabForGrammar(fixture(m), cfg.vocab_size).encodedVocab.length, cfg.vocab_size);
  }
});

test('rank processes (--nproc-per-node 2): the grammar travels with the request and the rank applies it', async () => {
  const d = await startDaemon(['--model', fixture('qwen3_moe'), '--nproc-per-node', '2']);
  try {
    // Four requests, so that the front's spreading by load gives both ranks some.
    const texts = await Promise.all([0, 1, 2, 3].map(async (seed) => {
      const r = await d.client.completions.create({ model: 'qwen3_moe', prompt: `x${seed}`, max_tokens: 40, temperature: 1, seed, guided_regex: '[a-z]{2}-[0-9]{3}' } as never) as unknown as { choices: { text: string; finish_reason: string }[] };
      assert.equal(r.choices[0]!.finish_reason, 'stop');
      return r.choices[0]!.text;
    }));
    for (const t of texts) assert.match(t, /^[a-z]{2}-[0-9]{3}$/);
  } finally {
    await stopDaemon(d);
  }
});
