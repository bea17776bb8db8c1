// Tool calls per model family: how the model writes a call (parsed into OpenAI tool_calls, streamed
// or not), and the grammar that makes `tool_choice: "required"` or a named function always produce
// a well-formed call in that family's syntax (an xgrammar structural tag).
import { randomBytes } from 'node:crypto';

import { xgrammarSchemaValue } from '../structured/grammar-spec.js';
import { findMarker, partialMarkerLength } from './text-markers.js';

export const TOOL_CALL_PARSERS = ['hermes', 'deepseek_v3', 'glm45', 'minimax_m2', 'gpt_oss', 'mistral'] as const;
export type ToolCallParserName = typeof TOOL_CALL_PARSERS[number];

export interface ToolDef {
  name: string;
  description?: string;
  /** JSON Schema of the arguments (absent: any object). */
  parameters?: Record<string, unknown>;
}

export interface ParsedToolCall {
  name: string;
  /** The arguments as JSON text (OpenAI's `function.arguments`). */
  arguments: string;
}

export interface ToolCallParser {
  /** Text that opens the tool-call part of an output; what comes before is content. */
  readonly starts: readonly string[];
  /** Splits a complete output (after reasoning) into content and calls. */
  parse(text: string): { content: string; calls: ParsedToolCall[] };
  /** An xgrammar structural tag: one call to one of tools (parallel: one or more). */
  grammar(tools: readonly ToolDef[], parallel: boolean): Record<string, unknown>;
}

/** Chooses a parser from the chat template's markers (auto), or null when it shows none. */
export function detectToolCallParser(chatTemplate: string | null, modelType: string): ToolCallParserName | null {
  const t = chatTemplate ?? '';
  if (modelType === 'gpt_oss' || t.includes('to=functions')) return 'gpt_oss';
  if (t.includes('<minimax:tool_call>')) return 'minimax_m2';
  if (t.includes('<tool_call>') && t.includes('<arg_key>')) return 'glm45';
  if (t.includes('<tool_call>')) return 'hermes';
  if (t.includes('tool▁calls▁begin')) return 'deepseek_v3';
  if (t.includes('[TOOL_CALLS]')) return 'mistral';
  return null;
}

export function newToolCallId(): string {
  return `call_${randomBytes(12).toString('hex')}`;
}

const anyObject = { type: 'object' };
const schemaOf = (t: ToolDef) => xgrammarSchemaValue(t.parameters ?? anyObject) as Record<string, unknown>;

/** JSON text of a value, or the text itself when it is not JSON (so a call is never lost). */
function argsJson(value: unknown): string {
  return JSON.stringify(value ?? {});
}

function tryJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** Everything outside the matched call spans, trimmed: the content. */
function outside(text: string, spans: [number, number][]): string {
  let out = '';
  let at = 0;
  for (const [a, b] of spans) {
    out += text.slice(at, a);
    at = b;
  }
  return (out + text.slice(at)).trim();
}

/**
 * Structural tag of one or more (parallel) or exactly one of the tags, inside a wrapper when the
 * family has one. NOTE: xgrammar 0.1.27 refuses tags_with_separator with an empty separator, with
 * stop_after_first, or followed by anything in a sequence: hence `or` for one call and a tag for
 * the wrapper.
 */
function callsTag(tags: Record<string, unknown>[], parallel: boolean, separator: string, open = '', close = ''): Record<string, unknown> {
  const calls = parallel && tags.length > 0
    ? { type: 'tags_with_separator', tags, separator, at_least_one: true, stop_after_first: false }
    : tags.length === 1 ? tags[0]! : { type: 'or', elements: tags };
  return { type: 'structural_tag', format: open || close ? { type: 'tag', begin: open, content: calls, end: close } : calls };
}

