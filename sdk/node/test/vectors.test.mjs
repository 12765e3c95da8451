// The shared vectors (sdk/vectors/flags.json, the Python SDK's answers): the Node SDK must give
// the same value and reason for every flag and session, through evaluate, the typed getters over
// a client holding the flags (from the cache file format the Python SDK writes) and the
// OpenFeature provider.
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { FlagsClient, Session, bucket, envName, evaluate, text } from '../dist/index.js';
import { VoicefleetProvider } from '../dist/openfeature.js';

const path =
  process.env.VOICEFLEET_FLAG_VECTORS ??
  fileURLToPath(new URL('../../vectors/flags.json', import.meta.url));
const vectors = JSON.parse(readFileSync(path, 'utf8'));
const byKey = new Map(vectors.flags.map((f) => [f.key, f]));

function session(s) {
  return new Session({
    room: s.room,
    dispatchId: s.dispatch_id,
    metadata: s.metadata,
    attributes: s.attributes,
  });
}

function withEnv(key, value, fn) {
  const name = envName(key);
  const before = process.env[name];
  if (value !== undefined) process.env[name] = value;
  try {
    return fn();
  } finally {
    if (before === undefined) delete process.env[name];
    else process.env[name] = before;
  }
}

const dir = mkdtempSync(join(tmpdir(), 'vf-vectors-'));
after(() => rmSync(dir, { recursive: true, force: true }));
const cachePath = join(dir, 'flags-cache.json');
writeFileSync(cachePath, JSON.stringify({ flags: vectors.flags, at: 0 }));
const client = new FlagsClient({ url: 'http://127.0.0.1:9', agent: 'CA_vectors', cachePath });

test('the vectors file has cases of every kind', () => {
  assert.ok(vectors.evaluations.length > 500, 'evaluations');
  assert.ok(vectors.buckets.length > 5 && vectors.getters.length > 10, 'buckets, getters');
  assert.ok(vectors.openfeature.length > 10, 'openfeature');
});

test('percentage buckets are the same hash as Python', () => {
  for (const b of vectors.buckets) {
    assert.equal(bucket(b.flag, b.session), b.bucket, `${b.flag}:${b.session}`);
  }
});

test("JSON values compare as Python's json.dumps text", () => {
  for (const t of vectors.texts) assert.equal(text(JSON.parse(t.json)), t.text, t.json);
});

describe('evaluations', () => {
  const byFlag = new Map();
  for (const e of vectors.evaluations) byFlag.set(e.flag, [...(byFlag.get(e.flag) ?? []), e]);
  for (const [key, cases] of byFlag) {
    test(key, () => {
      for (const e of cases) {
        const got = evaluate(byKey.get(key), session(e.session));
        assert.deepEqual(got, [e.value, e.reason], `${key} for ${JSON.stringify(e.session)}`);
      }
    });
  }
});

test('typed getters over a client holding the flags, then the environment', () => {
  assert.equal(client.source, 'cached');
  const getters = {
    bool: (k, d, s) => client.getBool(k, d, s),
    string: (k, d, s) => client.getString(k, d, s),
    number: (k, d, s) => client.getNumber(k, d, s),
    get: (k, d, s) => client.get(k, d ?? undefined, s),
  };
  for (const c of vectors.getters) {
    const got = withEnv(c.flag, c.env, () =>
      getters[c.getter](c.flag, c.default, session(c.session ?? {})),
    );
    assert.deepEqual(got ?? null, c.value, JSON.stringify(c));
  }
});

test('the OpenFeature provider gives the same values, reasons and errors', async () => {
  const provider = new VoicefleetProvider(client);
  const resolve = {
    boolean: (k, d, ctx) => provider.resolveBooleanEvaluation(k, d, ctx),
    string: (k, d, ctx) => provider.resolveStringEvaluation(k, d, ctx),
    number: (k, d, ctx) => provider.resolveNumberEvaluation(k, d, ctx),
  };
  try {
    for (const c of vectors.openfeature) {
      client.source = c.source ?? 'live';
      const details = await withEnv(c.flag, c.env, () =>
        resolve[c.kind](c.flag, c.default, c.context),
      );
      const got = {
        value: details.value,
        reason: details.reason,
        variant: details.variant ?? null,
        error: details.errorCode ?? null,
      };
      const want = { value: c.value, reason: c.reason, variant: c.variant, error: c.error };
      assert.deepEqual(got, want, JSON.stringify(c));
    }
  } finally {
    client.source = 'cached';
    await provider.onClose();
  }
});
