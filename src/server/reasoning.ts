// Reasoning text split from the answer: `<think>...</think>` (Qwen3, DeepSeek-R1, GLM-4.5) and
// gpt-oss's harmony channels (analysis = reasoning, final = answer). Streaming: text goes in as it
// is generated and comes out as reasoning and content deltas, markers removed.
import { findMarker, partialMarkerLength } from './text-markers.js';

export const REASONING_PARSERS = ['think', 'gpt_oss'] as const;
export type ReasoningParserName = typeof REASONING_PARSERS[number];

export interface ReasoningDelta { reasoning: string; content: string }

export interface ReasoningSplitter {
  push(text: string): ReasoningDelta;
  /** The end of the output: whatever was held back. */
  flush(): ReasoningDelta;
}

/** Chooses a parser from the chat template's markers (auto), or null when the model shows none. */
export function detectReasoningParser(chatTemplate: string | null, modelType: string): ReasoningParserName | null {
  if (modelType === 'gpt_oss' || (chatTemplate?.includes('<|channel|>') ?? false)) return 'gpt_oss';
  if (chatTemplate && (chatTemplate.includes('<think>') || chatTemplate.includes('</think>'))) return 'think';
  return null;
}

/**
 * @param promptText the templated prompt: a prompt that ends inside `<think>` (DeepSeek-R1's
 * template opens it for the model) starts the output in reasoning; one that closed it (Qwen3 with
 * enable_thinking false) starts it in content.
 */
export function createReasoningSplitter(name: ReasoningParserName, promptText: string): ReasoningSplitter {
  return name === 'gpt_oss' ? new HarmonySplitter() : new ThinkSplitter(/<think>\s*$/.test(promptText));
}

const OPEN = '<think>';
const CLOSE = '</think>';

/**
 * `<think>` splitting, vLLM's semantics: reasoning is what the output opens with `<think>` (or the
 * prompt opened) up to `</think>`; output that does not open with it is all content; reasoning
 * never closed stays reasoning.
 */
class ThinkSplitter implements ReasoningSplitter {
  private mode: 'start' | 'reasoning' | 'content';
  private buf = '';
  /** Whitespace right after </think> is dropped (the template's own "\n\n"). */
  private trimContentStart = false;
  /** One newline right after <think> is dropped, as are the newlines before </think>. */
  private trimReasoningStart: boolean;

  constructor(startsInReasoning: boolean) {
    this.mode = startsInReasoning ? 'reasoning' : 'start';
    this.trimReasoningStart = startsInReasoning;
  }

  push(text: string): ReasoningDelta {
    this.buf += text;
    const out: ReasoningDelta = { reasoning: '', content: '' };
    for (;;) {
      if (this.mode === 'start') {
        const lead = this.buf.trimStart();
        if (lead.startsWith(OPEN)) {
          this.buf = lead.slice(OPEN.length);
          this.mode = 'reasoning';
          this.trimReasoningStart = true;
          continue;
        }
        if (lead.length < OPEN.length && OPEN.startsWith(lead)) return out; // could still open
        this.mode = 'content';
      }
      if (this.mode === 'reasoning') {
        if (this.trimReasoningStart) {
          if (this.buf === '') return out;
          if (this.buf.startsWith('\n')) this.buf = this.buf.slice(1);
          this.trimReasoningStart = false;
        }
        const i = this.buf.indexOf(CLOSE);
        if (i >= 0) {
          out.reasoning += this.buf.slice(0, i).replace(/\n+$/, '');
          this.buf = this.buf.slice(i + CLOSE.length);
          this.mode = 'content';
          this.trimContentStart = true;
          continue;
        }
        // Held back: what could become </think>, and the newlines that would precede it.
        let end = this.buf.length - partialMarkerLength(this.buf, [CLOSE]);
        while (end > 0 && this.buf[end - 1] === '\n') end--;
        out.reasoning += this.buf.slice(0, end);
        this.buf = this.buf.slice(end);
        return out;
      }
      if (this.trimContentStart) {
        this.buf = this.buf.trimStart();
        if (this.buf === '') return out;
        this.trimContentStart = false;
      }
      out.content += this.buf;
      this.buf = '';
      return out;
    }
  }

  flush(): ReasoningDelta {
    const rest = this.buf;
    this.buf = '';
    if (this.mode === 'reasoning') return { reasoning: rest, content: '' };
    return { reasoning: '', content: this.trimContentStart ? rest.trimStart() : rest };
  }
}

/**
 * gpt-oss harmony (special tokens kept in the text): `<|channel|>analysis<|message|>...<|end|>` is
 * reasoning, `<|channel|>final<|message|>...` the answer; headers and control tokens are dropped.
 * Commentary (tool calls) passes through as content for the tool-call parser.
 */
class HarmonySplitter implements ReasoningSplitter {
  private buf = '';
  private channel: string | null = null;
  /** Inside a header (`<|start|>assistant<|channel|>final`), up to `<|message|>`. */
  private inHeader = false;
  private header = '';

  private static readonly ENDS = ['<|end|>', '<|return|>', '<|call|>'];
  private static readonly ALL = ['<|start|>', '<|channel|>', '<|message|>', ...HarmonySplitter.ENDS];

  push(text: string): ReasoningDelta {
    this.buf += text;
    const out: ReasoningDelta = { reasoning: '', content: '' };
    for (;;) {
      const hit = findMarker(this.buf, HarmonySplitter.ALL);
      const upTo = hit ? hit[0] : this.buf.length - partialMarkerLength(this.buf, HarmonySplitter.ALL);
      const piece = this.buf.slice(0, upTo);
      if (this.inHeader) this.header += piece;
      else this.emit(out, piece);
      if (!hit) {
        this.buf = this.buf.slice(upTo);
        return out;
      }
      const [i, m] = hit;
      this.buf = this.buf.slice(i + m.length);
      if (m === '<|start|>' || m === '<|channel|>') {
        if (!this.inHeader) this.header = '';
        this.inHeader = true;
        if (m === '<|channel|>') this.header += ' channel=';
      } else if (m === '<|message|>') {
        this.inHeader = false;
        this.channel = /channel=(\w+)/.exec(this.header)?.[1] ?? this.channel;
        // Commentary messages keep their header: the tool-call parser reads `to=functions.NAME` there.
        if (this.channel === 'commentary') out.content += `<|channel|>${this.header.replace(/^.*?channel=/, '')}<|message|>`;
      } else {
        if (this.channel === 'commentary') out.content += m;
        this.channel = null;
      }
    }
  }

  private emit(out: ReasoningDelta, piece: string): void {
    if (piece === '') return;
    if (this.channel === 'analysis') out.reasoning += piece;
    else out.content += piece;
  }

  flush(): ReasoningDelta {
    const out: ReasoningDelta = { reasoning: '', content: '' };
    if (!this.inHeader) this.emit(out, this.buf);
    this.buf = '';
    return out;
  }
}
