// GET /v1/models, and the check that a request names the model this server serves.

import type { FastifyInstance } from 'fastify';
import type { ServerContext } from './context.js';
import { notFound } from './errors.js';

export function checkModel(ctx: ServerContext, model: string | null | undefined): void {
  if (model != null && model !== ctx.opts.servedModelName) {
    const shown = model.length > 100 ? `${model.slice(0, 100)}...` : model;
    throw notFound(`The model '${shown}' does not exist. This server serves '${ctx.opts.servedModelName}'.`, 'model', 'model_not_found');
  }
}

export function registerModels(app: FastifyInstance, ctx: ServerContext): void {
  const created = Math.floor(Date.now() / 1000);
  app.get('/v1/models', async () => {
    const info = ctx.opts.engine.info;
    return {
      object: 'list',
      data: [
        {
          id: ctx.opts.servedModelName,
          object: 'model',
          created,
          owned_by: 'expertd',
          root: info.name,
          max_model_len: ctx.opts.maxModelLen,
          architecture: info.architecture,
          num_experts: info.numExperts,
          num_experts_per_tok: info.topK,
        },
      ],
    };
  });
}
