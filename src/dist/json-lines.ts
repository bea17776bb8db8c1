// One JSON object per line over a TCP socket: the framing of the node relays' link to the front.
import { EventEmitter } from 'node:events';
import type net from 'node:net';

/** Lines above this are refused (a peer that is not a relay, or a corrupt stream). */
const MAX_LINE_BYTES = 64 * 1024 * 1024;

export class JsonLines<In> extends EventEmitter {
  private buffered = '';
  private closed = false;

  constructor(readonly socket: net.Socket) {
    super();
    socket.setEncoding('utf8');
    socket.setNoDelay(true);
    socket.on('data', (chunk: string) => {
      this.buffered += chunk;
      let nl: number;
      while ((nl = this.buffered.indexOf('\n')) >= 0) {
        const line = this.buffered.slice(0, nl);
        this.buffered = this.buffered.slice(nl + 1);
        let m: In;
        try {
          m = JSON.parse(line) as In;
        } catch {
          this.close('a line that is not JSON');
          return;
        }
        this.emit('message', m);
      }
      if (this.buffered.length > MAX_LINE_BYTES) this.close(`a line over ${MAX_LINE_BYTES} bytes`);
    });
    socket.on('error', (e: Error) => this.close(e.message));
    socket.on('close', () => this.close('connection closed'));
  }

  write(m: unknown): void {
    if (!this.closed) this.socket.write(`${JSON.stringify(m)}\n`);
  }

  close(why: string): void {
    if (this.closed) return;
    this.closed = true;
    this.socket.destroy();
    this.emit('close', why);
  }
}
