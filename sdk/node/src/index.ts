/**
 * Live feature flags for LiveKit agents (`@livekit/agents`) that voicefleet runs: the Node.js
 * twin of the Python `voicefleet.sdk`. `@voicefleet/flags/openfeature` holds the OpenFeature
 * provider.
 */

export {
  FlagsClient,
  type FlagsClientEvents,
  type FlagsClientOptions,
  type Logger,
  type Source,
  flags,
} from './client.js';
export { envName, envValue } from './env.js';
export {
  type Condition,
  type Flag,
  type FlagType,
  type FlagValue,
  type JobLike,
  type Op,
  type Reason,
  OFF,
  type Rule,
  Session,
  type SessionInit,
  bucket,
  evaluate,
  isType,
  text,
} from './evaluate.js';
