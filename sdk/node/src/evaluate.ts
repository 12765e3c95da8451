/**
 * A flag's evaluation for one session: a port of voicefleet's Python evaluator
 * (src/voicefleet/sdk/evaluate.py), which the server and Python agents use. Both must give the
 * same answer for the same flag and session; sdk/vectors/flags.json pins it for both.
 *
 * A flag, as the server streams it:
 *
 *     {"key": "new_voice", "type": "boolean", "value": false,
 *      "rules": [{"when": [{"attr": "room", "op": "prefix", "value": "vip-"}],
 *                 "percent": 100, "value": true},
 *                {"when": [], "percent": 20, "value": true}],
 *      "killed": false, "off": false}
 *
 * The first rule whose conditions all hold and whose percentage admits the session gives the
 * value; otherwise `value`. A killed flag gives `off` to every session. A session's place in a
 * percentage is a hash of the flag's key and the session (its dispatch id, else its room); an
 * evaluation without a session is in no percentage.
 */

import { createHash } from 'node:crypto';

import { globMatch } from './glob.js';
import { pythonJson } from './pyjson.js';

export type FlagType = 'boolean' | 'string' | 'number';
export type FlagValue = boolean | string | number;
export type Op = 'equals' | 'in' | 'prefix' | 'glob' | 'contains';

export interface Condition {
  attr: string;
  op?: Op;
  value: unknown;
}

export interface Rule {
  when?: Condition[];
  percent?: number;
  value: FlagValue;
}

export interface Flag {
  key: string;
  type: FlagType;
  value: FlagValue;
  rules?: Rule[];
  killed?: boolean;
  off?: FlagValue;
}

/** Why a session got its value: "killed", "rule N" (1-based) or "default". */
export type Reason = 'killed' | 'default' | `rule ${number}`;

export const OFF: Readonly<Record<FlagType, FlagValue>> = { boolean: false, string: '', number: 0 };

/** What a flag may look at: the job's room, dispatch, metadata and attributes. */
export interface SessionInit {
  room?: string;
  dispatchId?: string;
  metadata?: string;
  attributes?: Readonly<Record<string, string>>;
}

/** The parts of a `@livekit/agents` `JobContext.job` (a `livekit.Job` message) a flag reads. */
export interface JobLike {
  room?: { name?: string } | undefined;
  dispatchId?: string;
  metadata?: string;
  attributes?: Readonly<Record<string, string>>;
}

export class Session {
  readonly room: string;
  readonly dispatchId: string;
  readonly metadata: string;
  readonly attributes: Readonly<Record<string, string>>;

  constructor(init: SessionInit = {}) {
    this.room = init.room ?? '';
    this.dispatchId = init.dispatchId ?? '';
    this.metadata = init.metadata ?? '';
    this.attributes = { ...(init.attributes ?? {}) };
  }

  /** From a `@livekit/agents` `JobContext.job`: `Session.fromJob(ctx.job)`. */
  static fromJob(job: JobLike): Session {
    return new Session({
      room: job.room?.name ?? '',
      dispatchId: job.dispatchId ?? '',
      metadata: job.metadata ?? '',
      attributes: job.attributes ?? {},
    });
  }

  /** What fixes a session's place in percentages: its dispatch id, else its room. */
  get key(): string {
    return this.dispatchId || this.room;
  }

  /** The attribute's text, or undefined when the session has none (no condition holds). */
  get(attr: string): string | undefined {
    if (attr === 'room') return this.room;
    if (attr === 'dispatch_id') return this.dispatchId;
    if (attr === 'metadata') return this.metadata;
    if (attr.startsWith('attributes.')) {
      const name = attr.slice('attributes.'.length);
      return Object.hasOwn(this.attributes, name) ? this.attributes[name] : undefined;
    }
    if (attr.startsWith('metadata.')) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(this.metadata || '{}');
      } catch {
        return undefined;
      }
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return undefined;
      const name = attr.slice('metadata.'.length);
      const value: unknown = Object.hasOwn(parsed, name)
        ? (parsed as Record<string, unknown>)[name]
        : undefined;
      return value === undefined || value === null ? undefined : text(value);
    }
    return undefined;
  }
}

/** A value as conditions compare it: text as is, anything else as Python's `json.dumps`. */
export function text(value: unknown): string {
  return typeof value === 'string' ? value : pythonJson(value);
}

/** The session's place in [0, 10000) for this flag: the first 8 bytes of
 * sha256("<flag key>:<session key>"), big-endian, modulo 10000 (as the Python SDK). */
export function bucket(flagKey: string, sessionKey: string): number {
  const digest = createHash('sha256').update(`${flagKey}:${sessionKey}`, 'utf8').digest();
  return Number(digest.readBigUInt64BE(0) % 10_000n);
}

function holds(cond: Condition, session: Session): boolean {
  const actual = session.get(String(cond.attr));
  if (actual === undefined) return false;
  const want = cond.value;
  const op = cond.op ?? 'equals';
  if (op === 'in') return Array.isArray(want) && want.map(text).includes(actual);
  const wanted = text(want);
  switch (op) {
    case 'equals':
      return actual === wanted;
    case 'prefix':
      return actual.startsWith(wanted);
    case 'glob':
      return globMatch(actual, wanted);
    default:
      return actual.includes(wanted); // contains
  }
}

/** The flag's value for `session`, and why. */
export function evaluate(flag: Flag, session: Session = new Session()): [FlagValue, Reason] {
  if (flag.killed) return [flag.off ?? OFF[flag.type], 'killed'];
  const rules = flag.rules ?? [];
  for (let i = 0; i < rules.length; i++) {
    const rule = rules[i]!;
    if ((rule.when ?? []).every((c) => holds(c, session))) {
      const percent = Number(rule.percent ?? 100);
      if (percent >= 100 || (session.key !== '' && bucket(flag.key, session.key) < percent * 100)) {
        return [rule.value, `rule ${i + 1}`];
      }
    }
  }
  return [flag.value, 'default'];
}

/** Whether `value` is a flag value of type `kind`. */
export function isType(kind: FlagType, value: unknown): value is FlagValue {
  return typeof value === kind;
}
