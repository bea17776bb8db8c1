// Starts the real expertd HTTP server on 127.0.0.1:0 around a FakeEngine + FakeCodec (test doubles),
// with a pino logger that captures lines, and an official `openai` client pointed at it.

import type { AddressInfo } from 'node:net';
import OpenAI from 'openai';
import { pino } from 'pino';
import { createMetrics, type Metrics } from '../../src/metrics/registry.js';
import { createServer, type ExpertdServer, type ServerOptions } from '../../src/server/app.js';
import { FakeCodec, FakeEngine, type FakeEngineOptions } from './fake-engine.js';

export interface Harness {
  app: ExpertdServer;
  engine: FakeEngine;
  codec: FakeCodec;
  metrics: Metrics;
  /** Parsed pino lines. */
  logs: Record<string, unknown>[];
  base: string;
  client: OpenAI;
  close(): Promise<void>;
}

export const MODEL = 'fake-moe';

export async function startServer(
  engineOpts: FakeEngineOptions = {},
  serverOpts: Partial<ServerOptions> = {},
  clientKey = 'unused',
): Promise<Harness> {
  const engine = new FakeEngine(engineOpts);
  const codec = new FakeCodec();
  const metrics = createMetrics();
  const logs: Record<string, unknown>[] = [];
  const logger = pino({ level: 'info' }, { write: (s: string) => { logs.push(JSON.parse(s) as Record<string, unknown>); } });
  const app = createServer({
    engine, codec, servedModelName: MODEL, maxQueuedRequests: 64, maxModelLen: 256, logger, metrics, logPrompts: false,
    ...serverOpts,
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const port = (app.server.address() as AddressInfo).port;
  const base = `http://127.0.0.1:${port}`;
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: clientKey, maxRetries: 0, timeout: 10_000 });
  return { app, engine, codec, metrics, logs, base, client, close: () => app.drain(2000) };
}

export interface RawResponse {
  status: number;
  headers: Headers;
  text: string;
  json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
}

export async function post(base: string, path: string, body: unknown, headers: Record<string, string> = {}): Promise<RawResponse> {
  const res = await fetch(base + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...headers },
    body: typeof body === 'string' || body instanceof Uint8Array ? body : JSON.stringify(body),
  });
  const text = await res.text();
  let json: unknown = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, text, json };
}

export async function get(base: string, path: string, headers: Record<string, string> = {}): Promise<RawResponse> {
  const res = await fetch(base + path, { headers });
  const text = await res.text();
  let json: unknown = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, text, json };
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls until cond() holds (or fails after timeoutMs). */
export async function waitFor(cond: () => boolean, timeoutMs = 3000, what = 'condition'): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** Asserts the OpenAI error shape and returns the error object. */
export function errorOf(r: RawResponse): { message: string; type: string; param: string | null; code: string | null } {
  const e = (r.json as { error?: unknown } | null)?.error as { message: string; type: string; param: string | null; code: string | null } | undefined;
  if (!e || typeof e.message !== 'string' || typeof e.type !== 'string' || !('param' in e) || !('code' in e)) {
    throw new Error(`not an OpenAI error body (status ${r.status}): ${r.text.slice(0, 300)}`);
  }
  return e;
}
