/** The fallback when the server has never been reached: `VOICEFLEET_FLAG_<KEY>` variables. */

/** `new_voice` -> `VOICEFLEET_FLAG_NEW_VOICE`: the key upper-cased, anything not a letter or a
 * digit made `_`. */
export function envName(key: string): string {
  return 'VOICEFLEET_FLAG_' + key.replace(/[^A-Za-z0-9]/g, '_').toUpperCase();
}

/** The flag's variable, as JSON (`true`, `12`, `"x"`), else as the text; else `fallback`. */
export function envValue(key: string, fallback?: unknown): unknown {
  const raw = process.env[envName(key)];
  if (raw === undefined) return fallback;
  try {
    return JSON.parse(raw) as unknown;
  } catch {
    return raw;
  }
}