/** Qwen3 / Qwen2.5 / Hermes: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> */
const hermes: ToolCallParser = {
  starts: ['<tool_call>'],
  parse(text) {
    const calls: ParsedToolCall[] = [];
    const spans: [number, number][] = [];
    const re = /<tool_call>\s*([\s\S]*?)\s*(?:<\/tool_call>|$)/g;
    for (let m; (m = re.exec(text)) !== null;) {
      if (m[0] === '') break;
      const v = tryJson(m[1]!) as { name?: unknown; arguments?: unknown; parameters?: unknown } | undefined;
      if (!v || typeof v.name !== 'string') continue;
      calls.push({ name: v.name, arguments: argsJson(v.arguments ?? v.parameters) });
      spans.push([m.index, m.index + m[0].length]);
    }
    return { content: outside(text, spans), calls };
  },
  grammar(tools, parallel) {
    return callsTag(tools.map((t) => ({
      type: 'tag', begin: `<tool_call>\n{"name": ${JSON.stringify(t.name)}, "arguments": `,
      content: { type: 'json_schema', json_schema: schemaOf(t) }, end: '}\n</tool_call>',
    })), parallel, '\n');
  },
};

const DS = {
  callsBegin: '<｜tool▁calls▁begin｜>', callsEnd: '<｜tool▁calls▁end｜>',
  callBegin: '<｜tool▁call▁begin｜>', callEnd: '<｜tool▁call▁end｜>', sep: '<｜tool▁sep｜>',
};

/**
 * DeepSeek-V3 / R1: <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>...
 * (and V3.1's NAME<｜tool▁sep｜>{...} form).
 */
const deepseekV3: ToolCallParser = {
  starts: [DS.callsBegin, DS.callBegin],
  parse(text) {
    const calls: ParsedToolCall[] = [];
    const spans: [number, number][] = [];
    const re = /<｜tool▁call▁begin｜>([\s\S]*?)<｜tool▁sep｜>([\s\S]*?)(?:<｜tool▁call▁end｜>|$)/g;
    for (let m; (m = re.exec(text)) !== null;) {
      let name: string;
      let args: string;
      const fenced = /^([^\n]*)\n```(?:json)?\n([\s\S]*?)\n?```\s*$/.exec(m[2]!);
      if (m[1]!.trim() === 'function' && fenced) {
        name = fenced[1]!.trim();
        args = fenced[2]!;
      } else {
        name = m[1]!.trim();
        args = m[2]!.trim();
      }
      const v = tryJson(args);
      if (!name || v === undefined) continue;
      calls.push({ name, arguments: argsJson(v) });
      spans.push([m.index, m.index + m[0].length]);
    }
    const content = outside(text, spans).replace(DS.callsBegin, '').replace(DS.callsEnd, '').trim();
    return { content, calls };
  },
  grammar(tools, parallel) {
    return callsTag(tools.map((t) => ({
      type: 'tag', begin: `${DS.callBegin}function${DS.sep}${t.name}\n\`\`\`json\n`,
      content: { type: 'json_schema', json_schema: schemaOf(t) }, end: `\n\`\`\`${DS.callEnd}`,
    })), parallel, '\n', DS.callsBegin, DS.callsEnd);
  },
};

/** Property schemas of a tool, in order, and whether each value is written as raw text (strings). */
function properties(t: ToolDef): { key: string; schema: Record<string, unknown>; raw: boolean; required: boolean }[] {
  const p = (t.parameters?.properties ?? {}) as Record<string, Record<string, unknown>>;
  const req = new Set((t.parameters?.required ?? []) as string[]);
  return Object.entries(p).map(([key, schema]) => ({ key, schema, raw: schema?.type === 'string', required: req.has(key) }));
}

/** Arguments written as key/value text: a string-typed value stays text, others are JSON if they parse. */
function xmlArgs(pairs: [string, string][], tool: ToolDef | undefined): string {
  const props = new Map(tool ? properties(tool).map((p) => [p.key, p]) : []);
  const out: Record<string, unknown> = {};
  for (const [k, raw] of pairs) {
    const v = raw.replace(/^\n/, '').replace(/\n$/, '');
    if (props.get(k)?.raw) out[k] = v;
    else { const j = tryJson(v); out[k] = j === undefined ? v : j; }
  }
  return JSON.stringify(out);
}

/**
 * The key/value grammar of the XML-ish families: the newline after the call's name, then every
 * required property in schema order (never empty: xgrammar refuses an empty const_string).
 */
