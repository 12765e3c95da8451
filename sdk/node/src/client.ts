/**
 * Feature flags for a running agent: changes arrive within a second, no restart.
 *
 *     import { Session, flags } from '@voicefleet/flags';
 *
 *     entry: async (ctx) => {
 *       const voice = flags().getString('voice', 'alloy', Session.fromJob(ctx.job));
 *     }
 *
 * `flags()` is a process-wide client, started on first use. It keeps one streaming HTTP
 * connection to the server (server-sent events: the agent's flags at connect and after every
 * change) and never blocks a call: `get` reads the local copy. The copy is also written to a
 * cache file, so a process started while the server is down has the last flags it knew. With
 * neither, `VOICEFLEET_FLAG_<KEY>` environment variables (JSON, else a string), then the caller's
 * default. The connection and its timers are unref'd: the client never keeps a process alive.
 *
 * voicefleet's local runtime sets VOICEFLEET_URL, VOICEFLEET_AGENT_ID and the instance's own
 * LIVEKIT_API_KEY / LIVEKIT_API_SECRET, which is all the client needs. Same semantics, cache file
 * and wire as the Python SDK (src/voicefleet/sdk/flags.py).
 */

import { EventEmitter } from 'node:events';
import { mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { createInterface } from 'node:readline';
import { debuglog } from 'node:util';

import { envValue } from './env.js';
import { type Flag, Session, type SessionInit, evaluate, isType } from './evaluate.js';
import { streamToken } from './token.js';

/** Where the flags come from: the live stream, the last copy (server gone), or nothing yet. */
export type Source = 'live' | 'cached' | 'env';

export interface Logger {
  debug(message: string): void;
  warn(message: string): void;
}

export interface FlagsClientOptions {
  /** The voicefleet server's HTTP URL; default VOICEFLEET_URL. */
  url?: string;
  /** The agent's id (or name); default VOICEFLEET_AGENT_ID. */
  agent?: string;
  /** The key that signs the stream's token; default LIVEKIT_API_KEY (the instance's own). */
  apiKey?: string;
  apiSecret?: string;
  /** The cache file; default VOICEFLEET_FLAGS_CACHE, else
   * $XDG_CACHE_HOME (or ~/.cache)/voicefleet/flags-<agent>.json, shared with the Python SDK. */
  cachePath?: string;
  /** Default: debug lines with NODE_DEBUG=voicefleet, warnings on stderr. */
  logger?: Logger;
}

export interface FlagsClientEvents {
  /** A snapshot arrived (live) or the stream was lost (source "cached"). */
  change: [version: number, source: Source];
}

const defaultLogger: Logger = {
  debug: debuglog('voicefleet'),
  warn: (message) => console.warn(`voicefleet flags: ${message}`),
};

function asSession(session: Session | SessionInit | undefined): Session {
  return session instanceof Session ? session : new Session(session);
}

export class FlagsClient extends EventEmitter<FlagsClientEvents> {
  readonly url: string;
  readonly agent: string;
  readonly apiKey: string;
  readonly apiSecret: string;
  readonly cachePath: string;
  source: Source = 'env';
  /** Bumps with every snapshot received (or read from the cache). */
  version = 0;

  private flags = new Map<string, Flag>();
  private readonly log: Logger;
  private running: Promise<void> | undefined;
  private stopped = false;
  private request: http.ClientRequest | undefined;
  private wake: (() => void) | undefined;
  private readonly waiters = new Set<() => void>(); // before listeners, whatever they do

  constructor(options: FlagsClientOptions = {}) {
    super();
    const env = process.env;
    this.url = (options.url || env.VOICEFLEET_URL || '').replace(/\/+$/, '');
    this.agent = options.agent || env.VOICEFLEET_AGENT_ID || '';
    this.apiKey = options.apiKey || env.LIVEKIT_API_KEY || '';
    this.apiSecret = options.apiSecret || env.LIVEKIT_API_SECRET || '';
    // The user's own cache dir, not the shared temp dir (where another user could plant a file
    // or a link under the same name); instances voicefleet runs get one per agent.
    const cacheHome = env.XDG_CACHE_HOME || join(homedir(), '.cache');
    this.cachePath =
      options.cachePath ||
      env.VOICEFLEET_FLAGS_CACHE ||
      join(cacheHome, 'voicefleet', `flags-${this.agent || 'x'}.json`);
    this.log = options.logger ?? defaultLogger;
    this.readCache();
  }

  // -- reading flags ----------------------------------------------------------------------------

  /** The flag's value for `session`. Without a session, rules that look at the session do not
   * match and percentages admit nobody: what every session gets for sure. */
  get(key: string, fallback?: unknown, session?: Session | SessionInit): unknown {
    const flag = this.flags.get(key);
    if (flag !== undefined) return evaluate(flag, asSession(session))[0];
    return envValue(key, fallback);
  }

  getBool(key: string, fallback = false, session?: Session | SessionInit): boolean {
    const value = this.get(key, fallback, session);
    return typeof value === 'boolean' ? value : fallback;
  }

  getString(key: string, fallback = '', session?: Session | SessionInit): string {
    const value = this.get(key, fallback, session);
    return typeof value === 'string' ? value : fallback;
  }

  getNumber(key: string, fallback = 0, session?: Session | SessionInit): number {
    const value = this.get(key, fallback, session);
    return isType('number', value) ? (value as number) : fallback;
  }

  /** The flag's definition as the server sent it, or undefined. */
  definition(key: string): Flag | undefined {
    return this.flags.get(key);
  }

  /** Resolves true once a snapshot newer than `version` has arrived; false after `timeoutMs`. */
  waitVersion(version: number, timeoutMs: number): Promise<boolean> {
    return this.waitFor(() => this.version > version, timeoutMs);
  }

  /** Resolves true at the first live snapshot; false (still cache/env) after `timeoutMs`. */
  waitReady(timeoutMs = 2000): Promise<boolean> {
    return this.waitFor(() => this.source === 'live', timeoutMs);
  }

  private waitFor(done: () => boolean, timeoutMs: number): Promise<boolean> {
    if (done()) return Promise.resolve(true);
    return new Promise((resolve) => {
      const check = (): void => {
        if (done()) finish(true);
      };
      const finish = (result: boolean): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve(result);
      };
      const timer = setTimeout(() => finish(done()), timeoutMs);
      this.waiters.add(check);
    });
  }

  // -- the stream -------------------------------------------------------------------------------

  /** Opens the stream (once; without a URL and an agent there is nothing to open). */
  start(): this {
    if (this.running === undefined && this.url && this.agent) {
      this.stopped = false;
      this.running = this.run();
    }
    return this;
  }

  /** Ends the stream; resolves when it has ended. The local copy stays readable. */
  async close(): Promise<void> {
    this.stopped = true;
    this.request?.destroy();
    this.wake?.();
    await this.running;
    this.running = undefined;
  }

  private async run(): Promise<void> {
    let delay = 100;
    while (!this.stopped) {
      try {
        await this.stream();
        delay = 100;
      } catch (e) {
        if (!this.stopped) this.log.debug(`flag stream: ${(e as Error).message ?? e}`);
      }
      if (this.source === 'live') {
        this.source = 'cached'; // the server went away: keep serving the copy
        this.changed();
      }
      await this.sleep(delay);
      delay = Math.min(delay * 2, 2000);
    }
  }

  private sleep(ms: number): Promise<void> {
    if (this.stopped) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(done, ms);
      timer.unref();
      function done(): void {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    });
  }

  private stream(): Promise<void> {
    const target = new URL(
      `${this.url}/api/v1/agents/${encodeURIComponent(this.agent)}/flags/stream`,
    );
    const get = target.protocol === 'https:' ? https.get : http.get;
    const token = streamToken(this.apiKey, this.apiSecret);
    return new Promise<void>((resolve, reject) => {
      const req = get(target, {
        headers: { Authorization: `Bearer ${token}`, Accept: 'text/event-stream' },
        agent: false, // a connection of its own, unref'd below
        timeout: 5000, // a host that does not answer: retry soon
      });
      this.request = req;
      req.on('socket', (socket) => socket.unref());
      req.on('timeout', () => req.destroy(new Error('the server went silent')));
      req.on('error', reject);
      let refused = false;
      req.on('close', () => {
        this.request = undefined;
        if (!refused) resolve();
      });
      req.on('response', (res) => {
        if (res.statusCode !== 200) {
          refused = true; // wait 5 s before asking again, as a refusal will not pass by itself
          let body = '';
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => (body = (body + chunk).slice(0, 500)));
          res.on('end', () => {
            this.log.warn(`flag stream refused: ${res.statusCode} ${body}`);
            void this.sleep(5000).then(resolve);
          });
          res.on('error', reject);
          return;
        }
        req.setTimeout(30_000); // keepalives come every 15 s: silence means a dead link
        const lines = createInterface({ input: res, crlfDelay: Infinity });
        let data: string[] = [];
        lines.on('line', (line) => {
          if (line.startsWith('data:')) {
            data.push(line.slice(5).trim());
          } else if (line === '' && data.length > 0) {
            const text = data.join('\n');
            data = [];
            this.receive(text, req);
          }
        });
        lines.on('error', reject); // readline passes on the response's errors (a reset)
        res.on('error', reject);
      });
    });
  }

  private receive(text: string, req: http.ClientRequest): void {
    let flags: Map<string, Flag>;
    try {
      flags = toFlags((JSON.parse(text) as { flags?: unknown }).flags);
    } catch (e) {
      // Anything unexpected must not end the stream for good: the agent would keep stale flags.
      this.log.warn(`flag snapshot not understood (${(e as Error).message}); reconnecting`);
      req.destroy();
      return;
    }
    this.flags = flags;
    this.source = 'live';
    this.version += 1;
    this.writeCache();
    this.changed();
  }

  private changed(): void {
    for (const check of [...this.waiters]) check();
    try {
      this.emit('change', this.version, this.source);
    } catch (e) {
      // The listener's bug is the listener's: it must not stop the stream the agent relies on.
      this.log.warn(`a 'change' listener threw: ${(e as Error).stack ?? e}`);
    }
  }

  // -- the cache file ---------------------------------------------------------------------------

  private readCache(): void {
    let flags: Map<string, Flag>;
    try {
      const cache = JSON.parse(readFileSync(this.cachePath, 'utf8')) as { flags?: unknown };
      flags = toFlags(cache.flags);
    } catch {
      return; // no cache (or not one of ours): the environment, then the caller's default
    }
    this.flags = flags;
    this.source = 'cached';
    this.version = 1;
  }

  private writeCache(): void {
    // Written at once, in a few microseconds: a snapshot is a few kilobytes at most.
    const tmp = `${this.cachePath}.${process.pid}.tmp`;
    try {
      mkdirSync(dirname(this.cachePath), { recursive: true });
      const flags = [...this.flags.values()];
      writeFileSync(tmp, JSON.stringify({ flags, at: Date.now() / 1000 }));
      renameSync(tmp, this.cachePath); // readers never see half a file
    } catch (e) {
      this.log.debug(`flag cache not written: ${(e as Error).message}`);
    }
  }
}

function toFlags(list: unknown): Map<string, Flag> {
  if (!Array.isArray(list)) throw new Error('"flags" is not a list');
  const flags = new Map<string, Flag>();
  for (const flag of list as unknown[]) {
    const f = flag as Partial<Flag> | null;
    if (typeof f !== 'object' || f === null || typeof f.key !== 'string') {
      throw new Error('a flag without a key');
    }
    flags.set(f.key, f as Flag);
  }
  return flags;
}

let client: FlagsClient | undefined;

/** The process's client, started on first use (configured from the environment). */
export function flags(): FlagsClient {
  client ??= new FlagsClient().start();
  return client;
}
