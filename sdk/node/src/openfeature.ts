/**
 * An OpenFeature provider on top of `FlagsClient`, for agents that use `@openfeature/server-sdk`.
 *
 *     import { OpenFeature } from '@openfeature/server-sdk';
 *     import { VoicefleetProvider } from '@voicefleet/flags/openfeature';
 *
 *     await OpenFeature.setProviderAndWait(new VoicefleetProvider());
 *     const client = OpenFeature.getClient();
 *     await client.getBooleanValue('new_voice', false,
 *       { targetingKey: ctx.job.dispatchId, room: ctx.job.room?.name });
 *
 * The evaluation context maps to a session: the targeting key is the dispatch id, attributes
 * "room" and "metadata" are the room name and job metadata, any other attribute is a job
 * attribute (values that are not text as their JSON, as the Python provider does).
 *
 * Reasons: TARGETING_MATCH (a rule matched), SPLIT (a rule's percentage admitted the session),
 * DEFAULT (no rule did), DISABLED (killed), CACHED (the server is out of reach: its last flags),
 * STATIC (no flag known: a VOICEFLEET_FLAG_<KEY> variable), ERROR (FLAG_NOT_FOUND,
 * TYPE_MISMATCH). Flags are booleans, strings and numbers; objects are a TYPE_MISMATCH.
 */

import {
  ErrorCode,
  type EvaluationContext,
  type JsonValue,
  OpenFeatureEventEmitter,
  type Provider,
  ProviderEvents,
  type ResolutionDetails,
  type ResolutionReason,
  StandardResolutionReasons,
} from '@openfeature/server-sdk';

import { type FlagsClient, flags } from './client.js';
import { envValue } from './env.js';
import { type FlagType, Session, evaluate, isType, text } from './evaluate.js';

/** The session an evaluation context stands for. */
export function sessionOf(context: EvaluationContext | undefined): Session {
  if (context === undefined) return new Session();
  const { targetingKey, room, metadata, ...rest } = context;
  const attributes: Record<string, string> = {};
  for (const [name, value] of Object.entries(rest)) attributes[name] = contextText(value);
  return new Session({
    room: contextText(room),
    dispatchId: targetingKey ?? '',
    metadata: contextText(metadata),
    attributes,
  });
}

function contextText(value: unknown): string {
  return value === undefined || value === null ? '' : text(value);
}

export interface VoicefleetProviderOptions {
  /** How long `setProviderAndWait` waits for the first live snapshot (ms, default 2000); past
   * it the provider serves its cache or the environment, and says so by its reasons. */
  readyTimeoutMs?: number;
}

export class VoicefleetProvider implements Provider {
  readonly metadata = { name: 'voicefleet' } as const;
  readonly runsOn = 'server' as const;
  readonly events = new OpenFeatureEventEmitter();
  readonly client: FlagsClient;
  private readonly readyTimeoutMs: number;
  private readonly changed = (_version: number, source: string): void => {
    if (source === 'live') this.events.emit(ProviderEvents.ConfigurationChanged);
  };

  constructor(client?: FlagsClient, options: VoicefleetProviderOptions = {}) {
    this.client = client ?? flags();
    this.readyTimeoutMs = options.readyTimeoutMs ?? 2000;
    this.client.on('change', this.changed);
  }

  async initialize(): Promise<void> {
    await this.client.waitReady(this.readyTimeoutMs);
  }

  async onClose(): Promise<void> {
    this.client.off('change', this.changed);
  }

  private resolve<T>(
    key: string,
    fallback: T,
    kind: FlagType,
    context?: EvaluationContext,
  ): ResolutionDetails<T> {
    const flag = this.client.definition(key);
    if (flag === undefined) {
      const value = envValue(key);
      if (value !== undefined && isType(kind, value)) {
        // The server has not said (down since before this process, no cache): the operator's
        // VOICEFLEET_FLAG_<KEY> variable, as FlagsClient.get falls back to.
        return { value: value as T, reason: StandardResolutionReasons.STATIC, variant: 'env' };
      }
      return error(fallback, ErrorCode.FLAG_NOT_FOUND, `no flag '${key}'`);
    }
    if (flag.type !== kind) {
      const message = `flag '${key}' is a ${flag.type}, not a ${kind}`;
      return error(fallback, ErrorCode.TYPE_MISMATCH, message);
    }
    const [value, why] = evaluate(flag, sessionOf(context));
    let reason: ResolutionReason;
    if (why === 'killed') reason = StandardResolutionReasons.DISABLED;
    else if (this.client.source === 'cached') reason = StandardResolutionReasons.CACHED;
    else if (why === 'default') reason = StandardResolutionReasons.DEFAULT;
    else if ((flag.rules?.[Number(why.slice('rule '.length)) - 1]?.percent ?? 100) < 100) {
      reason = StandardResolutionReasons.SPLIT; // a percentage admitted this session
    } else reason = StandardResolutionReasons.TARGETING_MATCH;
    return { value: value as T, reason, variant: why };
  }

  async resolveBooleanEvaluation(
    flagKey: string,
    defaultValue: boolean,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<boolean>> {
    return this.resolve(flagKey, defaultValue, 'boolean', context);
  }

  async resolveStringEvaluation(
    flagKey: string,
    defaultValue: string,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<string>> {
    return this.resolve(flagKey, defaultValue, 'string', context);
  }

  async resolveNumberEvaluation(
    flagKey: string,
    defaultValue: number,
    context: EvaluationContext,
  ): Promise<ResolutionDetails<number>> {
    return this.resolve(flagKey, defaultValue, 'number', context);
  }

  async resolveObjectEvaluation<T extends JsonValue>(
    _flagKey: string,
    defaultValue: T,
  ): Promise<ResolutionDetails<T>> {
    const message = 'voicefleet flags are booleans, strings and numbers; not objects';
    return error(defaultValue, ErrorCode.TYPE_MISMATCH, message);
  }
}

function error<T>(value: T, errorCode: ErrorCode, errorMessage: string): ResolutionDetails<T> {
  return { value, reason: StandardResolutionReasons.ERROR, errorCode, errorMessage };
}
