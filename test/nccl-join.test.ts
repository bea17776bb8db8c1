// The full build's NCCL join never hangs: against a stand-in libnccl (test/helpers/fake-nccl.c,
// loaded through EXPERTD_NCCL_SO) whose other ranks never come, cudaNcclJoin asks for a
// nonblocking communicator, polls it for timeoutMs, aborts it (ncclCommAbort) and raises E_COMM;
// an asynchronous NCCL failure of the join is E_NCCL with NCCL's message, also after an abort.
// Needs the full build (npm run build:gpu), not a GPU: the join touches no device before it has
// every rank. (The collectives' deadlines poll device streams: they need a GPU.)
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { test } from 'node:test';

import { loadNative, packageRoot } from '../src/native/index.js';

const full = loadNative().capabilities().cudaCompiled;
const skip = !full && 'needs the full build (npm run build:gpu)';

/** Runs cudaNcclJoin(id, 2, 0, timeoutMs) in a fresh process (NCCL is loaded once per process). */
function join(so: string, mode: string, timeoutMs: number) {
  const script = `
    import { loadNative } from ${JSON.stringify(path.join(packageRoot(), 'dist', 'src', 'native', 'index.js'))};
    const cu = loadNative();
    const t0 = performance.now();
    try {
      cu.cudaNcclJoin(new Uint8Array(128), 2, 0, ${timeoutMs});
      console.log(JSON.stringify({ joined: true }));
    } catch (e) {
      console.log(JSON.stringify({ code: e.code, message: e.message, ms: performance.now() - t0 }));
    }`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script],
    { env: { ...process.env, EXPERTD_NCCL_SO: so, FAKE_NCCL_MODE: mode }, encoding: 'utf8', timeout: 60_000 });
  assert.equal(r.status, 0, r.stderr);
  return { out: JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { code?: string; message?: string; ms?: number; joined?: boolean }, stderr: r.stderr };
}

test('cudaNcclJoin with peers that never come: nonblocking init, E_COMM after timeoutMs, the communicator aborted', { skip }, () => {
  const dir = mkdtempSync(path.join(tmpdir(), 'expertd-fake-nccl-'));
  try {
    const so = path.join(dir, 'libfake-nccl.so');
    execFileSync('cc', ['-shared', '-fPIC', '-o', so, path.join(packageRoot(), 'test', 'helpers', 'fake-nccl.c')]);
    const hang = join(so, 'hang', 300);
    assert.equal(hang.out.code, 'E_COMM');
    assert.equal(hang.out.message, 'NCCL join: rank 0 of 2: not every rank joined within 300 ms (ncclCommInitRankConfig aborted)');
    assert.ok(hang.out.ms! >= 300 && hang.out.ms! < 10_000, `${hang.out.ms} ms`);
    assert.match(hang.stderr, /fake-nccl: ncclCommInitRankConfig nonblocking\nfake-nccl: ncclCommAbort\n/);
    const err = join(so, 'error', 60_000);
    assert.equal(err.out.code, 'E_NCCL');
    assert.match(err.out.message!, /^NCCL unhandled system error \(2\) in ncclCommInitRankConfig/);
    assert.ok(err.out.ms! < 10_000, 'an asynchronous failure ends the wait at once');
    assert.match(err.stderr, /fake-nccl: ncclCommAbort/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
