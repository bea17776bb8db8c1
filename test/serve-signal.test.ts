// `expertd serve` as a child process: SIGTERM or SIGINT while the model loads stops the load, closes
// the server and exits 0 with a log line saying so (not the default signal death). The load is held
// by a test hook (EXPERTD_TEST_LOAD_DELAY_MS) far longer than the test, so the signal surely lands
// during the load.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';

import { packageRoot } from '../src/native/index.js';

const HOLD_MS = 10 * 60_000; // the load would take this long: the exit must not wait for it

for (const signal of ['SIGTERM', 'SIGINT'] as const) {
  test(`${signal} during the model load stops the load and exits 0`, async () => {
    const root = packageRoot();
    const proc = spawn(process.execPath, [path.join(root, 'bin', 'expertd.js'), 'serve', '--port', '0',
      '--model', path.join(root, 'test', 'fixtures', 'mixtral'), '--log-level', 'info'],
    { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, EXPERTD_TEST_LOAD_DELAY_MS: String(HOLD_MS) } });
    let out = '';
    const exit = new Promise<{ code: number | null; sig: NodeJS.Signals | null }>((resolve) =>
      proc.on('exit', (code, sig) => resolve({ code, sig })));
    // A backstop far above the time a start and a stop take (seconds, even on a loaded machine), far
    // below the held load: a hang fails the test instead of waiting 10 minutes.
    const backstop = setTimeout(() => proc.kill('SIGKILL'), 120_000);
    try {
      const base = await new Promise<string>((resolve, reject) => {
        proc.stdout!.on('data', (d: Buffer) => {
          out += d.toString();
          const m = /expertd listening on (http:\/\/[0-9.:]+) \(loading the model\)/.exec(out);
          if (m) resolve(m[1]!);
        });
        proc.stderr!.on('data', (d: Buffer) => { out += d.toString(); });
        void exit.then(({ code, sig }) => reject(new Error(`exited early (${code ?? sig}):\n${out}`)));
      });
      const health = await fetch(`${base}/health`);
      assert.equal(health.status, 503, 'still loading when the signal is sent');
      assert.equal(((await health.json()) as { status: string }).status, 'loading');
      proc.kill(signal);
      const { code, sig } = await exit;
      assert.deepEqual({ code, sig }, { code: 0, sig: null }, out);
      const lines = out.split('\n').filter((l) => l.startsWith('{')).map((l) => JSON.parse(l) as { msg: string });
      const msgs = lines.map((l) => l.msg);
      assert.ok(msgs.includes(`${signal} while the model was loading: load stopped, exiting`), msgs.join('\n'));
      assert.equal(msgs.at(-1), 'stopped');
      assert.ok(!msgs.some((m) => /ready on/.test(m)), 'never became ready');
      await assert.rejects(fetch(`${base}/health`), 'the server is closed');
    } finally {
      clearTimeout(backstop);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    }
  });
}
