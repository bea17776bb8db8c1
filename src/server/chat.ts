// POST /v1/chat/completions: messages -> chat template -> token ids -> n engine requests.

import type { FastifyInstance } from 'fastify';
import type { ServerContext } from './context.js';
import { invalidRequest } from './errors.js';
import { runGeneration } from './generation-route.js';
import { checkModel } from './models.js';
import { checkGrammar, grammarFromBody } from './structured-output.js';
import type { GrammarSpec } from '../structured/grammar-spec.js';
import { toolCallParser, type ToolCallParser, type ToolDef } from './tool-calls.js';
import { buildParams, checkSequenceCount, resolveMaxTokens, type SamplingBody } from './request-params.js';
import { chatBodySchema } from './schemas.js';

export interface ChatMessage {
  role: string;
  content?: string | null | { type: 'text'; text: string }[];
  name?: string;
  tool_call_id?: string;
  reasoning_content?: string | null;
  tool_calls?: { id?: string; type?: 'function'; function: { name: string; arguments: string } }[] | null;
}

interface ToolBody {
  type: 'function';
  function: { name: string; description?: string; parameters?: Record<string, unknown>; strict?: boolean | null };
}

type ToolChoice = 'none' | 'auto' | 'required' | { type: 'function'; function: { name: string } };

interface ChatBody extends SamplingBody {
  model?: string | null;
  messages: ChatMessage[];
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean | null; continuous_usage_stats?: boolean | null } | null;
  return_token_ids?: boolean | null;
  tools?: ToolBody[] | null;
  tool_choice?: ToolChoice | null;
  parallel_tool_calls?: boolean | null;
  chat_template_kwargs?: Record<string, unknown> | null;
}

/**
 * Text parts are joined with newlines (vLLM's "string" content format); the fields templates read
 * besides (name, tool_calls, tool_call_id, reasoning_content) pass through.
 */
export function flattenMessages(messages: ChatMessage[]): { role: string; content: string }[] {
  return messages.map((m) => {
    const out: { role: string; content: string; [k: string]: unknown } = {
      role: m.role,
      content: m.content == null ? '' : typeof m.content === 'string' ? m.content : m.content.map((p) => p.text).join('\n'),
    };
    if (m.name !== undefined) out.name = m.name;
    if (m.tool_call_id !== undefined) out.tool_call_id = m.tool_call_id;
    if (m.reasoning_content != null) out.reasoning_content = m.reasoning_content;
    if (m.tool_calls?.length) out.tool_calls = m.tool_calls.map((c) => ({ ...c, type: c.type ?? 'function' }));
    return out;
  });
}

/**
 * tools + tool_choice + parallel_tool_calls -> the template's tools, the output's tool-call parser,
 * and for 'required' or a named function the grammar of a well-formed call. 400s for unknown tools.
 */
function resolveTools(ctx: ServerContext, body: ChatBody): { templateTools: ToolBody[] | null; parser: ToolCallParser | null; grammar: GrammarSpec | null } {
  const tools = body.tools ?? [];
  const choice = body.tool_choice ?? (tools.length ? 'auto' : 'none');
  const names = new Set<string>();
  tools.forEach((t, i) => {
    if (names.has(t.function.name)) {
      throw invalidRequest(`Invalid value for 'tools[${i}].function.name': '${t.function.name}' is used by another tool too; tool names must be unique.`, `tools[${i}].function.name`, 'invalid_value');
    }
    names.add(t.function.name);
  });
  if (choice !== 'none' && choice !== 'auto' && tools.length === 0) {
    throw invalidRequest("Invalid value for 'tool_choice': it asks for a tool call, but 'tools' is empty or missing.", 'tool_choice', 'invalid_value');
  }
  let chosen: ToolDef[] = tools.map((t) => toolDef(t));
  if (typeof choice === 'object') {
    const named = tools.find((t) => t.function.name === choice.function.name);
    if (!named) {
      throw invalidRequest(`Invalid value for 'tool_choice': the function '${choice.function.name}' is not among the request's tools (${[...names].map((n) => `'${n}'`).join(', ')}).`,
        'tool_choice.function.name', 'unknown_tool');
    }
    chosen = [toolDef(named)];
  }
  if (choice === 'none' || tools.length === 0) return { templateTools: null, parser: null, grammar: null };
  const parserName = ctx.opts.toolCallParser ?? null;
  if (parserName === null) {
    if (choice === 'auto') return { templateTools: tools, parser: null, grammar: null };
    throw invalidRequest("This server cannot make tool calls with this model: its chat template shows no tool-call format. Start expertd with '--tool-call-parser NAME' (hermes, deepseek_v3, glm45, minimax_m2, gpt_oss, mistral).",
      'tool_choice', 'tool_calls_unsupported');
  }
  const parser = toolCallParser(parserName, tools.map((t) => toolDef(t)));
  const grammar: GrammarSpec | null = choice === 'auto' ? null
    : { type: 'structural_tag', tag: JSON.stringify(parser.grammar(chosen, typeof choice === 'string' && (body.parallel_tool_calls ?? true))) };
  return { templateTools: tools, parser, grammar };
}

