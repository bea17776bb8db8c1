// Structured output fields of a request -> one GrammarSpec for the engine: OpenAI's response_format
// (json_object, json_schema) and the vLLM-style extensions guided_json, guided_regex, guided_choice
// and guided_grammar. Each is checked by xgrammar (off the main thread) so an invalid one is a 400.
import type { GrammarChecker } from '../structured/grammar-checker.js';
import type { GrammarSpec } from '../structured/grammar-spec.js';
import { invalidRequest } from './errors.js';

export interface StructuredOutputBody {
  response_format?: { type: 'text' | 'json_object' | 'json_schema'; json_schema?: { name?: string; schema?: unknown; strict?: boolean | null } | null } | null;
  guided_json?: unknown;
  guided_regex?: string | null;
  guided_choice?: string[] | null;
  guided_grammar?: string | null;
}

/** Schema properties of these fields (merged into both endpoints' body schemas). */
export const structuredOutputProperties = {
  response_format: {
    type: ['object', 'null'],
    required: ['type'],
    properties: {
      type: { type: 'string', enum: ['text', 'json_object', 'json_schema'], description: "must be one of 'text', 'json_object', 'json_schema'" },
      json_schema: {
        type: ['object', 'null'],
        required: ['name'],
        properties: {
          name: { type: 'string', pattern: '^[a-zA-Z0-9_-]{1,64}$', description: 'must be a name of 1 to 64 letters, digits, _ or -' },
          description: { type: 'string', description: 'must be a string' },
          schema: { anyOf: [{ type: 'object' }, { type: 'boolean' }], description: 'must be a JSON Schema (an object)' },
          strict: { type: ['boolean', 'null'], description: 'must be a boolean' },
        },
        description: 'must be an object like {"name": "...", "schema": {...}, "strict": true}',
      },
    },
    description: 'must be an object like {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}',
  },
  guided_json: { anyOf: [{ type: 'object' }, { type: 'string' }, { type: 'boolean' }, { type: 'null' }], description: 'must be a JSON Schema (an object or its JSON text)' },
  guided_regex: { type: ['string', 'null'], minLength: 1, description: 'must be a non-empty regular expression' },
  guided_choice: { type: ['array', 'null'], minItems: 1, maxItems: 4096, items: { type: 'string', minLength: 1 }, description: 'must be a non-empty array of non-empty strings' },
  guided_grammar: { type: ['string', 'null'], minLength: 1, description: 'must be a non-empty EBNF grammar' },
} as const;

/** The request's grammar and the field it came from, or null for free text. */
export function grammarFromBody(body: StructuredOutputBody): { spec: GrammarSpec; param: string } | null {
  const found: { spec: GrammarSpec; param: string }[] = [];
  const rf = body.response_format;
  if (rf && rf.type === 'json_object') found.push({ spec: { type: 'json_object' }, param: 'response_format' });
  if (rf && rf.type === 'json_schema') {
    const schema = rf.json_schema?.schema;
    if (schema === undefined) {
      throw invalidRequest("Missing required parameter: 'response_format.json_schema.schema' (response_format of type 'json_schema' needs a JSON Schema).",
        'response_format.json_schema', 'missing_required_parameter');
    }
    found.push({ spec: { type: 'json_schema', schema: JSON.stringify(schema) }, param: 'response_format.json_schema.schema' });
  }
  if (body.guided_json != null) {
    let schema = body.guided_json;
    if (typeof schema === 'string') {
      try {
        schema = JSON.parse(schema);
      } catch (e) {
        throw invalidRequest(`Invalid value for 'guided_json': it is not JSON (${(e as Error).message}).`, 'guided_json', 'invalid_schema');
      }
    }
    found.push({ spec: { type: 'json_schema', schema: JSON.stringify(schema) }, param: 'guided_json' });
  }
  if (body.guided_regex != null) found.push({ spec: { type: 'regex', pattern: body.guided_regex }, param: 'guided_regex' });
  if (body.guided_choice != null) found.push({ spec: { type: 'choice', choices: body.guided_choice }, param: 'guided_choice' });
  if (body.guided_grammar != null) found.push({ spec: { type: 'ebnf', grammar: body.guided_grammar }, param: 'guided_grammar' });
  if (found.length > 1) {
    throw invalidRequest(`Only one kind of structured output per request: this one sets ${found.map((f) => `'${f.param}'`).join(' and ')}.`,
      found[1]!.param, 'invalid_value');
  }
  return found[0] ?? null;
}

const WHAT: Record<GrammarSpec['type'], string> = {
  json_schema: 'JSON Schema', json_object: 'JSON object grammar', regex: 'regular expression',
  choice: 'choice list', ebnf: 'EBNF grammar', structural_tag: 'tool-call grammar',
};

/** 400 with xgrammar's reason when the grammar does not parse. */
export async function checkGrammar(checker: GrammarChecker, g: { spec: GrammarSpec; param: string }): Promise<void> {
  const error = await checker.check(g.spec);
  if (error !== null) {
    throw invalidRequest(`Invalid value for '${g.param}': the ${WHAT[g.spec.type]} cannot be used for structured output: ${error}`,
      g.param, 'invalid_grammar');
  }
}
