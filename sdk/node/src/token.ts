import { createHmac } from 'node:crypto';

/** An HS256 JWT for the flag stream, as the Python SDK signs it: issued by the instance's key
 * (LIVEKIT_API_KEY), with the agent admin grant, which the project's key needs (a worker started
 * by hand) and an instance's own key does without. */
export function streamToken(apiKey: string, apiSecret: string, ttl = 3600): string {
  const b64 = (data: string | Buffer): string => Buffer.from(data).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  const header = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const claims = {
    iss: apiKey,
    sub: 'voicefleet-flags',
    nbf: now - 5,
    exp: now + ttl,
    agent: { admin: true },
  };
  const body = b64(JSON.stringify(claims));
  const signature = createHmac('sha256', apiSecret).update(`${header}.${body}`).digest();
  return `${header}.${body}.${b64(signature)}`;
}
