// The rendezvous store (src/dist/store.ts): set/get across clients, waiting gets, timeouts, atomic
// counters under concurrent clients, connection loss, connect retries, and the documented wire
// format byte for byte (the contract the native Gloo rendezvous client speaks).
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';

import { StoreClient, StoreError, StoreServer } from '../src/dist/store.js';

const HOST = '127.0.0.1';

async function withServer(body: (server: StoreServer) => Promise<void>) {
  const server = await StoreServer.listen(HOST, 0);
  try { await body(server); } finally { await server.close(); }
}

test('set on one client, get on another; strings and bytes round-trip', async () => {
  await withServer(async (server) => {
    const a = await StoreClient.connect(HOST, server.port, 2000);
    const b = await StoreClient.connect(HOST, server.port, 2000);
    const blob = new Uint8Array(1 << 20);
    for (let i = 0; i < blob.length; i++) blob[i] = (i * 131 + 7) & 0xff;
    await a.set('text', 'héllo');
    await a.set('blob', blob);
    await a.set('empty', new Uint8Array(0));
    assert.equal(await b.getString('text', 1000), 'héllo');
    assert.deepEqual(await b.get('blob', 1000), blob);
    assert.equal((await b.get('empty', 1000)).length, 0);
    await b.set('text', 'again');   // overwrite
    assert.equal(await a.getString('text', 1000), 'again');
    await a.close(); await b.close();
  });
});

test('get waits for the key, then resolves; several waiters on one key all wake', async () => {
  await withServer(async (server) => {
    const a = await StoreClient.connect(HOST, server.port, 2000);
    const b = await StoreClient.connect(HOST, server.port, 2000);
    let settled = false;
    const waits = [a.getString('later', 5000), a.getString('later', 5000), b.getString('later', 5000)];
    void Promise.all(waits).then(() => { settled = true; });
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(settled, false, 'get resolved before the key was set');
    await b.set('later', 'now');
    assert.deepEqual(await Promise.all(waits), ['now', 'now', 'now']);
    await a.close(); await b.close();
  });
});

test('get times out with E_STORE_TIMEOUT; timeout 0 does not wait; the client stays usable', async () => {
  await withServer(async (server) => {
    const a = await StoreClient.connect(HOST, server.port, 2000);
    const t0 = Date.now();
    await assert.rejects(a.get('never', 200), (e: StoreError) => {
      assert.equal(e.code, 'E_STORE_TIMEOUT');
      assert.match(e.message, /get\('never'\).*timed out after 200 ms/);
      return true;
    });
    const elapsedMs = Date.now() - t0;
    assert.ok(elapsedMs >= 190 && elapsedMs < 1500, `timed out after ${elapsedMs} ms`);
    await assert.rejects(a.get('never', 0), { code: 'E_STORE_TIMEOUT' });
    await a.set('k', 'v');
    assert.equal(await a.getString('k', 0), 'v');
    await a.close();
  });
});

test('add is atomic across concurrent clients; check sees keys', async () => {
  await withServer(async (server) => {
    const clients = await Promise.all([0, 1, 2, 3].map(() => StoreClient.connect(HOST, server.port, 5000)));
    const perClient = 50;
    const got = (await Promise.all(clients.map((c) => Promise.all([...Array(perClient)].map(() => c.add('ctr', 1)))))).flat();
    const total = clients.length * perClient;
    // Every increment saw a distinct value: exactly 1..total, whatever the interleaving.
    assert.deepEqual([...got].sort((x, y) => x - y), [...Array(total).keys()].map((i) => i + 1));
    assert.equal(await clients[0]!.add('ctr', -total), 0);
    assert.equal(await clients[1]!.getString('ctr', 0), '0');
    assert.equal(await clients[2]!.add('fresh', 5), 5);
    assert.equal(await clients[0]!.check(['ctr', 'fresh']), true);
    assert.equal(await clients[0]!.check(['ctr', 'missing']), false);
    await clients[3]!.set('text', 'abc');
    await assert.rejects(clients[3]!.add('text', 1), (e: StoreError) => e.code === 'E_STORE' && /not an integer/.test(e.message));
    await Promise.all(clients.map((c) => c.close()));
  });
});

test('server close fails waiting gets with E_STORE_LOST and signals the loss', async () => {
  const server = await StoreServer.listen(HOST, 0);
  const a = await StoreClient.connect(HOST, server.port, 2000);
  let event = null as Error | null;
  a.on('lost', (e: Error) => { event = e; });
  const waiting = assert.rejects(a.get('never', 30_000), (e: StoreError) => e.code === 'E_STORE_LOST' && /lost/.test(e.message));
  const t0 = Date.now();
  await server.close();
  await waiting;
  assert.ok(Date.now() - t0 < 2000);
  const lost = await a.lost;
  assert.equal(lost, event);
  assert.match(lost.message, /store at 127\.0\.0\.1:\d+ lost/);
  await assert.rejects(a.set('k', 'v'), { code: 'E_STORE_LOST' });
  await a.close();
});

