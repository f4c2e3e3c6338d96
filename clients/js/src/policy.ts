/** Reconnect policy (protocol §9): which closes end the client, and how long to wait. */

/** Closes after which the client does not reconnect by itself (§9). */
export const NO_RECONNECT_CODES: ReadonlySet<number> = new Set([
  1002, // protocol error: a client bug, do not loop
  1003, // a text message was sent: a client bug
  1007, // undecodable msgpack: a client bug
  4001, // auth_failed / not_authenticated: same credentials would fail again
  4003, // forbidden: banned, or not registered (allowlist)
  4010, // replaced by a newer session of this node id
]);

/** Close codes of the hub's policy that repeat lead to a stop (§9: 4012 kicked, "stop if it repeats"). */
export const STOP_IF_REPEATED: ReadonlySet<number> = new Set([4012]);

/** Minimum wait after a close, by code (§9: 1008 rate abuse wants a long backoff). */
export const MIN_DELAY_MS: Readonly<Record<number, number>> = { 1008: 10_000 };

/**
 * Whether a close ends the client. `previous` is the close code of the session before,
 * when that one did not last (so a repeated 4012 stops).
 */
export function isFinalClose(code: number, previous?: number): boolean {
  if (NO_RECONNECT_CODES.has(code)) return true;
  return STOP_IF_REPEATED.has(code) && previous === code;
}

/**
 * Full jitter, as the Python SDK's `backoff_delay`: uniform between `minMs` and a cap
 * that doubles from `minMs` with every failed attempt (0, 1, 2, ...) up to `maxMs`.
 */
export function backoffDelay(attempt: number, minMs: number, maxMs: number, rng: () => number = Math.random): number {
  const cap = Math.min(maxMs, minMs * 2 ** Math.min(attempt, 64));
  const hi = Math.max(minMs, cap);
  return minMs + (hi - minMs) * rng();
}

/** The delay before the next attempt: backoff, at least a `bye`'s `retry_ms` (§7) and the code's minimum. */
export function reconnectDelay(attempt: number, minMs: number, maxMs: number, code: number, retryMs?: number, rng?: () => number): number {
  return Math.max(backoffDelay(attempt, minMs, maxMs, rng), retryMs ?? 0, MIN_DELAY_MS[code] ?? 0);
}
