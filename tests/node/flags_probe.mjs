// A Node.js process that reads flags with @voicefleet/flags, configured from the environment as
// voicefleet's runtime configures an instance (tests/test_node_sdk.py installs the packed SDK
// beside this file). It prints one JSON line at start and after every change: the client's
// source and version, `greeting`, `pct` for SESSIONS sessions (dispatch ids AD_0, AD_1, ...)
// and `greeting` through the OpenFeature provider. With --once it prints one line and exits.
// voicefleet's runtime sets VOICEFLEET_URL, VOICEFLEET_AGENT_ID, LIVEKIT_API_KEY/SECRET (the
// instance's own key) and VOICEFLEET_FLAGS_CACHE; the test sets them the same way.
import { OpenFeature } from '@openfeature/server-sdk';
import { Session, flags } from '@voicefleet/flags';
import { VoicefleetProvider } from '@voicefleet/flags/openfeature';

const client = flags();
const provider = new VoicefleetProvider(client);
// Ready at the first live snapshot, or after 2 s on the cache file or the environment.
await OpenFeature.setProviderAndWait(provider);
const of = OpenFeature.getClient();
const sessions = Number(process.env.SESSIONS || 0);

async function report() {
  const details = await of.getStringDetails('greeting', 'of-default', { targetingKey: 'AD_0' });
  const pct = Array.from({ length: sessions }, (_, i) =>
    client.getBool('pct', false, new Session({ dispatchId: `AD_${i}` })),
  );
  const line = {
    source: client.source,
    version: client.version,
    greeting: client.getString('greeting', 'default'),
    pct,
    of: { value: details.value, reason: details.reason },
  };
  process.stdout.write(JSON.stringify(line) + '\n');
}

await report();
if (process.argv.includes('--once')) process.exit(0);
client.on('change', () => void report());
// The client never keeps a process alive; this one lives until its stdin closes.
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
