// The client against a small in-process server that speaks the flag stream (server-sent
// events, as `vf server` sends them): snapshots, reconnects, the cache file, the environment,
// the token it signs, and the OpenFeature provider through @openfeature/server-sdk. The real
// `vf server` is tested in tests/test_node_sdk.py.
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { once } from 'node:events';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, beforeEach, test } from 'node:test';

import { OpenFeature, ProviderEvents } from '@openfeature/server-sdk';

import { FlagsClient, Session } from '../dist/index.js';
import { VoicefleetProvider } from '../dist/openfeature.js';

const KEY = 'APIkey';
const SECRET = 'secret-of-the-key';
const dir = mkdtempSync(join(tmpdir(), 'vf-client-'));
after(() => rmSync(dir, { recursive: true, force: true }));
let n = 0;
let cachePath;
beforeEach(() => {
  cachePath = join(dir, `cache-${++n}`, 'flags.json');
});

const quiet = { debug: () => {}, warn: () => {} };
// The client's connection and timers are unref'd (it never keeps an agent alive); the tests
// wait on it with nothing else running, so something must.
const keepAlive = setInterval(() => {}, 1000);
after(() => clearInterval(keepAlive));

function verify(token) {
  const [header, body, signature] = token.split('.');
  const want = createHmac('sha256', SECRET).update(`${header}.${body}`).digest('base64url');
  assert.equal(signature, want, 'HS256 signature with the API secret');
  return JSON.parse(Buffer.from(body, 'base64url').toString());
}

