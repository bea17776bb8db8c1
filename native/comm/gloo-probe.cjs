// Configure-time probe for Gloo (binding.gyp and native/CMakeLists.txt): prints 1 when a C++
// program using Gloo's TCP transport compiles and links against -lgloo here, else 0 (and why, on
// stderr). EXPERTD_GLOO=0 or 1 overrides it (e.g. to check the build without Gloo).
'use strict';
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const forced = process.env.EXPERTD_GLOO;
if (forced === '0' || forced === '1') {
  process.stderr.write(`expertd: Gloo ${forced === '1' ? 'forced on' : 'forced off'} (EXPERTD_GLOO=${forced})\n`);
  process.stdout.write(forced);
  process.exit(0);
}

const source = `
#include <gloo/config.h>
#if !GLOO_HAVE_TRANSPORT_TCP
#error "this Gloo has no TCP transport"
#endif
#include <gloo/alltoallv.h>
#include <gloo/rendezvous/context.h>
#include <gloo/transport/tcp/device.h>
int main() {
  gloo::transport::tcp::attr attr;
  attr.hostname = "127.0.0.1";
  auto dev = gloo::transport::tcp::CreateDevice(attr);
  return dev ? 0 : 1;
}
`;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'expertd-gloo-probe-'));
let ok = false;
try {
  fs.writeFileSync(path.join(dir, 'probe.cc'), source);
  execFileSync(process.env.CXX || 'c++', ['-std=c++17', 'probe.cc', '-o', 'probe', '-lgloo'],
    { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], timeout: 120_000 });
  ok = true;
} catch (e) {
  const why = String(e.stderr || e.message).split('\n').find((l) => /error/i.test(l)) || String(e.message);
  process.stderr.write(`expertd: building without Gloo (multi-process CPU ranks unavailable): ${why.trim()}\n`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
process.stdout.write(ok ? '1' : '0');
