// The one door to the addon: finds the .node file (full cmake-js build if present and loadable,
// else the portable node-gyp build) and returns it typed as NativeAddon.
import { execFileSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import type { Capabilities, NativeAddon } from './types.js';

export type * from './types.js';

const require = createRequire(import.meta.url);

/** The package root (works from src/ via tsx and from dist/src/ after tsc). */
export function packageRoot(): string {
  let dir = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(dir, 'package.json'))) {
    const parent = path.dirname(dir);
    if (parent === dir) throw new Error('expertd: cannot find the package root');
    dir = parent;
  }
  return dir;
}

export interface AddonCandidate { path: string; build: 'full' | 'portable' }

export function addonCandidates(root = packageRoot()): AddonCandidate[] {
  const list: AddonCandidate[] = [];
  const override = process.env.EXPERTD_ADDON;
  if (override) return [{ path: path.resolve(override), build: 'full' }];
  for (const p of ['build-full/Release/expertd.node', 'build-full/expertd.node'])
    list.push({ path: path.join(root, p), build: 'full' });
  list.push({ path: path.join(root, 'build/Release/expertd.node'), build: 'portable' });
  return list.filter((c) => existsSync(c.path));
}

// A full build is first loaded in a child process, so that a bad binary (wrong CUDA runtime,
// missing symbol) cannot take this process down; the verdict is passed to workers by env.
function loadsInChild(file: string): boolean {
  const key = `EXPERTD_ADDON_OK_${Buffer.from(file).toString('hex').slice(-24)}`;
  if (process.env[key] !== undefined) return process.env[key] === '1';
  // A worker thread whose parent never loaded the addon probes too (its env is its own copy).
  let ok: boolean;
  try {
    // RTLD_NOW: an undefined symbol fails here, not at its first call in the server.
    const probe = `const m = { exports: {} }; process.dlopen(m, ${JSON.stringify(file)}, ` +
      'require("os").constants.dlopen.RTLD_NOW); m.exports.capabilities()';
    execFileSync(process.execPath, ['-e', probe], { stdio: 'ignore', timeout: 60_000 });
    ok = true;
  } catch {
    ok = false;
  }
  process.env[key] = ok ? '1' : '0';
  return ok;
}

let cached: NativeAddon | undefined;
let cachedPath: string | undefined;

export function loadNative(): NativeAddon {
  if (cached) return cached;
  const candidates = addonCandidates();
  if (candidates.length === 0)
    throw new Error('expertd: the native addon is not built. Run `npm install` (or `npm run build`) ' +
      'in the expertd folder; a C++17 compiler and python3 are needed.');
  for (const c of candidates) {
    if (c.build === 'full' && candidates.length > 1 && !loadsInChild(c.path)) continue;
    cached = require(c.path) as NativeAddon;
    cachedPath = c.path;
    return cached;
  }
  throw new Error(`expertd: no loadable native addon among ${candidates.map((c) => c.path).join(', ')}`);
}

export function nativePath(): string | undefined {
  loadNative();
  return cachedPath;
}

/** A CUDA version as cudaDriverGetVersion/cudaRuntimeGetVersion encode it (12080) -> "12.8"; 0 -> "none". */
export function cudaVersionString(v: number): string {
  return v > 0 ? `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}` : 'none';
}

/**
 * Why a full build sees no CUDA device, in one line that keeps the runtime's own error:
 * "no CUDA device: cudaErrorInsufficientDriver (CUDA driver version is insufficient for CUDA runtime
 * version); driver none, runtime 13.0". null when a device is visible or the build has no CUDA.
 */
export function noCudaDeviceReason(caps: Capabilities): string | null {
  if (!caps.cudaCompiled || caps.cudaDevices > 0) return null;
  return `no CUDA device: ${caps.cudaError ?? 'cudaGetDeviceCount() = 0'}; ` +
    `driver ${cudaVersionString(caps.cudaDriverVersion)}, runtime ${cudaVersionString(caps.cudaRuntimeVersion)}`;
}
