// JSON schemas of every request body. Unknown OpenAI fields pass (additionalProperties), known ones
// are type-checked; `description` is what the 400 message says was expected (see errors.ts).

import { structuredOutputProperties } from './structured-output.js';

const MAX_SAFE = Number.MAX_SAFE_INTEGER;

const tokenId = { type: 'integer', minimum: 0, maximum: 2 ** 31 - 1, description: 'must be a token id (an integer >= 0)' };
const tokenIds = { type: 'array', items: tokenId, description: 'must be an array of token ids' };

const num = (min: number, max: number, what: string) =>
  ({ type: ['number', 'null'], minimum: min, maximum: max, description: `must be a number ${what}` });
const int = (min: number, max: number, what: string) =>
  ({ type: ['integer', 'null'], minimum: min, maximum: max, description: `must be an integer ${what}` });
const bool = { type: ['boolean', 'null'], description: 'must be a boolean' };

/** Fields common to completions and chat completions. */
const samplingProperties = {
  model: { type: ['string', 'null'], maxLength: 1024, description: 'must be a model name (string)' },
  max_tokens: int(1, MAX_SAFE, '>= 1'),
  temperature: num(0, 2, 'between 0 and 2'),
  top_p: { type: ['number', 'null'], exclusiveMinimum: 0, maximum: 1, description: 'must be a number in (0, 1]' },
  n: int(1, 128, 'between 1 and 128'),
  stop: {
    anyOf: [
      { type: 'null' },
      { type: 'string', minLength: 1 },
      { type: 'array', maxItems: 64, items: { type: 'string', minLength: 1 } },
    ],
    description: 'must be a non-empty string or an array of at most 64 non-empty strings',
  },
  seed: int(-MAX_SAFE, MAX_SAFE, 'within +-(2^53 - 1)'),
  presence_penalty: num(-2, 2, 'between -2 and 2'),
  frequency_penalty: num(-2, 2, 'between -2 and 2'),
  logit_bias: {
    type: ['object', 'null'],
    propertyNames: { pattern: '^(0|[1-9][0-9]{0,9})$', description: 'keys must be token ids written as strings, like "42"' },
    additionalProperties: { type: 'number', minimum: -100, maximum: 100, description: 'must be a number between -100 and 100' },
    description: 'must map token ids (as strings) to numbers between -100 and 100',
  },
  user: { type: ['string', 'null'], description: 'must be a string' },
  stream: bool,
  stream_options: {
    type: ['object', 'null'],
    properties: { include_usage: bool, continuous_usage_stats: bool },
    description: 'must be an object like {"include_usage": true}',
  },
  // vLLM-style extras
  top_k: int(-1, MAX_SAFE, '>= -1 (-1 or 0 = off)'),
  min_p: num(0, 1, 'between 0 and 1'),
  repetition_penalty: { type: ['number', 'null'], exclusiveMinimum: 0, maximum: 100, description: 'must be a number in (0, 100]' },
  stop_token_ids: { type: ['array', 'null'], maxItems: 1024, items: tokenId, description: 'must be an array of token ids' },
  ignore_eos: bool,
  min_tokens: int(0, MAX_SAFE, '>= 0'),
  skip_special_tokens: bool,
  return_token_ids: bool,
  return_routed_experts: bool,
  ...structuredOutputProperties,
} as const;

/** Default of --max-prompts-per-request. */
export const DEFAULT_MAX_PROMPTS_PER_REQUEST = 128;

/**
 * The /v1/completions body; maxPrompts caps the prompts of one request (a list of strings or of
 * token-id lists; a single token-id list is one prompt, however long).
 */
export const completionBodySchemaFor = (maxPrompts: number) => ({
  type: 'object',
  required: ['prompt'],
  properties: {
    ...samplingProperties,
    prompt: {
      // NOTE: errors.ts appends '(got N)' to a maxItems failure, so the 400 says both the limit and the value.
      if: { type: 'array', items: { not: { type: 'integer' } } },
      then: { type: 'array', maxItems: maxPrompts, description: `must hold at most ${maxPrompts} prompts, the server's limit per request` },
      anyOf: [
        { type: 'string' },
        { type: 'array', minItems: 1, items: { type: 'string' } },
        { type: 'array', minItems: 1, items: tokenId },
        { type: 'array', minItems: 1, items: { type: 'array', minItems: 1, items: tokenId } },
      ],
      description: 'must be a string, a non-empty array of strings, a non-empty array of token ids, or an array of non-empty token-id arrays',
    },
    logprobs: int(0, 20, 'between 0 and 20'),
    echo: bool,
    // 0 scores the prompt only (with echo: its logprobs), as OpenAI's legacy completions and vLLM allow.
    max_tokens: int(0, MAX_SAFE, '>= 0'),
  },
} as const);

