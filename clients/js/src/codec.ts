/** Wire encoding (protocol §1) and the byte strings that get signed (§2.2, §4, §5.1). */
import { decode, encode } from "@msgpack/msgpack";

/** A frame: a msgpack map with a `str` key `t`. */
export type Frame = { t: string; [key: string]: unknown };

const utf8 = new TextEncoder();

/** One msgpack value: a frame, or a batch (array) of frames. Undefined fields are left out. */
export function encodeFrame(frame: Frame | Frame[]): Uint8Array {
  return encode(frame, { ignoreUndefined: true });
}

/**
 * Decode one WebSocket message from the hub into its frames: a single map or a batch
 * (§1). Throws on anything that is not exactly one msgpack value.
 */
export function decodeFrames(data: ArrayBuffer | Uint8Array): Frame[] {
  const value = decode(data instanceof Uint8Array ? data : new Uint8Array(data));
  const list = Array.isArray(value) ? value : [value];
  return list.filter(
    (f): f is Frame => typeof f === "object" && f !== null && typeof (f as Frame).t === "string",
  );
}

/** One kept QoS 1 send: the fields of the Python SDK's outbox records (wire bytes). */
export interface OutboxRecord {
  cid: string;
  to: string;
  body: Uint8Array;
  ttl: number | null;
  sig: Uint8Array | null;
  receipt: boolean;
  meta: Record<string, string> | null;
  created_ms: number;
}

/**
 * Where an outbox is kept between runs: a journal file on Node.js (the Python SDK's
 * format), IndexedDB in a browser. Calls come one at a time, in order.
 */
export interface OutboxStorage {
  /** The entries kept, in the order they were added. */
  load(): Promise<OutboxRecord[]>;
  add(rec: OutboxRecord): Promise<void>;
  remove(cid: string): Promise<void>;
}

export function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

const ZERO = Uint8Array.of(0);

function signed(context: string, name: string, data: Uint8Array): Uint8Array {
  return concatBytes(utf8.encode(context), ZERO, utf8.encode(name), ZERO, data);
}

/** §2.2: the bytes a `hello` signs: `openred-hub/v1/auth`, 0, hub id, 0, nonce. */
export const authMessage = (hub: string, nonce: Uint8Array): Uint8Array =>
  signed("openred-hub/v1/auth", hub, nonce);

/** §4 / §12: what `send.sig` signs: `openred-hub/v1/body`, 0, recipient id, 0, body. */
export const bodySigMessage = (to: string, body: Uint8Array): Uint8Array =>
  signed("openred-hub/v1/body", to, body);

/** §5.1 / §12: what `pub.sig` signs: `openred-hub/v1/topic`, 0, topic, 0, body. */
export const topicSigMessage = (topic: string, body: Uint8Array): Uint8Array =>
  signed("openred-hub/v1/topic", topic, body);

const NODE_ID = /^[A-Za-z0-9._:-]{1,128}$/;
const TOPIC = /^[A-Za-z0-9._:/-]{1,200}$/;
const KEY_ID = /^[0-9a-f]{64}$/;

/** §2.1: 1..128 characters of `[A-Za-z0-9._:-]`. */
export const isNodeId = (s: unknown): s is string => typeof s === "string" && NODE_ID.test(s);
/** §10: 1..200 characters of `[A-Za-z0-9._:/-]`. */
export const isTopic = (s: unknown): s is string => typeof s === "string" && TOPIC.test(s);

export function toHex(b: Uint8Array): string {
  let s = "";
  for (const x of b) s += x.toString(16).padStart(2, "0");
  return s;
}

export function fromHex(hex: string): Uint8Array {
  if (hex.length % 2 || /[^0-9a-fA-F]/.test(hex)) throw new TypeError("not hex");
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
  return out;
}

/** The Ed25519 public key a key-authenticated node id names (§2.1, §12), if it is one. */
export function publicKeyOf(nodeId: string): Uint8Array | undefined {
  return KEY_ID.test(nodeId) ? fromHex(nodeId) : undefined;
}

export const bytes = (b: unknown): Uint8Array | undefined => (b instanceof Uint8Array ? b : undefined);
export const str = (s: unknown): string | undefined => (typeof s === "string" ? s : undefined);
export const num = (n: unknown): number | undefined =>
  typeof n === "number" ? n : typeof n === "bigint" ? Number(n) : undefined;
