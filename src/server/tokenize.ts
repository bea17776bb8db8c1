// POST /tokenize ({prompt} or {messages} -> token ids), POST /detokenize (ids -> text) and GET
// /tokenizer_info (special tokens, chat template), as vLLM has them: clients such as
// lm-evaluation-harness tokenize through the server with the three, no tokenizer files of their own.

import type { FastifyInstance } from 'fastify';
import { flattenMessages, type ChatMessage } from './chat.js';
import type { ServerContext } from './context.js';
import { invalidRequest } from './errors.js';
import { checkModel } from './models.js';
import { checkTokenIds } from './request-params.js';
import { detokenizeBodySchema, tokenizeBodySchema } from './schemas.js';

interface TokenizeBody {
  model?: string | null;
  prompt?: string;
  messages?: ChatMessage[];
  add_special_tokens?: boolean | null;
  add_generation_prompt?: boolean | null;
}

export function registerTokenize(app: FastifyInstance, ctx: ServerContext): void {
  const { codec } = ctx.opts;
  app.post<{ Body: TokenizeBody }>('/tokenize', { schema: { body: tokenizeBodySchema } }, async (request) => {
    const b = request.body;
    checkModel(ctx, b.model);
    let tokens: number[];
    if (b.prompt !== undefined && b.messages !== undefined) {
      throw invalidRequest("Send either 'prompt' or 'messages', not both.", 'messages', 'invalid_value');
    } else if (b.prompt !== undefined) {
      tokens = codec.encode(b.prompt, b.add_special_tokens ?? true);
    } else if (b.messages !== undefined) {
      let text: string;
      try {
        text = codec.applyChatTemplate(flattenMessages(b.messages), b.add_generation_prompt ?? true);
      } catch (err) {
        throw invalidRequest(`The chat template rejected these messages: ${(err as Error)?.message ?? String(err)}`, 'messages', 'invalid_messages');
      }
      tokens = codec.encode(text, b.add_special_tokens ?? false);
    } else {
      throw invalidRequest("Missing required parameter: 'prompt' or 'messages'.", 'prompt', 'missing_required_parameter');
    }
    return { tokens, count: tokens.length, max_model_len: ctx.opts.maxModelLen };
  });

  app.get('/tokenizer_info', async () => ({ ...codec.tokenizerInfo?.(), model_max_length: ctx.opts.maxModelLen }));

  app.post<{ Body: { model?: string | null; tokens: number[] } }>('/detokenize', { schema: { body: detokenizeBodySchema } }, async (request) => {
    checkModel(ctx, request.body.model);
    checkTokenIds(request.body.tokens, ctx.opts.engine.info.vocabSize, 'tokens');
    return { prompt: codec.decode(request.body.tokens, false) };
  });
}
