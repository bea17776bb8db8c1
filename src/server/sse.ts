// Server-sent events exactly as OpenAI streams them: `data: {json}\n\n` chunks, then `data: [DONE]\n\n`;
// a failure mid-stream is one `data: {"error": {...}}` chunk, then the stream closes. Backpressure:
// when the socket stops taking data the stream says so (pause) and again when it drains (resume).

import type { ServerResponse } from 'node:http';
import type { ErrorBody } from './errors.js';

export interface SseFlowControl {
  /** res.write() said the buffers are full: stop producing. */
  onPause(): void;
  /** The socket drained: produce again. */
  onResume(): void;
  /** Bytes queued in the process (beyond the kernel's socket buffers) passed the limit. */
  onOverflow(bufferedBytes: number): void;
}

export class SseStream {
  private ended = false;
  private blocked = false;

  constructor(
    private readonly res: ServerResponse,
    headers: Record<string, string>,
    private readonly flow: SseFlowControl | null = null,
    /** Bytes this stream may queue in the process while its client does not read. */
    private readonly bufferLimitBytes = Infinity,
  ) {
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

  /** True between a full write and the next 'drain'. */
  get paused(): boolean {
    return this.blocked;
  }

  /** Bytes written but not yet taken by the socket (above what the kernel buffers). */
  get bufferedBytes(): number {
    return this.res.writableLength;
  }

  send(chunk: unknown): void {
    if (this.closed) return;
    // NOTE: a chunk is always written (the few in flight when the producer pauses are bounded by
    // one engine step); what stops growth is the producer pausing, and the overflow limit.
    const ok = this.res.write(`data: ${JSON.stringify(chunk)}\n\n`);
    if (!ok && !this.blocked && this.flow) {
      this.blocked = true;
      let paused = false;
      // A burst (n choices in one step) passes the high-water mark while the kernel still takes
      // data: pause only when the socket has not drained by the end of this turn of the event loop.
      const check = setImmediate(() => {
        if (this.closed || !this.res.writableNeedDrain) return;
        paused = true;
        this.flow!.onPause();
      });
      this.res.once('drain', () => {
        clearImmediate(check);
        this.blocked = false;
        if (paused && !this.closed) this.flow!.onResume();
      });
    }
    if (this.flow && this.res.writableLength > this.bufferLimitBytes) this.flow.onOverflow(this.res.writableLength);
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
