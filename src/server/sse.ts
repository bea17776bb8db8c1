// Server-sent events exactly as OpenAI streams them: `data: {json}\n\n` chunks, then `data: [DONE]\n\n`;
// a failure mid-stream is one `data: {"error": {...}}` chunk, then the stream closes.

import type { ServerResponse } from 'node:http';
import type { ErrorBody } from './errors.js';

export class SseStream {
  private ended = false;

  constructor(private readonly res: ServerResponse, headers: Record<string, string>) {
    res.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no', // proxies (nginx) must not buffer a token stream
      ...headers,
    });
    res.flushHeaders();
  }

  /** True once we ended it or the client went away. */
  get closed(): boolean {
    return this.ended || this.res.destroyed || this.res.writableEnded;
  }

  send(chunk: unknown): void {
    if (this.closed) return;
    // NOTE: no backpressure wait: chunks are small and bounded by max_tokens; a gone client aborts.
    this.res.write(`data: ${JSON.stringify(chunk)}\n\n`);
  }

  done(): void {
    if (this.closed) return;
    this.ended = true;
    this.res.end('data: [DONE]\n\n');
  }

  fail(body: ErrorBody): void {
    if (this.closed) return;
    this.ended = true;
    this.res.end(`data: ${JSON.stringify(body)}\n\n`);
  }
}
