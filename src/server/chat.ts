// POST /v1/chat/completions: messages -> chat template -> token ids -> n engine requests.

import type { FastifyInstance } from 'fastify';
import type { ServerContext } from './context.js';
import { invalidRequest } from './errors.js';
import { runGeneration } from './generation-route.js';
import { checkModel } from './models.js';
import { checkGrammar, grammarFromBody } from './structured-output.js';
import { buildParams, checkSequenceCount, resolveMaxTokens, type SamplingBody } from './request-params.js';
import { chatBodySchema } from './schemas.js';

export interface ChatMessage {
  role: string;
  content?: string | null | { type: 'text'; text: string }[];
  name?: string;
}

interface ChatBody extends SamplingBody {
  model?: string | null;
  messages: ChatMessage[];
  logprobs?: boolean | null;
  top_logprobs?: number | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean | null } | null;
  return_token_ids?: boolean | null;
}

/** Text parts are joined with newlines (vLLM's "string" content format). */
export function flattenMessages(messages: ChatMessage[]): { role: string; content: string }[] {
  return messages.map((m) => ({
    role: m.role,
    content: m.content == null ? '' : typeof m.content === 'string' ? m.content : m.content.map((p) => p.text).join('\n'),
  }));
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
    const messages = flattenMessages(body.messages);
    const record = ctx.records.get(request);
    if (record && ctx.opts.logPrompts) record.prompt = messages;
    let text: string;
    try {
      text = codec.applyChatTemplate(messages, true);
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
    const grammar = grammarFromBody(body);
    if (grammar) {
      await checkGrammar(ctx.grammarChecker, grammar);
      params.grammar = grammar.spec;
    }
    return runGeneration(ctx, request, reply, {
      kind: 'chat',
      prompts: [ids],
      promptTexts: [text],
      params,
      stream: body.stream ?? false,
      includeUsage: body.stream_options?.include_usage ?? false,
      returnTokenIds: body.return_token_ids ?? false,
      echo: false,
      logprobs,
    });
  });
}
