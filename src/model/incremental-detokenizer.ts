// The streaming detokenizer (no tokenizer library of its own: it decodes through the function it
// is given), shared by the model's tokenizer (streamed text) and the server's logprobs formatter.

/**
 * Streaming decode (the vLLM / TGI scheme): decode a short window of recent ids with and without
 * the new ones and emit only the new suffix, and only once it no longer ends in U+FFFD (a byte-
 * fallback sequence or multi-token character still incomplete). Decoding a window, not single
 * ids, keeps tokenizer-specific spacing (SentencePiece's leading space, byte merges) right.
 */
export class IncrementalDetokenizer {
  private ids: number[];
  private prefixOffset: number;
  private readOffset: number;
  /** decode(ids[prefixOffset, readOffset)), kept until the offsets move (peek reads it per alternative). */
  private prefixText: string | null = null;
  /** Everything emitted so far. */
  text = '';

  constructor(private readonly decodeFn: (ids: number[]) => string, promptIds: number[] = []) {
    // A few prompt ids of context: enough to decide the spacing of the first new token.
    this.ids = promptIds.slice(-6);
    this.prefixOffset = Math.max(0, this.ids.length - 5);
    this.readOffset = this.ids.length;
  }

  /** Adds one generated id; returns the text that became final (possibly ''). */
  push(id: number): string {
    const delta = this.peek(id);
    this.ids.push(id);
    if (delta !== '') {
      this.prefixOffset = this.readOffset;
      this.readOffset = this.ids.length;
      this.prefixText = null;
      this.compact();
      this.text += delta;
    }
    return delta;
  }

  /** What push(id) would return now, without adding it (a logprobs alternative's text in context). */
  peek(id: number): string {
    this.prefixText ??= this.decodeFn(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decodeFn([...this.ids.slice(this.prefixOffset), id]);
    return newText.length > this.prefixText.length && !newText.endsWith('\uFFFD') ? newText.slice(this.prefixText.length) : '';
  }

  /** At the end of a sequence: whatever is held back (an incomplete character stays U+FFFD). */
  flush(): string {
    const prefixText = this.decodeFn(this.ids.slice(this.prefixOffset, this.readOffset));
    const newText = this.decodeFn(this.ids.slice(this.prefixOffset));
    this.prefixOffset = this.readOffset = this.ids.length;
    this.prefixText = null;
    if (newText.length <= prefixText.length) return '';
    const delta = newText.startsWith(prefixText) ? newText.slice(prefixText.length) : newText;
    this.text += delta;
    return delta;
  }

  // Drop ids before the window so long generations stay O(1) per token.
  private compact(): void {
    if (this.prefixOffset > 64) {
      this.ids = this.ids.slice(this.prefixOffset);
      this.readOffset -= this.prefixOffset;
      this.prefixOffset = 0;
    }
  }
}
