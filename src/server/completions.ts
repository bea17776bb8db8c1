// POST /v1/completions: prompt (string | string[] | ids | ids[]) -> one engine request per prompt x n.

import type { FastifyInstance } from 'fastify';
import type { ServerContext } from './context.js';
import { invalidRequest } from './errors.js';
import { runGeneration } from './generation-route.js';
import { checkModel } from './models.js';
import { checkGrammar, grammarFromBody } from './structured-output.js';
import { buildParams, checkSequenceCount, checkTokenIds, resolveMaxTokens, type SamplingBody } from './request-params.js';
import { completionBodySchemaFor } from './schemas.js';

interface CompletionBody extends SamplingBody {
  model?: string | null;
  prompt: string | string[] | number[] | number[][];
  logprobs?: number | null;
  echo?: boolean | null;
  stream?: boolean | null;
  stream_options?: { include_usage?: boolean | null; continuous_usage_stats?: boolean | null } | null;
  return_token_ids?: boolean | null;
  suffix?: string | null;
  best_of?: number | null;
}

export function registerCompletions(app: FastifyInstance, ctx: ServerContext): void {
  const { codec, engine } = ctx.opts;
  app.post<{ Body: CompletionBody }>('/v1/completions', { schema: { body: completionBodySchemaFor(ctx.limits.maxPromptsPerRequest) } }, async (request, reply) => {
    const body = request.body;
    checkModel(ctx, body.model);
    if (body.stream_options != null && !body.stream) {
      throw invalidRequest("'stream_options' is only allowed when 'stream' is true.", 'stream_options', 'invalid_value');
    }
    // Fields OpenAI's legacy completions had that expertd does not do: refused, not ignored.
    if (body.suffix != null && body.suffix !== '') {
      throw invalidRequest("'suffix' (insertion after the completion) is not supported; send the text before the insertion point as the prompt.", 'suffix', 'unsupported_parameter');
    }
    if (body.best_of != null && body.best_of !== (body.n ?? 1)) {
      throw invalidRequest(`'best_of' is not supported: the n sampled completions are all returned. Drop it or set it to n (${body.n ?? 1}).`, 'best_of', 'unsupported_parameter');
    }
    if (body.echo && body.logprobs != null && engine.info.promptLogprobs === false) {
      throw invalidRequest("'echo' with 'logprobs' (the prompt's logprobs) is computed by the CPU engine only; this server's engine samples on the device.", 'echo', 'unsupported_parameter');
    }
    const scoreOnly = body.max_tokens === 0;
    if (scoreOnly && !body.echo) {
      throw invalidRequest("Invalid value for 'max_tokens': 0 is allowed only with 'echo' (to score the prompt); otherwise it must be >= 1.", 'max_tokens', 'invalid_value');
    }
    const record = ctx.records.get(request);
    if (record && ctx.opts.logPrompts) record.prompt = body.prompt;
    // Before any tokenizing: a request that could never be admitted costs nothing.
    const p0 = body.prompt;
    checkSequenceCount(typeof p0 === 'string' || typeof p0[0] === 'number' ? 1 : p0.length, body.n ?? 1, ctx.limits);

    // Normalise the four prompt forms to token-id lists (and the text echo shows).
    let prompts: number[][];
    let promptTexts: string[];
    const p = body.prompt;
    if (typeof p === 'string') {
      prompts = [codec.encode(p, true)];
      promptTexts = [p];
    } else if (typeof p[0] === 'string') {
      promptTexts = p as string[];
      prompts = promptTexts.map((t) => codec.encode(t, true));
    } else if (typeof p[0] === 'number') {
      prompts = [p as number[]];
      promptTexts = [];
    } else {
      prompts = p as number[][];
      promptTexts = [];
    }
    if (promptTexts.length === 0) {
      prompts.forEach((ids, i) => checkTokenIds(ids, engine.info.vocabSize, prompts.length > 1 ? `prompt[${i}]` : 'prompt'));
      if (body.echo) promptTexts = prompts.map((ids) => codec.decode(ids, false));
    }
    const maxTokens = resolveMaxTokens({
      promptLengths: prompts.map((ids) => ids.length),
      maxModelLen: ctx.opts.maxModelLen,
      requested: scoreOnly ? 1 : body.max_tokens ?? null, // max_tokens 0: one token is run, none returned
      defaultMaxTokens: 16, // OpenAI's default for completions
      promptParam: 'prompt',
      maxTokensParam: 'max_tokens',
    });
    const params = buildParams(body, maxTokens, body.logprobs ?? null, engine.info.vocabSize);
    // echo with logprobs scores the prompt too (vLLM's prompt logprobs; lm-eval's loglikelihood reads them).
    if (body.echo && body.logprobs != null) params.promptLogprobs = body.logprobs;
    const grammar = grammarFromBody(body);
    if (grammar) {
      await checkGrammar(ctx.grammarChecker, grammar);
      params.grammar = grammar.spec;
    }
    return runGeneration(ctx, request, reply, {
      kind: 'completion',
      prompts,
      promptTexts,
      params,
      stream: body.stream ?? false,
      includeUsage: body.stream_options?.include_usage ?? false,
      continuousUsage: (body.stream_options?.include_usage ?? false) && (body.stream_options?.continuous_usage_stats ?? false),
      returnTokenIds: body.return_token_ids ?? false,
      echo: body.echo ?? false,
      scoreOnly,
      // Token-id prompts echo decoded with their special tokens (as vLLM does), text prompts as sent.
      echoSpecialTokens: typeof p[0] === 'number' || Array.isArray(p[0]),
      logprobs: body.logprobs ?? null,
    });
  });
}
