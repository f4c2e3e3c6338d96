/**
 * Typed events, as the Python SDK's (`openred.client.events`); `type` tells them apart.
 * They reach listeners through `client.on(type, fn)`; `state` gets the three state
 * events, `event` every one.
 */

/** A session is open (§2 `welcome`): topics are held again and the outbox resent. */
export interface Connected {
  type: "connected";
  session: string;
  pending: number;
  node: string;
}

/**
 * A session ended, or an attempt to open one failed (`code` 1006 for a drop). With
 * `willRetry` the client makes attempt number `attempt` after `delayMs`; else `closed` follows.
 */
export interface Disconnected {
  type: "disconnected";
  code: number;
  reason: string;
  willRetry: boolean;
  attempt: number;
  delayMs: number;
  /** A `bye`'s `retry_ms` (§7), when the hub sent one. */
  retryMs?: number;
}

/** The client stopped for good: `close()`, a close code after which §9 says not to reconnect. */
export interface Closed {
  type: "closed";
  code: number;
  reason: string;
}

export type StateEvent = Connected | Disconnected | Closed;

/** §5: history no longer held publications `fromSeq..toSeq` of `topic` after a reconnect. */
export interface TopicGap {
  type: "gap";
  topic: string;
  fromSeq: number;
  toSeq: number;
}

/** The hub refused a topic held by the client when subscribing it again (§5). */
export interface SubscriptionRefused {
  type: "subscriptionRefused";
  topic: string;
  code: string;
}

/**
 * §6.1: `node` came online or went offline (`topic` undefined), or subscribed to or left
 * `topic`. `snapshot`: found by comparing a `watch` snapshot after a reconnect.
 */
export interface PresenceChanged {
  type: "presence";
  node: string;
  online: boolean;
  ts: number;
  topic?: string;
  snapshot: boolean;
}

/** §4: the recipient acked a QoS 1 message sent with `receipt: true`. */
export interface Receipt {
  type: "receipt";
  mid: string;
  to: string;
  ts: number;
}

export type Event = StateEvent | TopicGap | SubscriptionRefused | PresenceChanged | Receipt;
