// Bearer-token check. Both sides are hashed first so timingSafeEqual always compares equal
// lengths and the comparison time says nothing about the key's length or contents.

import { createHash, timingSafeEqual } from 'node:crypto';
import { ApiError } from './errors.js';

/** Paths that stay open without a key: liveness probes and Prometheus scrapes. */
export const openPaths = new Set(['/health', '/metrics']);

const digest = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

export function makeAuthCheck(apiKey: string): (authorization: string | undefined) => void {
  const expected = digest(apiKey);
  return (authorization) => {
    const m = /^Bearer[ \t]+(.+)$/i.exec(authorization ?? '');
    const given = digest(m ? m[1]!.trim() : '');
    if (!m || !timingSafeEqual(given, expected)) {
      throw new ApiError(401, 'authentication_error',
        m ? 'Incorrect API key provided.' : "Missing API key: send it as 'Authorization: Bearer <key>'.",
        null, 'invalid_api_key', { 'www-authenticate': 'Bearer' });
    }
  };
}
