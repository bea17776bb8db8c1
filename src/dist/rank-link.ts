// The front's line to one rank: a local child over IPC, or a rank on another node through that
// node's relay connection. Either way: send, receive, and one 'gone' when the line is lost.
import type { ChildProcess } from 'node:child_process';
import { EventEmitter } from 'node:events';

import type { FrontToRank, RankToFront } from './rank-protocol.js';

export interface RankLink extends EventEmitter {
  readonly rank: number;
  readonly nodeRank: number;
  /** 'pid P' for a local child, 'node N' for a remote rank: for messages. */
  readonly where: string;
  /** True once 'gone' has fired. */
  readonly isGone: boolean;
  send(m: FrontToRank): void;
  /** Ends the rank for good (SIGKILL a local child; a remote one is its relay's to end). */
  kill(): void;
  // events: 'message' (RankToFront), 'gone' (reason: string, clean: boolean)
}

/** A rank process forked by this launcher. 'gone' fires once, when the child exits. */
export class ChildRankLink extends EventEmitter implements RankLink {
  readonly where: string;
  private exited = false;

  constructor(readonly rank: number, readonly nodeRank: number, readonly child: ChildProcess) {
    super();
    this.where = `pid ${child.pid}`;
    child.on('message', (m: RankToFront) => this.emit('message', m));
    child.on('exit', (code, signal) => {
      this.exited = true;
      this.emit('gone', signal ? `exited on signal ${signal}` : `exited with code ${code}`, code === 0);
    });
  }

  get isGone(): boolean {
    return this.exited;
  }

  send(m: FrontToRank): void {
    if (this.exited || !this.child.connected) return;
    this.child.send(m, (err) => { if (err) this.child.kill('SIGKILL'); });
  }

  kill(): void {
    if (!this.exited) this.child.kill('SIGKILL');
  }
}

/** A rank on another node, reached through its node's relay (see relay.ts). */
export class RelayedRankLink extends EventEmitter implements RankLink {
  readonly where: string;
  isGone = false;

  constructor(readonly rank: number, readonly nodeRank: number, private readonly write: (m: FrontToRank) => void,
      private readonly dropNode: () => void) {
    super();
    this.where = `node ${nodeRank}`;
  }

  send(m: FrontToRank): void {
    if (!this.isGone) this.write(m);
  }

  kill(): void {
    this.dropNode();
  }

  /** Called by the front's node listener. */
  markGone(reason: string, clean: boolean): void {
    if (this.isGone) return;
    this.isGone = true;
    this.emit('gone', reason, clean);
  }
}
