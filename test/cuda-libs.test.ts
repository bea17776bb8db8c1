// Where the full build looks for the libraries it loads at run time (native/cuda/cuda_libs.cc):
// $EXPERTD_CUBLASLT_SO / $EXPERTD_NCCL_SO, then the pip wheels' folders under every Python site folder
// (CUDA 13: nvidia/cu13/lib; CUDA 12: nvidia/<package>/lib), then the loader path, each try recorded.
// A fresh child process per case (the libraries load once per process), fake site folders in a
// temp dir; no GPU needed.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';
import type { CudaLibrary } from '../src/native/types.js';

const caps = loadNative().capabilities();
const full = caps.cudaCompiled ? false : 'CUDA not compiled in (portable build)';

/** cudaLibraries() in a child with `env` added (PATH kept so that node runs; no other site folders). */
function librariesIn(env: Record<string, string>): { cublasLt: CudaLibrary; nccl: CudaLibrary } {
  const index = path.join(packageRoot(), 'dist', 'src', 'native', 'index.js');
  const script = `import(${JSON.stringify(index)}).then((m) => console.log(JSON.stringify(m.loadNative().cudaLibraries())))`;
  const out = execFileSync(process.execPath, ['-e', script], {
    env: { PATH: path.dirname(process.execPath), HOME: os.tmpdir(), ...env }, encoding: 'utf8', timeout: 60_000,
  });
  return JSON.parse(out) as { cublasLt: CudaLibrary; nccl: CudaLibrary };
}

/** A real shared library of this process that is surely no cuBLASLt: libc, from /proc/self/maps. */
function libcPath(): string {
  const m = /\s(\/\S*\/libc\.so\.6)$/m.exec(readFileSync('/proc/self/maps', 'utf8'));
  assert.ok(m, 'libc.so.6 is mapped');
  return m[1]!;
}

test('cuBLASLt and NCCL: the override, then the CUDA 13 and 12 wheels in site folders, then the loader path', { skip: full }, () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-libs-'));
  try {
    const site = path.join(dir, 'site-packages');
    const put = (rel: string, real?: string) => {
      mkdirSync(path.dirname(path.join(site, rel)), { recursive: true });
      if (real) symlinkSync(real, path.join(site, rel));
      else writeFileSync(path.join(site, rel), '');  // not an ELF file: dlopen refuses it
    };
    put('nvidia/cu13/lib/libcublasLt.so.13', libcPath());  // loads, but has no cuBLASLt entry point
    put('nvidia/cublas/lib/libcublasLt.so.12');
    put('nvidia/nccl/lib/libnccl.so.2');
    const bogus = path.join(dir, 'nope', 'libcublasLt.so.99');
    const libs = librariesIn({ PYTHONPATH: site, EXPERTD_CUBLASLT_SO: bogus });

    const tried = libs.cublasLt.tried.map((t) => t.slice(0, t.indexOf(': ')));
    const want = [bogus, path.join(site, 'nvidia/cu13/lib/libcublasLt.so.13'), path.join(site, 'nvidia/cublas/lib/libcublasLt.so.12')];
    assert.deepEqual(tried.slice(0, 2), want.slice(0, 2), 'the override, then PYTHONPATH, the first site folder');
    assert.match(libs.cublasLt.tried[1]!, /: has no cublasLtCreate$/, 'a library without the entry points is passed over');
    // The machine's own site folders may hold a real CUDA 13 wheel (the GPU image's /opt/torch/.venv):
    // it comes before any cu12 folder, and the search ends where a library loads.
    const realSite = libs.cublasLt.path !== null && /: loaded$/.test(libs.cublasLt.tried.at(-1)!) && tried.at(-1)!.includes('/nvidia/cu1');
    if (realSite) {
      assert.ok(!libs.cublasLt.path!.startsWith(dir));
      assert.match(libs.cublasLt.tried.at(-1)!, /: loaded$/);
      assert.ok(!tried.includes(want[2]!), 'a cu12 folder is not tried once a cu13 wheel loaded');
    } else {
      const ours = libs.cublasLt.tried.filter((t) => t.startsWith(dir));
      assert.deepEqual(ours.map((t) => t.slice(0, t.indexOf(': '))), want);
      assert.match(ours[2]!, /: .*(too short|invalid ELF|not an ELF)/i);
      // Then the sonames on the loader path, newest first.
      assert.deepEqual(tried.filter((t) => !t.includes('/')), ['libcublasLt.so.13', 'libcublasLt.so.12', 'libcublasLt.so'].slice(0, tried.filter((t) => !t.includes('/')).length));
      assert.ok(tried.includes('libcublasLt.so.13'));
      if (libs.cublasLt.path !== null) {
        // This machine has a real cuBLASLt on its loader path: it was the one taken, and said so.
        assert.ok(!libs.cublasLt.path.startsWith(dir));
        assert.match(libs.cublasLt.tried.at(-1)!, /: loaded$/);
      }
    }

    const ncclTried = libs.nccl.tried.map((t) => t.slice(0, t.indexOf(': ')));
    assert.equal(ncclTried[0], path.join(site, 'nvidia/nccl/lib/libnccl.so.2'));
    if (libs.nccl.path !== null && ncclTried.at(-1)!.includes('/')) {
      // A real NCCL in one of the machine's site folders (the GPU image's torch wheel): taken there.
      assert.ok(!ncclTried.at(-1)!.startsWith(dir));
      assert.match(libs.nccl.tried.at(-1)!, /: loaded$/);
    } else {
      assert.ok(ncclTried.includes('libnccl.so.2'), 'then the soname on the loader path');
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a venv on PATH is a site folder (bin/../lib/python3*/site-packages)', { skip: full }, () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'expertd-libs-'));
  try {
    const lib = path.join(dir, 'venv', 'lib', 'python3.12', 'site-packages', 'nvidia', 'cu13', 'lib', 'libnccl.so.2');
    mkdirSync(path.dirname(lib), { recursive: true });
    mkdirSync(path.join(dir, 'venv', 'bin'));
    writeFileSync(lib, '');
    const libs = librariesIn({ PATH: `${path.join(dir, 'venv', 'bin')}:${path.dirname(process.execPath)}` });
    assert.equal(libs.nccl.tried[0]!.slice(0, libs.nccl.tried[0]!.indexOf(': ')),
      `${path.join(dir, 'venv', 'bin')}/../lib/python3.12/site-packages/nvidia/cu13/lib/libnccl.so.2`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