test('close() of a client fails its own pending gets and is not a loss; the server sees it leave', async () => {
  await withServer(async (server) => {
    const a = await StoreClient.connect(HOST, server.port, 2000);
    const left = new Promise((r) => server.once('disconnect', r));
    let lost = false;
    a.on('lost', () => { lost = true; });
    const waiting = assert.rejects(a.get('never', 30_000), { code: 'E_STORE_LOST' });
    await a.close();
    await waiting;
    assert.equal(lost, false);
    await left;
  });
});

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, HOST, r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

test('connect retries until the server comes up, and gives up with E_STORE_CONNECT after its timeout', async () => {
  const port = await freePort();
  const connecting = StoreClient.connect(HOST, port, 5000);
  await new Promise((r) => setTimeout(r, 300));
  const server = await StoreServer.listen(HOST, port);
  const c = await connecting;
  await c.set('k', 'v');
  await c.close();
  await server.close();

  const t0 = Date.now();
  await assert.rejects(StoreClient.connect(HOST, port, 300), (e: StoreError) =>
    e.code === 'E_STORE_CONNECT' && e.message.includes(`127.0.0.1:${port} within 300 ms`));
  assert.ok(Date.now() - t0 < 2000);
});

/** One request frame built by hand from the protocol comment (not with the module's encoder). */
function rawRequest(op: number, id: number, fields: number[]): Buffer {
  const body = Buffer.from([op, id & 0xff, (id >> 8) & 0xff, 0, 0, ...fields]);
  const head = Buffer.alloc(4);
  head.writeUInt32LE(body.length);
  return Buffer.concat([head, body]);
}
const le32 = (v: number) => [v & 0xff, (v >> 8) & 0xff, (v >> 16) & 0xff, (v >>> 24) & 0xff];
const str = (s: string) => [...le32(s.length), ...Buffer.from(s)];

test('wire format: hand-built frames get the documented answers; a malformed frame closes only its connection', async () => {
  await withServer(async (server) => {
    const sock = net.connect(server.port, HOST);
    await new Promise((r) => sock.once('connect', r));
    const received: Buffer[] = [];
    sock.on('data', (d) => received.push(d));
    const expectBytes = async (n: number) => {
      for (let i = 0; i < 200 && Buffer.concat(received).length < n; i++) await new Promise((r) => setTimeout(r, 10));
      const all = Buffer.concat(received);
      received.length = 0;
      return all;
    };
    // GET 'k' with timeout 1000 (waits), then SET k='vv' on the same connection: SET's answer (id 2)
    // comes first, then GET's (id 1) with the value.
    sock.write(rawRequest(2, 1, [...le32(1000), ...str('k')]));
    sock.write(rawRequest(1, 2, [...str('k'), ...str('vv')]));
    const both = await expectBytes(9 + 15);
    assert.deepEqual([...both], [
      5, 0, 0, 0, 2, 0, 0, 0, 0,                            // id 2 OK
      11, 0, 0, 0, 1, 0, 0, 0, 0, 2, 0, 0, 0, 0x76, 0x76,   // id 1 OK bytes 'vv'
    ]);
    // ADD -3 to 'n' -> i64 -3.
    sock.write(rawRequest(3, 7, [0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, ...str('n')]));
    assert.deepEqual([...await expectBytes(17)], [13, 0, 0, 0, 7, 0, 0, 0, 0, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    // CHECK ['k', 'n'] -> 1; GET 'z' timeout 0 -> TIMEOUT.
    sock.write(rawRequest(4, 8, [...le32(2), ...str('k'), ...str('n')]));
    sock.write(rawRequest(2, 9, [...le32(0), ...str('z')]));
    assert.deepEqual([...await expectBytes(19)], [6, 0, 0, 0, 8, 0, 0, 0, 0, 1, 5, 0, 0, 0, 9, 0, 0, 0, 1]);

    const other = await StoreClient.connect(HOST, server.port, 2000);
    const closed = new Promise((r) => sock.once('close', r));
    sock.write(rawRequest(99, 10, []));   // unknown op
    await closed;
    assert.equal(await other.getString('k', 0), 'vv');
    await other.close();
  });
});

test('a get longer than a timer can hold waits instead of timing out at once; the client refuses it with a RangeError', async () => {
  await withServer(async (server) => {
    const sock = net.connect(server.port, HOST);
    await new Promise((r) => sock.once('connect', r));
    const received: Buffer[] = [];
    sock.on('data', (d) => received.push(d));
    sock.write(rawRequest(2, 1, [...le32(0xffffffff), ...str('k')]));   // wait 2^32 - 1 ms
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(Buffer.concat(received).length, 0, 'answered before the key was set');
    const c = await StoreClient.connect(HOST, server.port, 2000);
    await c.set('k', 'v');
    for (let i = 0; i < 200 && Buffer.concat(received).length < 14; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual([...Buffer.concat(received)], [10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0x76]);
    await assert.rejects(c.get('k', 2 ** 32), RangeError);
    sock.destroy();
    await c.close();
  });
});
