// Type-checked by `npm test` (tsc --noEmit -p test), never run: an agent written in TypeScript
// against the package's shipped types, imported by its name through package.json's exports.
import { OpenFeature } from '@openfeature/server-sdk';
import {
  type Flag,
  FlagsClient,
  type FlagValue,
  type JobLike,
  type Reason,
  Session,
  evaluate,
  flags,
} from '@voicefleet/flags';
import { VoicefleetProvider, sessionOf } from '@voicefleet/flags/openfeature';

export async function entry(ctx: { job: JobLike }): Promise<string> {
  const client: FlagsClient = flags();
  const ready: boolean = await client.waitReady(1000);
  const session = Session.fromJob(ctx.job);
  const voice: string = client.getString('voice', 'alloy', session);
  const on: boolean = client.getBool('new_voice', false, { room: 'r', dispatchId: 'AD_1' });
  const turns: number = client.getNumber('max_turns', 6);
  client.on('change', (version: number, source: 'live' | 'cached' | 'env') => {
    void [version, source];
  });
  const flag: Flag | undefined = client.definition('voice');
  const answer: [FlagValue, Reason] | undefined = flag && evaluate(flag, session);

  await OpenFeature.setProviderAndWait(new VoicefleetProvider(client, { readyTimeoutMs: 500 }));
  const details = await OpenFeature.getClient().getBooleanDetails('new_voice', false, {
    targetingKey: ctx.job.dispatchId ?? '',
    room: ctx.job.room?.name ?? '',
  });
  const key: string = sessionOf({ targetingKey: 'AD_1' }).key;
  return JSON.stringify([ready, voice, on, turns, answer, details.value, key]);
}
