// Stop strings matched on decoded text while it streams. Text that could still become the start of
// a stop string is held back, so a client never sees a prefix of a stop string that later matches.

export interface StopPush {
  /** Text that is final and may be sent now. */
  text: string;
  /** The stop string that matched (generation must end), or null. */
  stopped: string | null;
}

export class StopMatcher {
  private held = '';
  private readonly maxLen: number;

  constructor(private readonly stops: readonly string[]) {
    this.maxLen = stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  /**
   * Feeds newly decoded text (whole characters: the detokenizer never yields half a UTF-8
   * sequence). With matching disabled (min_tokens not reached yet) text passes straight through.
   */
  push(text: string, matching = true): StopPush {
    if (this.stops.length === 0) return { text, stopped: null };
    const buf = this.held + text;
    if (!matching) {
      this.held = '';
      return { text: buf, stopped: null };
    }
    let at = -1;
    let which: string | null = null;
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i >= 0 && (at < 0 || i < at)) {
        at = i;
        which = s;
      }
    }
    if (which !== null) {
      this.held = '';
      return { text: buf.slice(0, at), stopped: which };
    }
    const keep = this.partialSuffix(buf);
    this.held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: null };
  }

  /** End of generation: whatever is held was not a stop string after all. */
  flush(): string {
    const out = this.held;
    this.held = '';
    return out;
  }

  /** Length of the longest suffix of buf that is a proper prefix of some stop string. */
  private partialSuffix(buf: string): number {
    const limit = Math.min(buf.length, this.maxLen - 1);
    for (let len = limit; len > 0; len--) {
      const tail = buf.slice(buf.length - len);
      for (const s of this.stops) if (s.length > len && s.startsWith(tail)) return len;
    }
    return 0;
  }
}
