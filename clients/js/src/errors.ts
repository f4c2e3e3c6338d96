/**
 * The exception tree, named as the Python SDK's (`openred.client.errors`):
 *
 * ```
 * ClientError                base
 * ├── ConnectError           no session could be opened (refused, HTTP 403/429/503, broken handshake)
 * │   ├── ConnectTimeout     no session within `connectTimeoutMs`
 * │   └── AuthError          the hub refused the hello (§2.5): `code`, `closeCode`; never retried
 * ├── ConnectionLost         the session ended under a call (`code`, `reason`, `final`)
 * ├── HubError               an `error` reply to one request (§3, §8): `code`, `msg`
 * ├── RequestTimeout         no reply in time
 * ├── RemoteError            a §4.3 reply carried `meta.err`
 * ├── SubscriptionError      the hub refused a topic held (§5): `topic`, `code`
 * ├── OutboxFull             the QoS 1 outbox holds `outboxMax` messages already
 * ├── OutboxError            the outbox file (or IndexedDB entry) cannot be read or written
 * └── CryptoError            §12: no key for a peer, or a key of the wrong size
 *     └── DecryptError       a body that cannot be opened (wrong key, tampered)
 * ```
 */

export class ClientError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
  }
  // Explicit, so that minified bundles keep the names.
  override name = "ClientError";
}

export class ConnectError extends ClientError {
  override name = "ConnectError";
}

export class ConnectTimeout extends ConnectError {
  override name = "ConnectTimeout";
}

export class AuthError extends ConnectError {
  override name = "AuthError";
  readonly code: string;
  readonly closeCode: number;
  readonly reason: string;
  constructor(code: string, closeCode: number, reason = "") {
    super(`${code} (close ${closeCode})${reason ? `: ${reason}` : ""}`);
    this.code = code;
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

export class ConnectionLost extends ClientError {
  override name = "ConnectionLost";
  readonly code: number;
  readonly reason: string;
  readonly final: boolean;
  constructor(code: number, reason = "", final = false) {
    super(`connection lost (${code}${reason ? `: ${reason}` : ""})`);
    this.code = code;
    this.reason = reason;
    this.final = final;
  }
}

export class HubError extends ClientError {
  override name = "HubError";
  readonly code: string;
  readonly msg: string;
  constructor(code: string, msg = "") {
    super(msg ? `${code}: ${msg}` : code);
    this.code = code;
    this.msg = msg;
  }
}

export class RequestTimeout extends ClientError {
  override name = "RequestTimeout";
}

export class RemoteError extends ClientError {
  override name = "RemoteError";
  readonly err: string;
  readonly reply: unknown;
  constructor(err: string, reply?: unknown) {
    super(`remote error: ${err}`);
    this.err = err;
    this.reply = reply;
  }
}

export class SubscriptionError extends ClientError {
  override name = "SubscriptionError";
  readonly topic: string;
  readonly code: string;
  constructor(topic: string, code: string) {
    super(`subscription to ${topic} refused: ${code}`);
    this.topic = topic;
    this.code = code;
  }
}

export class OutboxFull extends ClientError {
  override name = "OutboxFull";
}

export class OutboxError extends ClientError {
  override name = "OutboxError";
}

export class CryptoError extends ClientError {
  override name = "CryptoError";
}

export class DecryptError extends CryptoError {
  override name = "DecryptError";
}
