// One chat choice's text as the client sees it: reasoning split off (reasoning parser), then
// tool calls split off (tool-call parser), streamed as deltas or taken whole at the end.
import { createReasoningSplitter, type ReasoningParserName, type ReasoningSplitter } from './reasoning.js';
import { newToolCallId, ToolCallStream, type ParsedToolCall, type ToolCallParser } from './tool-calls.js';

export interface ChatParsing {
  reasoning: ReasoningParserName | null;
  /** Set when the request has tools and tool_choice is not 'none'. */
  tools: ToolCallParser | null;
}

export interface OpenAiToolCall {
  id: string;
  type: 'function';
  function: { name: string; arguments: string };
}

export class ChatChoiceOutput {
  private readonly splitter: ReasoningSplitter | null;
  private readonly calls: ToolCallStream | null;

  constructor(parsing: ChatParsing, promptText: string) {
    this.splitter = parsing.reasoning ? createReasoningSplitter(parsing.reasoning, promptText) : null;
    this.calls = parsing.tools ? new ToolCallStream(parsing.tools) : null;
  }

  push(text: string): { reasoning: string; content: string } {
    const r = this.splitter ? this.splitter.push(text) : { reasoning: '', content: text };
    return { reasoning: r.reasoning, content: this.calls ? this.calls.push(r.content) : r.content };
  }

  /** The end of the choice: what was held back, and the tool calls. */
  finish(): { reasoning: string; content: string; toolCalls: OpenAiToolCall[] } {
    const r = this.splitter ? this.splitter.flush() : { reasoning: '', content: '' };
    let content = this.calls ? this.calls.push(r.content) : r.content;
    let calls: ParsedToolCall[] = [];
    if (this.calls) {
      const f = this.calls.finish();
      content += f.content;
      calls = f.calls;
    }
    return {
      reasoning: r.reasoning, content,
      toolCalls: calls.map((c) => ({ id: newToolCallId(), type: 'function' as const, function: { name: c.name, arguments: c.arguments } })),
    };
  }
}
