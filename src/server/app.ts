// createServer(): the Fastify app with every route, the JSON body parser, auth, error mapping,
// per-request log lines and metrics, and drain() for graceful shutdown. It never computes.

import { randomUUID } from 'node:crypto';
import type { Socket } from 'node:net';
import Fastify, { LogController, type FastifyInstance, type FastifyReply } from 'fastify';
import { makeAuthCheck, openPaths } from './auth.js';
import { registerChat } from './chat.js';
import { registerCompletions } from './completions.js';
import { ServerContext, type ServerOptions } from './context.js';
import { ApiError, invalidRequest, notFound, serverError, toApiError } from './errors.js';
import { logFields } from './generation-route.js';
import { registerModels } from './models.js';
import { registerTokenize } from './tokenize.js';
import { packageVersion } from './version.js';

export type { ServerOptions } from './context.js';

export type ExpertdServer = FastifyInstance & {
  /** Stop accepting (503), wait for in-flight requests up to timeoutMs, abort the rest, close. */
  drain(timeoutMs: number): Promise<void>;
};

const DEFAULT_BODY_LIMIT = 4 * 1024 * 1024;
/** After drain, how long responses that just ended get to flush before sockets are closed. */
const CLOSE_GRACE_MS = 500;
const generationRoutes = new Set(['/v1/completions', '/v1/chat/completions']);

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** JSON bodies only: a strict UTF-8 decode and no prototype keys (what secure-json-parse guards). */
function parseJsonBody(buf: Buffer): unknown {
  if (buf.length === 0) throw invalidRequest('The request body is empty; send a JSON object.', null, 'invalid_json');
  let text: string;
  try {
    text = utf8.decode(buf);
  } catch {
    throw invalidRequest('The request body is not valid UTF-8.', null, 'invalid_utf8');
  }
  try {
    if (!text.includes('__proto__') && !text.includes('constructor')) return JSON.parse(text);
    return JSON.parse(text, (key, value: unknown) => {
      if (key === '__proto__' || (key === 'constructor' && value !== null && typeof value === 'object' && 'prototype' in value)) {
        throw invalidRequest('The request body contains a forbidden prototype property.', key, 'invalid_json');
      }
      return value;
    });
  } catch (err) {
    if (err instanceof ApiError) throw err;
    throw invalidRequest('We could not parse the JSON body of your request.', null, 'invalid_json');
  }
}

