// Grammar checker thread: parses a request's schema / regex / choice / EBNF with xgrammar (no
// vocabulary, so milliseconds) to refuse invalid ones with xgrammar's reason before they reach the
// engine. Off the main thread, and a fresh wasm instance after every refusal (an abort leaks wasm
// memory: about 20 of them break an instance).
import { parentPort } from 'node:worker_threads';

import { parseGrammar, type GrammarSpec } from './grammar-spec.js';
import { GrammarError, loadXgrammar, type XgInstance } from './xgrammar.js';

export interface CheckRequest { id: number; spec: GrammarSpec }
export interface CheckResult { id: number; error: string | null }

const port = parentPort;
if (!port) throw new Error('the grammar checker must run in a worker thread');

let inst: XgInstance | null = null;

port.on('message', (m: CheckRequest) => {
  const x = inst ??= loadXgrammar();
  void x.call(() => parseGrammar(x.xg, m.spec)).then(
    (g) => { g.dispose(); port.postMessage({ id: m.id, error: null } satisfies CheckResult); },
    (e: Error) => {
      if (e instanceof GrammarError && inst === x) inst = null;
      port.postMessage({ id: m.id, error: e.message || String(e) } satisfies CheckResult);
    });
});