/** A flag stream for one agent: `send(flags)` pushes a snapshot to every open stream. */
async function flagServer({ status = 200 } = {}) {
  const streams = new Set();
  const requests = [];
  let flags = [];
  const server = createServer((req, res) => {
    requests.push({ url: req.url, authorization: req.headers.authorization });
    if (status !== 200) {
      res.writeHead(status).end('{"detail": "no"}');
      return;
    }
    res.writeHead(200, { 'content-type': 'text/event-stream' });
    res.write(`event: snapshot\ndata: ${JSON.stringify({ flags })}\n\n`);
    streams.add(res);
    res.on('close', () => streams.delete(res));
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    requests,
    streams,
    send(next, raw) {
      flags = next;
      for (const res of streams)
        res.write(raw ?? `event: snapshot\ndata: ${JSON.stringify({ flags })}\n\n`);
    },
    async close() {
      for (const res of streams) res.destroy();
      server.closeAllConnections();
      server.close();
      await once(server, 'close');
    },
  };
}

const greeting = (value) => ({
  key: 'greeting',
  type: 'string',
  value,
  rules: [],
  killed: false,
  off: '',
});

test('streams snapshots, signs its token as the Python SDK, and falls back to its copy', async () => {
  const server = await flagServer();
  server.send([greeting('hello')]);
  const client = new FlagsClient({
    url: `${server.url}/`,
    agent: 'CA_1',
    apiKey: KEY,
    apiSecret: SECRET,
    cachePath,
    logger: quiet,
  }).start();
  try {
    assert.equal(client.source, 'env');
    assert.equal(await client.waitReady(5000), true);
    assert.equal(client.getString('greeting', 'x'), 'hello');
    const [request] = server.requests;
    assert.equal(request.url, '/api/v1/agents/CA_1/flags/stream');
    const claims = verify(request.authorization.replace(/^Bearer /, ''));
    assert.equal(claims.iss, KEY);
    assert.deepEqual(claims.agent, { admin: true });
    assert.ok(claims.exp > Date.now() / 1000 && claims.nbf <= Date.now() / 1000);

    const version = client.version;
    const changed = once(client, 'change');
    server.send([greeting('bonjour')]);
    assert.deepEqual(await changed, [version + 1, 'live']);
    assert.equal(client.getString('greeting'), 'bonjour');
    // The copy on disk, in the format the Python SDK reads.
    const cache = JSON.parse(readFileSync(cachePath, 'utf8'));
    assert.deepEqual(cache.flags, [greeting('bonjour')]);

    const lost = once(client, 'change');
    await server.close();
    assert.deepEqual(await lost, [version + 1, 'cached']);
    assert.equal(client.getString('greeting'), 'bonjour', 'served from its copy');
  } finally {
    await client.close();
  }

  // A process started while the server is down: the cache file.
  const late = new FlagsClient({ url: server.url, agent: 'CA_1', cachePath, logger: quiet });
  assert.equal(late.source, 'cached');
  assert.equal(late.getString('greeting'), 'bonjour');
});

test('reconnects when the server comes back, and a bad snapshot only costs a reconnect', async () => {
  const server = await flagServer();
  server.send([greeting('one')]);
  const warnings = [];
  const logger = { debug: () => {}, warn: (m) => warnings.push(m) };
  const client = new FlagsClient({
    url: server.url,
    agent: 'a',
    apiKey: KEY,
    apiSecret: SECRET,
    cachePath,
    logger,
  }).start();
  try {
    assert.equal(await client.waitReady(5000), true);
    // A listener's bug is logged and stops nothing.
    client.on('change', () => {
      throw new Error('a bug in a listener');
    });
    const version = client.version;
    server.send([greeting('two')], 'event: snapshot\ndata: {"flags": "not a list"}\n\n');
    // The server answers the reconnect with its current flags.
    assert.equal(await client.waitVersion(version, 5000), true);
    assert.equal(client.getString('greeting'), 'two');
    assert.equal(server.requests.length, 2);
    assert.match(warnings.join('\n'), /flag snapshot not understood/);
    assert.match(warnings.join('\n'), /a 'change' listener threw: Error: a bug in a listener/);
    // Kept up when the server drops the stream.
    for (const res of server.streams) res.destroy();
    assert.equal(await client.waitVersion(client.version, 5000), true);
    assert.equal(server.requests.length, 3);
  } finally {
    await client.close();
    await server.close();
  }
});

test('a refused stream is said once in a while, and the environment serves meanwhile', async () => {
  const server = await flagServer({ status: 403 });
  const warnings = [];
  const logger = { debug: () => {}, warn: (m) => warnings.push(m) };
  process.env.VOICEFLEET_FLAG_NEW_VOICE = 'true';
  process.env.VOICEFLEET_FLAG_MAX_TURNS = '12';
  const client = new FlagsClient({
    url: server.url,
    agent: 'a',
    apiKey: KEY,
    apiSecret: 'wrong',
    cachePath,
    logger,
  }).start();
  try {
    assert.equal(await client.waitReady(300), false);
    assert.match(warnings[0], /flag stream refused: 403/);
    assert.equal(server.requests.length, 1, 'waits 5 s before asking again');
    assert.equal(client.source, 'env');
    assert.equal(client.getBool('new_voice', false), true);
    assert.equal(client.getNumber('max_turns', 3), 12);
    assert.equal(client.getString('max_turns', 'd'), 'd', 'a number is no string');
    assert.equal(client.getBool('missing', true), true);
  } finally {
    delete process.env.VOICEFLEET_FLAG_NEW_VOICE;
    delete process.env.VOICEFLEET_FLAG_MAX_TURNS;
    await client.close();
    await server.close();
  }
});

test('configured from the environment as voicefleet runs it; no server, no stream', () => {
  const saved = { ...process.env };
  Object.assign(process.env, {
    VOICEFLEET_URL: 'http://127.0.0.1:9/prefix/',
    VOICEFLEET_AGENT_ID: 'CA_env',
    LIVEKIT_API_KEY: 'k',
    LIVEKIT_API_SECRET: 's',
    VOICEFLEET_FLAGS_CACHE: join(dir, 'env-cache.json'),
  });
  try {
    const client = new FlagsClient();
    assert.equal(client.url, 'http://127.0.0.1:9/prefix');
    assert.deepEqual([client.agent, client.apiKey, client.apiSecret], ['CA_env', 'k', 's']);
    assert.equal(client.cachePath, join(dir, 'env-cache.json'));
    delete process.env.VOICEFLEET_FLAGS_CACHE;
    process.env.XDG_CACHE_HOME = join(dir, 'xdg');
    assert.equal(new FlagsClient().cachePath, join(dir, 'xdg', 'voicefleet', 'flags-CA_env.json'));
  } finally {
    process.env = saved;
  }
  const idle = new FlagsClient({ url: '', agent: '', cachePath: join(dir, 'none') }).start();
  assert.equal(idle.source, 'env');
  assert.equal(idle.get('x', 'd'), 'd');
});

test('a cache file that is not one of ours is ignored', () => {
  const path = join(dir, 'garbage.json');
  for (const text of ['not json', '{"flags": 3}', '{"flags": [1]}', '[]']) {
    writeFileSync(path, text);
    const client = new FlagsClient({ url: '', agent: 'a', cachePath: path });
    assert.equal(client.source, 'env', text);
  }
});

test('sessions from a job, and the same session gets the same answer', () => {
  const flag = {
    key: 'f',
    type: 'boolean',
    value: false,
    rules: [{ when: [], percent: 50, value: true }],
  };
  const job = {
    id: 'AJ_1',
    dispatchId: 'AD_1',
    room: { name: 'r1' },
    metadata: '{"a": 1}',
    attributes: { t: 'x' },
  };
  const s = Session.fromJob(job);
  assert.deepEqual(
    [s.room, s.dispatchId, s.metadata, s.attributes, s.key],
    ['r1', 'AD_1', '{"a": 1}', { t: 'x' }, 'AD_1'],
  );
  assert.equal(Session.fromJob({ room: { name: 'r2' } }).key, 'r2');
  const path = join(dir, 'pct.json');
  writeFileSync(path, JSON.stringify({ flags: [flag] }));
  const client = new FlagsClient({ url: '', agent: 'a', cachePath: path });
  const answers = Array.from({ length: 200 }, (_, i) =>
    client.getBool('f', false, { dispatchId: `AD_${i}` }),
  );
  assert.deepEqual(
    Array.from({ length: 200 }, (_, i) => client.getBool('f', false, { dispatchId: `AD_${i}` })),
    answers,
  );
  const share = answers.filter(Boolean).length;
  assert.ok(share > 60 && share < 140, `${share} of 200 at 50 %`); // Binomial(200, .5): 5.6 sd
  assert.equal(client.getBool('f', true), false, 'no session: in no percentage');
});

test('the OpenFeature provider through @openfeature/server-sdk, and its change events', async () => {
  const server = await flagServer();
  const voice = {
    key: 'voice',
    type: 'string',
    value: 'alloy',
    killed: false,
    off: '',
    rules: [{ when: [{ attr: 'room', op: 'prefix', value: 'vip-' }], percent: 100, value: 'nova' }],
  };
  server.send([voice]);
  const client = new FlagsClient({
    url: server.url,
    agent: 'a',
    apiKey: KEY,
    apiSecret: SECRET,
    cachePath,
    logger: quiet,
  }).start();
  const provider = new VoicefleetProvider(client);
  try {
    await OpenFeature.setProviderAndWait(provider);
    assert.equal(client.source, 'live', 'ready once the first snapshot is in');
    const of = OpenFeature.getClient();
    const vip = await of.getStringDetails('voice', 'x', { targetingKey: 'AD_1', room: 'vip-7' });
    assert.deepEqual([vip.value, vip.reason, vip.variant], ['nova', 'TARGETING_MATCH', 'rule 1']);
    const other = await of.getStringDetails('voice', 'x', { room: 'r' });
    assert.deepEqual([other.value, other.reason], ['alloy', 'DEFAULT']);
    const wrong = await of.getBooleanDetails('voice', true);
    assert.deepEqual(
      [wrong.value, wrong.reason, wrong.errorCode],
      [true, 'ERROR', 'TYPE_MISMATCH'],
    );
    const missing = await of.getNumberDetails('nope', 4);
    assert.deepEqual([missing.value, missing.errorCode], [4, 'FLAG_NOT_FOUND']);
    const object = await of.getObjectDetails('voice', {});
    assert.equal(object.errorCode, 'TYPE_MISMATCH');

    const changed = new Promise((resolve) =>
      of.addHandler(ProviderEvents.ConfigurationChanged, resolve),
    );
    server.send([{ ...voice, killed: true }]);
    await changed;
    const killed = await of.getStringDetails('voice', 'x', { room: 'vip-7' });
    assert.deepEqual([killed.value, killed.reason], ['', 'DISABLED']);
  } finally {
    await OpenFeature.close();
    await client.close();
    await server.close();
  }
});