export const completionBodySchema = completionBodySchemaFor(DEFAULT_MAX_PROMPTS_PER_REQUEST);

const messageSchema = {
  type: 'object',
  required: ['role'],
  properties: {
    role: { type: 'string', enum: ['system', 'developer', 'user', 'assistant', 'tool'], description: "must be one of 'system', 'developer', 'user', 'assistant', 'tool'" },
    content: {
      anyOf: [
        { type: 'string' },
        { type: 'null' },
        {
          type: 'array',
          items: {
            type: 'object',
            required: ['type', 'text'],
            properties: { type: { const: 'text' }, text: { type: 'string' } },
          },
        },
      ],
      description: "must be a string or an array of {\"type\": \"text\", \"text\": string} parts (only text is supported)",
    },
    name: { type: 'string', description: 'must be a string' },
    tool_call_id: { type: 'string', description: 'must be a string (the id of the tool call this message answers)' },
    reasoning_content: { type: ['string', 'null'], description: 'must be a string' },
    tool_calls: {
      type: ['array', 'null'],
      items: {
        type: 'object',
        required: ['function'],
        properties: {
          id: { type: 'string' },
          type: { const: 'function' },
          function: {
            type: 'object', required: ['name', 'arguments'],
            properties: { name: { type: 'string' }, arguments: { type: 'string' } },
          },
        },
      },
      description: 'must be an array of {"id", "type": "function", "function": {"name", "arguments": JSON text}}',
    },
  },
  description: 'must be an object with a role and content',
} as const;

const toolSchema = {
  type: 'object',
  required: ['type', 'function'],
  properties: {
    type: { const: 'function', description: "must be 'function'" },
    function: {
      type: 'object',
      required: ['name'],
      properties: {
        name: { type: 'string', pattern: '^[a-zA-Z0-9_.-]{1,64}$', description: 'must be a function name of 1 to 64 letters, digits, _, . or -' },
        description: { type: 'string', description: 'must be a string' },
        parameters: { type: 'object', description: 'must be a JSON Schema object' },
        strict: { type: ['boolean', 'null'], description: 'must be a boolean' },
      },
      description: 'must be an object like {"name": "...", "parameters": {...}}',
    },
  },
  description: 'must be an object like {"type": "function", "function": {"name": "...", "parameters": {...}}}',
} as const;

export const chatBodySchema = {
  type: 'object',
  required: ['messages'],
  properties: {
    ...samplingProperties,
    messages: { type: 'array', minItems: 1, maxItems: 100000, items: messageSchema, description: 'must be a non-empty array of messages' },
    max_completion_tokens: int(1, MAX_SAFE, '>= 1'),
    logprobs: bool,
    top_logprobs: int(0, 20, 'between 0 and 20'),
    tools: { type: ['array', 'null'], maxItems: 1024, items: toolSchema, description: 'must be an array of tools' },
    tool_choice: {
      anyOf: [
        { type: 'null' },
        { type: 'string', enum: ['none', 'auto', 'required'] },
        { type: 'object', required: ['type', 'function'], properties: { type: { const: 'function' }, function: { type: 'object', required: ['name'], properties: { name: { type: 'string' } } } } },
      ],
      description: "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": \"...\"}}",
    },
    parallel_tool_calls: bool,
    chat_template_kwargs: { type: ['object', 'null'], description: 'must be an object of chat template variables' },
  },
} as const;

export const tokenizeBodySchema = {
  type: 'object',
  properties: {
    model: samplingProperties.model,
    prompt: { type: 'string', description: 'must be a string' },
    messages: chatBodySchema.properties.messages,
    add_special_tokens: bool,
    add_generation_prompt: bool,
  },
} as const;

export const detokenizeBodySchema = {
  type: 'object',
  required: ['tokens'],
  properties: {
    model: samplingProperties.model,
    tokens: tokenIds,
  },
} as const;