function xmlArgsContent(t: ToolDef, pair: (key: string) => [string, string]): Record<string, unknown> {
  const elements: Record<string, unknown>[] = [{ type: 'const_string', value: '\n' }];
  for (const p of properties(t).filter((x) => x.required)) {
    const [open, close] = pair(p.key);
    elements.push({ type: 'const_string', value: open });
    elements.push(p.raw
      ? { type: 'regex', pattern: typeof p.schema.maxLength === 'number' ? `[^<\\x00-\\x1f]{0,${p.schema.maxLength}}` : '[^<\\x00-\\x1f]*' }
      : { type: 'json_schema', json_schema: xgrammarSchemaValue(p.schema) });
    elements.push({ type: 'const_string', value: close });
  }
  return elements.length === 1 ? elements[0]! : { type: 'sequence', elements };
}

/** GLM-4.5: <tool_call>NAME\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n</tool_call> */
function glm45(toolsByName: (n: string) => ToolDef | undefined): ToolCallParser {
  return {
    starts: ['<tool_call>'],
    parse(text) {
      const calls: ParsedToolCall[] = [];
      const spans: [number, number][] = [];
      const re = /<tool_call>([^\n<]*)\n?([\s\S]*?)(?:<\/tool_call>|$)/g;
      for (let m; (m = re.exec(text)) !== null;) {
        if (m[0] === '') break;
        const name = m[1]!.trim();
        if (!name) continue;
        const pairs: [string, string][] = [];
        const kv = /<arg_key>([\s\S]*?)<\/arg_key>\s*<arg_value>([\s\S]*?)<\/arg_value>/g;
        for (let p; (p = kv.exec(m[2]!)) !== null;) pairs.push([p[1]!.trim(), p[2]!]);
        calls.push({ name, arguments: xmlArgs(pairs, toolsByName(name)) });
        spans.push([m.index, m.index + m[0].length]);
      }
      return { content: outside(text, spans), calls };
    },
    grammar(tools, parallel) {
      return callsTag(tools.map((t) => ({
        type: 'tag', begin: `<tool_call>${t.name}`,
        content: xmlArgsContent(t, (k) => [`<arg_key>${k}</arg_key>\n<arg_value>`, '</arg_value>\n']), end: '</tool_call>',
      })), parallel, '\n');
    },
  };
}

/** MiniMax-M2: <minimax:tool_call>\n<invoke name="NAME">\n<parameter name="k">v</parameter>\n</invoke>\n</minimax:tool_call> */
function minimaxM2(toolsByName: (n: string) => ToolDef | undefined): ToolCallParser {
  return {
    starts: ['<minimax:tool_call>'],
    parse(text) {
      const calls: ParsedToolCall[] = [];
      const blocks: [number, number][] = [];
      const block = /<minimax:tool_call>([\s\S]*?)(?:<\/minimax:tool_call>|$)/g;
      for (let b; (b = block.exec(text)) !== null;) {
        if (b[0] === '') break;
        blocks.push([b.index, b.index + b[0].length]);
        const inv = /<invoke name="([^"]+)">([\s\S]*?)(?:<\/invoke>|$)/g;
        for (let m; (m = inv.exec(b[1]!)) !== null;) {
          if (m[0] === '') break;
          const pairs: [string, string][] = [];
          const kv = /<parameter name="([^"]+)">([\s\S]*?)<\/parameter>/g;
          for (let p; (p = kv.exec(m[2]!)) !== null;) pairs.push([p[1]!, p[2]!]);
          calls.push({ name: m[1]!, arguments: xmlArgs(pairs, toolsByName(m[1]!)) });
        }
      }
      return { content: outside(text, blocks), calls };
    },
    grammar(tools, parallel) {
      return callsTag(tools.map((t) => ({
        type: 'tag', begin: `<invoke name="${t.name}">`,
        content: xmlArgsContent(t, (k) => [`<parameter name="${k}">`, '</parameter>\n']), end: '</invoke>',
      })), parallel, '\n', '<minimax:tool_call>\n', '\n</minimax:tool_call>');
    },
  };
}

