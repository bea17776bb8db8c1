// Loads xgrammar's WebAssembly build (@mlc-ai/web-xgrammar) in Node and turns its aborts into
// errors that say why. Each call of loadXgrammar() is a fresh, independent wasm instance.
//
// The package's lib/index.js is a UMD bundle inside a "type": "module" package, so neither import
// nor require() takes it: it is compiled here as the CommonJS module it is. Two small source
// edits (checked, so a new package version that moves them fails loudly): the wasm module gets our
// printErr, and the bundle exposes its embind binding for the synchronous bitmask call.
import fs from 'node:fs';
import Module, { createRequire } from 'node:module';

import type * as XgTypes from '@mlc-ai/web-xgrammar';

export type XgModule = typeof XgTypes;
export type { CompiledGrammar, Grammar, GrammarCompiler, GrammarMatcher, TokenizerInfo } from '@mlc-ai/web-xgrammar';

/** A grammar, schema or regex xgrammar refused; the message is xgrammar's own reason. */
export class GrammarError extends Error {
  readonly code = 'E_GRAMMAR';
  constructor(message: string) {
    super(message);
    this.name = 'GrammarError';
  }
}

interface Binding {
  vecIntToView(v: unknown): Int32Array;
}

export interface XgInstance {
  xg: XgModule;
  /** The embind module (after the first async call); for GetNextTokenBitmask without a Promise. */
  binding(): Binding;
  /**
   * Runs one xgrammar call; a C++ failure (which aborts the wasm call) becomes a GrammarError with
   * the reason xgrammar printed. NOTE: after an abort the instance may hold leaked wasm stack and
   * heap: callers that can see many bad inputs (the HTTP front) should take a fresh instance.
   */
  call<T>(fn: () => Promise<T>): Promise<T>;
  /** Calls that aborted on this instance so far. */
  readonly aborts: number;
}

const require = createRequire(import.meta.url);

/** "[FATAL] /path/file.cc:902: Unsupported type \"objec\"" -> "Unsupported type \"objec\"". */
export function fatalReason(line: string): string {
  return line.replace(/^\[FATAL\]\s*\S+?:\d+:\s*/, '').replace(/^Check failed: \(.*?\) is false:\s*/, '').trim();
}

export function loadXgrammar(): XgInstance {
  const file = require.resolve('@mlc-ai/web-xgrammar/lib/index.js');
  let src = fs.readFileSync(file, 'utf8');
  const edits: [string, string][] = [
    ['binding = await Module();', 'binding = await Module(module.xgModuleArg);'],
    ['var index = {', 'exports.binding = () => binding; var index = {'],
  ];
  for (const [from, to] of edits) {
    if (!src.includes(from)) throw new Error(`@mlc-ai/web-xgrammar: ${file} does not contain '${from}' (an unsupported version?)`);
    src = src.replace(from, to);
  }
  const fatal: string[] = [];
  const m = new Module(file) as Module & { xgModuleArg: unknown; _compile(src: string, file: string): void };
  m.filename = file;
  m.paths = (Module as unknown as { _nodeModulePaths(p: string): string[] })._nodeModulePaths(file);
  // xgrammar's C++ logs the reason of a failure to stderr, then aborts: keep the reason instead.
  m.xgModuleArg = { printErr: (s: string) => { if (s.startsWith('[FATAL]')) fatal.push(fatalReason(s)); } };
  m._compile(src, file);
  const exp = m.exports as XgModule & { binding(): Binding };
  // One call at a time, so that the reason printed belongs to the call that aborted.
  let queue: Promise<unknown> = Promise.resolve();
  const inst = {
    xg: exp,
    binding: () => exp.binding(),
    aborts: 0,
    call<T>(fn: () => Promise<T>): Promise<T> {
      const run = async (): Promise<T> => {
        fatal.length = 0;
        try {
          return await fn();
        } catch (e) {
          // A C++ exception arrives as a number (a pointer into the wasm heap), without its message.
          if (typeof e === 'number') {
            inst.aborts++;
            throw new GrammarError(fatal.length ? fatal.join('; ') : 'xgrammar refused it (an internal error, no reason given)');
          }
          if ((e as Error)?.name !== 'RuntimeError' || !/Aborted\(/.test(String((e as Error).message))) throw e;
          inst.aborts++;
          throw new GrammarError(fatal.length ? fatal.join('; ') : 'xgrammar refused it (no reason given)');
        }
      };
      const p = queue.then(run, run);
      queue = p.catch(() => undefined);
      return p;
    },
  };
  return inst;
}
