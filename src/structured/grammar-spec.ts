// What a request asks its output to follow, as plain data (it crosses the MessagePort to the engine
// worker and the wire to rank processes), and how each kind becomes an xgrammar grammar.
import type { CompiledGrammar, Grammar, GrammarCompiler, XgModule } from './xgrammar.js';

export type GrammarSpec =
  /** schema: the JSON Schema as JSON text. */
  | { type: 'json_schema'; schema: string }
  | { type: 'json_object' }
  | { type: 'regex'; pattern: string }
  | { type: 'choice'; choices: string[] }
  /** EBNF in xgrammar's dialect (GBNF-like), root rule `root`. */
  | { type: 'ebnf'; grammar: string }
  /** An xgrammar structural tag as JSON text (tool calls). */
  | { type: 'structural_tag'; tag: string };

/** The compiled-grammar cache's key: the same spec compiles to the same grammar. */
export function grammarKey(spec: GrammarSpec): string {
  return JSON.stringify(spec);
}

/**
 * JSON is generated compact and on one line (", " and ": " separators, no other whitespace): free
 * whitespace lets a weak or random-weight model pad forever, and clients parse either form alike.
 */
const ANY_WHITESPACE = false;
const INDENT_NONE = -1;
/** xgrammar's strict mode: no properties or items beyond the schema's, so output always validates. */
const STRICT = true;

/** A string as an EBNF literal: "..." with \", \\ and control characters escaped. */
export function ebnfLiteral(s: string): string {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === '"' || ch === '\\') out += '\\' + ch;
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    else if (c < 0x20 || c === 0x7f) out += '\\x' + c.toString(16).padStart(2, '0');
    else out += ch;
  }
  return out + '"';
}

export function choiceEbnf(choices: readonly string[]): string {
  return `root ::= ${choices.map(ebnfLiteral).join(' | ')}`;
}

function structuralTagJson(spec: GrammarSpec & { type: 'regex' | 'structural_tag' }): string {
  return spec.type === 'regex'
    ? JSON.stringify({ type: 'structural_tag', format: { type: 'regex', pattern: spec.pattern } })
    : spec.tag;
}

const OBJECT_SCHEMA = '{"type": "object"}';

/**
 * The schema as given to xgrammar. NOTE: xgrammar 0.1.27 turns a string with minLength/maxLength
 * into [^"\\\r\n]{m,n}, which lets raw control characters into the JSON string (invalid JSON);
 * such strings get the equivalent pattern without them instead (they then hold no escapes).
 */
export function xgrammarSchema(schemaText: string): string {
  return JSON.stringify(xgrammarSchemaValue(JSON.parse(schemaText)));
}

/** xgrammarSchema on a parsed schema (for schemas inside structural tags). */
export function xgrammarSchemaValue(schema: unknown): unknown {
  const fix = (node: unknown): unknown => {
    if (Array.isArray(node)) return node.map(fix);
    if (node === null || typeof node !== 'object') return node;
    const o: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(node)) o[k] = fix(v);
    const lengths = o.minLength !== undefined || o.maxLength !== undefined;
    if (o.type === 'string' && lengths && o.pattern === undefined && o.format === undefined && o.enum === undefined && o.const === undefined) {
      const min = typeof o.minLength === 'number' ? Math.max(0, Math.floor(o.minLength)) : 0;
      const max = typeof o.maxLength === 'number' ? Math.floor(o.maxLength) : null;
      delete o.minLength;
      delete o.maxLength;
      o.pattern = `^[^"\\\\\\x00-\\x1f]{${min},${max ?? ''}}$`;
    }
    return o;
  };
  return fix(schema);
}

/** Parses the spec into a grammar without a vocabulary: the cheap check that it is valid. */
export function parseGrammar(xg: XgModule, spec: GrammarSpec): Promise<Grammar> {
  switch (spec.type) {
    case 'json_schema': return xg.Grammar.fromJSONSchema(xgrammarSchema(spec.schema), ANY_WHITESPACE, INDENT_NONE, undefined, STRICT);
    case 'json_object': return xg.Grammar.fromJSONSchema(OBJECT_SCHEMA, ANY_WHITESPACE, INDENT_NONE, undefined, STRICT);
    case 'regex':
    case 'structural_tag': return xg.Grammar.fromStructuralTag(structuralTagJson(spec));
    case 'choice': return xg.Grammar.fromEBNF(choiceEbnf(spec.choices));
    case 'ebnf': return xg.Grammar.fromEBNF(spec.grammar);
  }
}

/** Compiles the spec against the compiler's vocabulary (the token masks precomputed). */
export function compileGrammar(compiler: GrammarCompiler, spec: GrammarSpec): Promise<CompiledGrammar> {
  switch (spec.type) {
    case 'json_schema': return compiler.compileJSONSchema(xgrammarSchema(spec.schema), ANY_WHITESPACE, INDENT_NONE, undefined, STRICT);
    case 'json_object': return compiler.compileJSONSchema(OBJECT_SCHEMA, ANY_WHITESPACE, INDENT_NONE, undefined, STRICT);
    case 'regex':
    case 'structural_tag': return compiler.compileStructuralTag(structuralTagJson(spec));
    case 'choice': return compiler.compileGrammar(choiceEbnf(spec.choices));
    case 'ebnf': return compiler.compileGrammar(spec.grammar);
  }
}