/** gpt-oss harmony: <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|> */
const gptOss: ToolCallParser = {
  starts: ['<|channel|>commentary', '<|start|>assistant to=', ' to=functions.'],
  parse(text) {
    const calls: ParsedToolCall[] = [];
    const spans: [number, number][] = [];
    const re = /(?:<\|start\|>assistant|<\|channel\|>commentary)?[^<]*?to=functions\.([\w.-]+)[\s\S]*?<\|message\|>([\s\S]*?)(?:<\|call\|>|$)/g;
    for (let m; (m = re.exec(text)) !== null;) {
      const v = tryJson(m[2]!.trim());
      if (v === undefined) continue;
      calls.push({ name: m[1]!, arguments: argsJson(v) });
      spans.push([m.index, m.index + m[0].length]);
    }
    return { content: outside(text, spans), calls };
  },
  grammar(tools, parallel) {
    return callsTag(tools.map((t) => ({
      type: 'tag', begin: `<|channel|>commentary to=functions.${t.name} <|constrain|>json<|message|>`,
      content: { type: 'json_schema', json_schema: schemaOf(t) }, end: '<|call|>',
    })), parallel, '<|start|>assistant');
  },
};

/** Mistral: [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...] (and the newer NAME[ARGS]{...} form). */
const mistral: ToolCallParser = {
  starts: ['[TOOL_CALLS]'],
  parse(text) {
    const i = text.indexOf('[TOOL_CALLS]');
    if (i < 0) return { content: text.trim(), calls: [] };
    const body = text.slice(i + '[TOOL_CALLS]'.length).trim();
    const calls: ParsedToolCall[] = [];
    const list = tryJson(body);
    if (Array.isArray(list)) {
      for (const c of list as { name?: unknown; arguments?: unknown }[]) {
        if (c && typeof c.name === 'string') calls.push({ name: c.name, arguments: argsJson(c.arguments) });
      }
    } else {
      const re = /([\w.-]+)\[ARGS\]([\s\S]*?)(?=\[TOOL_CALLS\]|$)/g;
      for (let m; (m = re.exec(body)) !== null;) {
        const v = tryJson(m[2]!.trim());
        if (v !== undefined) calls.push({ name: m[1]!, arguments: argsJson(v) });
      }
    }
    return { content: text.slice(0, i).trim(), calls };
  },
  grammar(tools, parallel) {
    return callsTag(tools.map((t) => ({
      type: 'tag', begin: `{"name": ${JSON.stringify(t.name)}, "arguments": `,
      content: { type: 'json_schema', json_schema: schemaOf(t) }, end: '}',
    })), parallel, ', ', '[TOOL_CALLS][', ']');
  },
};

export function toolCallParser(name: ToolCallParserName, tools: readonly ToolDef[]): ToolCallParser {
  const byName = (n: string) => tools.find((t) => t.name === n);
  switch (name) {
    case 'hermes': return hermes;
    case 'deepseek_v3': return deepseekV3;
    case 'glm45': return glm45(byName);
    case 'minimax_m2': return minimaxM2(byName);
    case 'gpt_oss': return gptOss;
    case 'mistral': return mistral;
  }
}

/**
 * Streaming: content passes through until a tool-call opener appears (a tail that could still
 * become one is held back); from there the text is kept and parsed as calls at the end.
 */
export class ToolCallStream {
  private buf = '';
  private inCalls = false;

  constructor(private readonly parser: ToolCallParser) {}

  /** Content that is final now. */
  push(text: string): string {
    this.buf += text;
    if (this.inCalls) return '';
    const hit = findMarker(this.buf, this.parser.starts);
    if (hit) {
      const content = this.buf.slice(0, hit[0]);
      this.buf = this.buf.slice(hit[0]);
      this.inCalls = true;
      return content;
    }
    const keep = partialMarkerLength(this.buf, this.parser.starts);
    const content = this.buf.slice(0, this.buf.length - keep);
    this.buf = this.buf.slice(this.buf.length - keep);
    return content;
  }

  /** The end of the output: the calls, and any content that was held back or follows them. */
  finish(): { content: string; calls: ParsedToolCall[] } {
    const rest = this.buf;
    this.buf = '';
    if (!this.inCalls) return { content: rest, calls: [] };
    return this.parser.parse(rest);
  }
}
