/** One `msg` from the hub (§4 direct, §5 topic), as the Python SDK's `Message`. */
import { DecryptError } from "./errors.js";

export interface MessageInit {
  mid: string;
  sender: string;
  body: Uint8Array;
  ts: number;
  qos: number;
  topic?: string;
  seq?: number;
  sig?: Uint8Array;
  meta?: Record<string, string>;
  raw?: Uint8Array;
  verified?: boolean;
  enc?: string;
  error?: DecryptError;
}

const text = new TextDecoder();

export class Message {
  readonly mid: string;
  /** The sender's node id (`from`), or `$admin`. */
  readonly sender: string;
  /** Hub time (ms). */
  readonly ts: number;
  readonly qos: number;
  /** Set for a publication (§5). */
  readonly topic: string | undefined;
  readonly seq: number | undefined;
  readonly sig: Uint8Array | undefined;
  /** §4.1 headers (a copy). */
  readonly meta: Record<string, string>;
  /** The body bytes as on the wire (the ciphertext when encrypted). */
  readonly raw: Uint8Array;
  /** §12: true/false when a `sig` was checked against the sender's key; undefined otherwise. */
  readonly verified: boolean | undefined;
  /** §12 `meta.enc` (`"box"`, `"secretbox"`), when the body was encrypted. */
  readonly enc: string | undefined;
  #body: Uint8Array;
  #error: DecryptError | undefined;
  #acked: boolean;
  #acker: ((m: Message) => void) | undefined;

  constructor(init: MessageInit, acker?: (m: Message) => void) {
    this.mid = init.mid;
    this.sender = init.sender;
    this.#body = init.body;
    this.ts = init.ts;
    this.qos = init.qos;
    this.topic = init.topic;
    this.seq = init.seq;
    this.sig = init.sig;
    this.meta = { ...init.meta };
    this.raw = init.raw ?? init.body;
    this.verified = init.verified;
    this.enc = init.enc;
    this.#error = init.error;
    this.#acker = acker;
    this.#acked = init.qos !== 1 || acker === undefined;
  }

  /** The plaintext; throws `DecryptError` when an encrypted body could not be opened. */
  get body(): Uint8Array {
    if (this.#error) throw new DecryptError(this.#error.message);
    return this.#body;
  }

  /** The body as UTF-8 text. */
  get text(): string {
    return text.decode(this.body);
  }

  /** True when an encrypted body was opened. */
  get decrypted(): boolean {
    return this.enc !== undefined && this.#error === undefined;
  }

  /** §4.3: `meta.req` of a request. */
  get requestId(): string | undefined {
    return this.topic === undefined ? this.meta.req : undefined;
  }

  /** §4.3: `meta.re` of a reply. */
  get replyTo(): string | undefined {
    return this.topic === undefined ? this.meta.re : undefined;
  }

  /** True once acked (always for QoS 0). */
  get acked(): boolean {
    return this.#acked;
  }

  /** Ack this QoS 1 message (§4); nothing for QoS 0 or when already acked. */
  ack(): void {
    if (this.#acked) return;
    this.#acked = true;
    this.#acker?.(this);
  }
}