function toolDef(t: ToolBody): ToolDef {
  const d: ToolDef = { name: t.function.name };
  if (t.function.description !== undefined) d.description = t.function.description;
  if (t.function.parameters !== undefined) d.parameters = t.function.parameters;
  return d;
}

export function registerChat(app: FastifyInstance, ctx: ServerContext): void {
  const { codec, engine } = ctx.opts;
  app.post<{ Body: ChatBody }>('/v1/chat/completions', { schema: { body: chatBodySchema } }, async (request, reply) => {
    const body = request.body;
    checkModel(ctx, body.model);
    if (body.stream_options != null && !body.stream) {
      throw invalidRequest("'stream_options' is only allowed when 'stream' is true.", 'stream_options', 'invalid_value');
    }
    if (body.top_logprobs != null && !body.logprobs) {
      throw invalidRequest("'top_logprobs' requires 'logprobs' to be true.", 'top_logprobs', 'invalid_value');
    }
    checkSequenceCount(1, body.n ?? 1, ctx.limits);
    const tools = resolveTools(ctx, body);
    const responseGrammar = grammarFromBody(body);
    if (tools.grammar && responseGrammar) {
      throw invalidRequest(`'tool_choice' that forces a tool call cannot be combined with '${responseGrammar.param}'.`, responseGrammar.param, 'invalid_value');
    }
    const messages = flattenMessages(body.messages);
    const record = ctx.records.get(request);
    if (record && ctx.opts.logPrompts) record.prompt = messages;
    let text: string;
    try {
      const extra: Record<string, unknown> = { ...body.chat_template_kwargs };
      if (tools.templateTools) extra.tools = tools.templateTools;
      text = codec.applyChatTemplate(messages, true, Object.keys(extra).length ? extra : undefined);
    } catch (err) {
      // Templates raise on conversations they do not accept (e.g. roles out of order).
      throw invalidRequest(`The chat template rejected these messages: ${(err as Error)?.message ?? String(err)}`, 'messages', 'invalid_messages');
    }
    // The template already holds the special tokens (BOS, role markers).
    const ids = codec.encode(text, false);
    const requested = body.max_completion_tokens ?? body.max_tokens ?? null;
    const maxTokens = resolveMaxTokens({
      promptLengths: [ids.length],
      maxModelLen: ctx.opts.maxModelLen,
      requested,
      defaultMaxTokens: 'fill',
      promptParam: 'messages',
      maxTokensParam: body.max_completion_tokens != null ? 'max_completion_tokens' : 'max_tokens',
    });
    const logprobs = body.logprobs ? (body.top_logprobs ?? 0) : null;
    const params = buildParams(body, maxTokens, logprobs, engine.info.vocabSize);
    const grammar = responseGrammar ?? (tools.grammar ? { spec: tools.grammar, param: 'tools' } : null);
    if (grammar) {
      await checkGrammar(ctx.grammarChecker, grammar);
      params.grammar = grammar.spec;
    }
    const reasoning = ctx.opts.reasoningParser ?? null;
    // Harmony's channels and some families' call markers are special tokens: keep them in the text to parse.
    if (body.skip_special_tokens == null && (reasoning === 'gpt_oss' || (tools.parser && ctx.opts.toolCallParser !== 'hermes'))) {
      params.skipSpecialTokens = false;
    }
    return runGeneration(ctx, request, reply, {
      kind: 'chat',
      prompts: [ids],
      promptTexts: [text],
      params,
      stream: body.stream ?? false,
      includeUsage: body.stream_options?.include_usage ?? false,
      continuousUsage: (body.stream_options?.include_usage ?? false) && (body.stream_options?.continuous_usage_stats ?? false),
      returnTokenIds: body.return_token_ids ?? false,
      echo: false,
      logprobs,
      chatParsing: { reasoning, tools: tools.parser },
    });
  });
}