function clientErrorHandler(err: Error & { code?: string }, socket: Socket): void {
  // Malformed HTTP never reaches a route: answer in the same error shape, then hang up.
  if (!socket.writable) return;
  const tooLarge = err.code === 'HPE_HEADER_OVERFLOW';
  const status = tooLarge ? 431 : 400;
  const body = JSON.stringify({
    error: {
      message: tooLarge ? 'The request headers are too large.' : 'The HTTP request is malformed.',
      type: 'invalid_request_error', param: null, code: tooLarge ? 'headers_too_large' : 'bad_request',
    },
  });
  socket.end(
    `HTTP/1.1 ${status} ${tooLarge ? 'Request Header Fields Too Large' : 'Bad Request'}\r\n` +
      `Content-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
  );
}

export function createServer(opts: ServerOptions): ExpertdServer {
  const ctx = new ServerContext(opts);
  const bodyLimit = opts.bodyLimit ?? DEFAULT_BODY_LIMIT;
  const app = Fastify({
    loggerInstance: opts.logger,
    genReqId: () => randomUUID(),
    logController: new LogController({ disableRequestLogging: true }), // one line per request, written below
    bodyLimit,
    clientErrorHandler,
    // Errors raised before routing (a URL that does not decode) get the same shape as the rest.
    frameworkErrors: (_err, _request, rawReply) => {
      const reply = rawReply as unknown as FastifyReply;
      void reply.code(400).type('application/json; charset=utf-8')
        .send(invalidRequest('The request URL is malformed.', null, 'invalid_url').body());
    },
    ajv: {
      // Known fields are type-checked, never coerced ("5" is not 5) nor stripped; Infinity is not a number.
      customOptions: { coerceTypes: false, removeAdditional: false, useDefaults: false, allErrors: false, strictNumbers: true, verbose: true },
    },
  }) as unknown as FastifyInstance;
  opts.metrics.bindEngineStats(() => opts.engine.stats());

  // Only JSON is accepted: text/plain or form bodies would let a web page post to a local daemon.
  app.removeAllContentTypeParsers();
  const jsonParser = (_req: unknown, body: string | Buffer, done: (err: Error | null, body?: unknown) => void) => {
    try {
      done(null, parseJsonBody(body as Buffer));
    } catch (err) {
      done(err as Error, undefined);
    }
  };
  app.addContentTypeParser('application/json', { parseAs: 'buffer', bodyLimit }, jsonParser);
  app.addContentTypeParser(/^application\/[\w.-]+\+json$/, { parseAs: 'buffer', bodyLimit }, jsonParser);

  const authCheck = opts.apiKey ? makeAuthCheck(opts.apiKey) : null;
  app.addHook('onRequest', async (request) => {
    const path = request.url.split('?', 1)[0]!;
    ctx.records.set(request, { route: request.routeOptions.url ?? 'unmatched' });
    if (authCheck && !openPaths.has(path)) authCheck(request.headers.authorization);
    if (ctx.draining && !openPaths.has(path)) {
      throw new ApiError(503, 'overloaded_error', 'The server is shutting down; retry on another instance.', null, 'server_shutting_down', { 'retry-after': ctx.retryAfter });
    }
  });

  app.addHook('onResponse', async (request, reply) => {
    const record = ctx.records.get(request);
    if (!record || record.logged) return;
    record.logged = true;
    const status = reply.statusCode;
    opts.metrics.httpRequests.inc({ route: record.route, status: String(status) });
    const line = { method: request.method, ...logFields(record), status, durationMs: Math.round(reply.elapsedTime * 10) / 10 };
    // Generation requests are the interesting traffic; probes and scrapes stay at debug.
    if (generationRoutes.has(record.route)) request.log.info(line, 'request completed');
    else request.log.debug(line, 'request completed');
  });

  app.setErrorHandler(async (err, request, reply) => {
    let api = toApiError(err);
    if (!api) {
      request.log.error({ err }, 'unhandled error');
      api = serverError();
    }
    const record = ctx.records.get(request);
    if (record) record.error = api.message;
    for (const [k, v] of Object.entries(api.headers)) reply.header(k, v);
    return reply.code(api.statusCode).type('application/json; charset=utf-8').send(api.body());
  });

  app.setNotFoundHandler(async (request) => {
    const url = request.url.length > 200 ? `${request.url.slice(0, 200)}...` : request.url;
    throw notFound(`Unknown route: ${request.method} ${url}`, null, 'route_not_found');
  });

  app.addHook('onClose', async () => ctx.grammarChecker.close());
  registerCompletions(app, ctx);
  registerChat(app, ctx);
  registerModels(app, ctx);
  registerTokenize(app, ctx);

  app.get('/health', async (_request, reply) => {
    const state = ctx.draining ? 'draining' : opts.engine.state();
    if (state !== 'ready') reply.code(503);
    return { status: state === 'ready' ? 'ok' : state };
  });

  app.get('/metrics', async (_request, reply) => {
    reply.type(opts.metrics.contentType);
    return opts.metrics.text();
  });

  app.get('/version', async () => ({ version: packageVersion() }));

  const server = app as ExpertdServer;
  let draining: Promise<void> | null = null;
  server.drain = (timeoutMs: number) => {
    draining ??= (async () => {
      ctx.draining = true;
      let timer: NodeJS.Timeout | undefined;
      const timedOut = await Promise.race([
        ctx.idle().then(() => false),
        new Promise<boolean>((r) => { timer = setTimeout(() => r(true), timeoutMs); }),
      ]);
      clearTimeout(timer);
      if (timedOut) {
        opts.logger.warn({ inFlight: ctx.active.size, timeoutMs }, 'drain timed out; aborting the rest');
        for (const g of [...ctx.active]) g.abort('server shutting down');
      }
      // Whatever was in flight has ended; a connection still open now is idle or never sent a
      // request (clients open spare sockets), so it need not hold the shutdown for its keep-alive.
      const closing = app.close();
      const force = setTimeout(() => app.server.closeAllConnections(), CLOSE_GRACE_MS);
      await closing;
      clearTimeout(force);
    })();
    return draining;
  };
  return server;
}
