/**
 * `Client`: one node's session with the hub, the TypeScript counterpart of the Python
 * SDK's `openred.client.Client` (same capabilities and names, in camelCase).
 *
 * Behaviour, by docs/protocol.md section:
 *
 * - §2 / §9: `connect()` retries (unless `reconnect: false`) until a session opens or
 *   `connectTimeoutMs` passes; a refused hello (`AuthError`) is never retried. After a
 *   session, closes 4001, 4003, 4010 (and 1002, 1003, 1007: client bugs) end the client,
 *   4012 ends it when it repeats; every other close and a drop reconnect with jittered
 *   exponential backoff, at least a `bye`'s `retry_ms`. Each step is a typed event.
 * - §3: requests carry an incrementing int `id`; replies are matched by `id`.
 * - §4 / §4.2: a QoS 1 `send` goes through the outbox: it carries a `cid`, stays until
 *   the hub's `ok` (or a refusal), and is written again with the same `cid` on every new
 *   connection, so the hub stores it once. Received repeats are dropped by `mid` and
 *   acked again.
 * - §4: QoS 1 messages are acked by `msg.ack()` or, with `autoAck`, once a `message`
 *   listener returned, or when the iterator that handed it out is asked for the next.
 * - §4.3: `request()` / `reply()` / `onRequest`, correlated by `meta.req` / `meta.re`.
 * - §5: `subscribe()` returns a `Subscription`; after a reconnect every topic is held
 *   again with `since` = the last `seq` handled, repeats are dropped, `recovered: false`
 *   is a `TopicGap`, a refusal a `SubscriptionRefused`. §5.2 `history()`. §6 `presence()`,
 *   §6.1 `watch()` (renewed after every reconnect).
 * - §7: the hub is taken for gone after 3 × `hb` s without a sign of life (browsers do
 *   not show pings: after `hb` s of silence the client asks a `presence` of itself).
 * - §12: `sign`, `encrypt`, `keys`, `groupKeys`.
 */
import { authMessage, bodySigMessage, bytes, decodeFrames, encodeFrame, isNodeId, isTopic, num, publicKeyOf, str, toHex, topicSigMessage } from "./codec.js";
import type { Frame } from "./codec.js";
import { GroupKeys, Identity, randomBytes, secretboxOpen, secretboxSeal, verifySignature } from "./crypto.js";
import {
  AuthError, ClientError, ConnectError, ConnectTimeout, ConnectionLost, CryptoError, DecryptError, HubError,
  OutboxError, OutboxFull, RemoteError, RequestTimeout, SubscriptionError,
} from "./errors.js";
import type { Closed, Connected, Disconnected, Event, PresenceChanged, Receipt, StateEvent, SubscriptionRefused, TopicGap } from "./events.js";
import { Message } from "./message.js";
import { isFinalClose, reconnectDelay } from "./policy.js";
import { PresenceWatch, Stream, Subscription } from "./streams.js";
import type { History } from "./streams.js";
import { outboxStorage, webSocketImpl } from "#platform";
import type { OutboxRecord, OutboxStorage } from "./codec.js";

/** The part of the WebSocket API the client uses (browsers' WebSocket, Node's, or `ws`). */
export interface WebSocketLike {
  binaryType: string;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: string, listener: (ev: any) => void): void;
  /** `ws` only: its ping events count as signs of life (§7). */
  on?(event: string, listener: (...args: any[]) => void): unknown;
  terminate?(): void;
}
export type WebSocketCtor = new (url: string) => WebSocketLike;

/** The hub's `welcome` (§10). */
export interface Welcome {
  node: string;
  session: string;
  hb: number;
  pending: number;
  limits: Record<string, number>;
}

export type State = "idle" | "connecting" | "connected" | "reconnecting" | "closed";

export interface ClientEvents {
  /** Every delivered message, direct and topic (while listened to, streams get none). */
  message: Message;
  connected: Connected;
  disconnected: Disconnected;
  closed: Closed;
  /** `connected`, `disconnected` and `closed`. */
  state: StateEvent;
  gap: TopicGap;
  subscriptionRefused: SubscriptionRefused;
  /** §6.1 events (while listened to, `PresenceWatch` streams get none). */
  presence: PresenceChanged;
  receipt: Receipt;
  /** Every typed event above but `message`. */
  event: Event;
  /** An `error` that answers no call: a nil `id` (§3), or a refused outbox message nobody awaits. */
  error: HubError;
}

export type RequestHandler = (msg: Message) => Uint8Array | string | Promise<Uint8Array | string>;

export interface ClientOptions {
  /** Key authentication (§2.2); with `token`, the identity only signs and opens (§12). */
  identity?: Identity;
  /** Token authentication (§2.4): a JWT, or a function giving one for each connection. */
  token?: string | (() => string | Promise<string>);
  /** Ask the hub to batch frames (§1). */
  batch?: boolean;
  /** `hello.meta` (§10): JSON-representable, at most 4 KiB. */
  meta?: Record<string, unknown>;
  autoAck?: boolean;
  reconnect?: boolean;
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /** `connect()` and calls wait at most this long for a session. */
  connectTimeoutMs?: number;
  /** One attempt (upgrade + handshake) may take this long. */
  openTimeoutMs?: number;
  requestTimeoutMs?: number;
  /** How many recent direct mids are remembered to drop repeats (§4). */
  recentMids?: number;
  /**
   * Received messages waiting to be read, per queue (the client's, each subscription).
   * A page cannot pause its WebSocket, so past it the oldest is dropped; a dropped QoS 1
   * message is not acked and comes again at the next session. Default 10,000.
   */
  maxQueue?: number;
  /** At most this many unconfirmed QoS 1 sends (`OutboxFull` past it). */
  outboxMax?: number;
  /**
   * Keep the QoS 1 outbox across restarts: Node.js, a file (written atomically, mode
   * 0600, the Python SDK's format); a browser, an entry of that name in IndexedDB.
   * Sends not confirmed when the program stopped go again, same `cid`, on `connect()`.
   */
  outboxFile?: string;
  /** Sign every `send` / `pub` (§12) unless a call says otherwise. */
  sign?: boolean;
  /** Encrypt every `send` (§12 box) unless a call says otherwise. */
  encrypt?: boolean;
  /** Public keys of nodes whose id is not their key (token nodes, §12), by node id. */
  keys?: Record<string, Uint8Array>;
  groupKeys?: GroupKeys;
  onRequest?: RequestHandler;
  /** A WebSocket constructor; default the global one, else the `ws` package (Node.js 20). */
  WebSocket?: WebSocketCtor;
}

export interface SendOptions {
  qos?: 0 | 1;
  ttl?: number;
  /** Ask for a `receipt` event when the recipient acks (QoS 1). */
  receipt?: boolean;
  /** QoS 1: the client message id (§4.2); default a fresh one. */
  cid?: string;
  meta?: Record<string, string>;
  sign?: boolean;
  encrypt?: boolean;
  /** How long to wait for the hub's `ok`; a QoS 1 message stays in the outbox after it. */
  timeoutMs?: number;
}

export interface PublishOptions {
  meta?: Record<string, string>;
  sign?: boolean;
  /** Default: encrypted when `groupKeys` has a key for the topic; `true` without one throws. */
  encrypt?: boolean;
  timeoutMs?: number;
}

export interface RequestOptions {
  qos?: 0 | 1;
  meta?: Record<string, string>;
  sign?: boolean;
  encrypt?: boolean;
  timeoutMs?: number;
}

export interface ReplyOptions {
  /** Reply with `meta.err`: the requester's `request()` rejects with `RemoteError`. */
  error?: string;
  meta?: Record<string, string>;
  sign?: boolean;
  encrypt?: boolean;
}

interface Pending {
  resolve(reply: Frame): void;
  reject(err: Error): void;
  onOk?: (reply: Frame) => void;
  /** An outbox entry: kept (not failed) when the connection drops. */
  entry?: OutboxEntry;
}

interface OutboxEntry {
  cid: string;
  createdMs: number;
  frame: Frame;
  waiters: { resolve(mid: string): void; reject(err: Error): void }[];
  inflight: boolean;
  retries: number;
}

interface Conn {
  ws: WebSocketLike;
  phase: "challenge" | "hello" | "open";
  welcome?: Welcome;
  pending: Map<number, Pending>;
  chain: Promise<void>;
  dead: boolean;
  lastRx: number;
  probeAt: number;
  opened: number;
  retryMs?: number;
  bye?: string;
  hsError?: { code: string; msg: string };
  timer?: ReturnType<typeof setInterval>;
  maxBody: number;
  maxFrame: number;
  onWelcome?: () => void;
}

const WINDOW = 2048; // §5: how far below the highest seq repeats are tracked

class TopicState {
  last: number;
  seen = new Set<number>();
  sub: Subscription;
  gapFrom: number | undefined;
  gapTo = 0;
  gapTimer: ReturnType<typeof setTimeout> | undefined;
  constructor(last: number, sub: Subscription) {
    this.last = last;
    this.sub = sub;
  }
  isNew(s: number): boolean {
    return !(this.seen.has(s) || s <= this.last - WINDOW);
  }
  mark(s: number): void {
    this.seen.add(s);
    this.last = Math.max(this.last, s);
    if (this.seen.size > 2 * WINDOW) for (const x of this.seen) if (x <= this.last - WINDOW) this.seen.delete(x);
  }
}

const RETRY_CODES = new Set(["unavailable", "internal", "rate_limited"]);
const SESSION_STABLE_MS = 60_000;
const KICK_REPEAT_MS = 60_000; // §9: a kick (4012) within this long of the last one ends the client
const GAP_WAIT_MS = 500;
const RESUB_ROUNDS = 4;
const MAX_REQUEST_HANDLERS = 64;
const utf8 = new TextEncoder();
const asBytes = (b: Uint8Array | string): Uint8Array => (typeof b === "string" ? utf8.encode(b) : b);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function strMap(v: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (v && typeof v === "object" && !Array.isArray(v) && !(v instanceof Uint8Array)) {
    for (const [k, x] of Object.entries(v)) if (typeof x === "string") out[k] = x;
  }
  return out;
}

function checkTopic(topic: string): void {
  if (!isTopic(topic)) throw new TypeError("topic: not 1..200 chars of [A-Za-z0-9._:/-]");
}

function checkNode(to: string): void {
  if (!isNodeId(to)) throw new TypeError("to: not a node id");
}

function onlineOf(reply: Frame): Record<string, boolean> {
  const out: Record<string, boolean> = {};
  const online = reply.online;
  if (online && typeof online === "object") for (const [k, v] of Object.entries(online)) out[k] = v === true;
  return out;
}

/** Throws unless `meta` keeps the §4.1 bounds. */
export function checkMeta(meta: Record<string, string>): Record<string, string> {
  const entries = Object.entries(meta);
  if (entries.length > 16) throw new RangeError("meta: at most 16 entries");
  for (const [k, v] of entries) {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(k)) throw new RangeError(`meta: bad key ${JSON.stringify(k)}`);
    if (typeof v !== "string" || v.length > 512) throw new RangeError(`meta: ${k}: a str of at most 512 chars`);
  }
  if (entries.length && encodeFrame(meta as unknown as Frame).length > 1024) throw new RangeError("meta: over 1024 bytes encoded");
  return meta;
}

/**
 * A node's connection to the hub.
 *
 * ```ts
 * const node = new Client("ws://127.0.0.1:8765/v1/ws", { identity: await Identity.generate() });
 * await node.connect();
 * node.on("message", (m) => console.log(m.sender, m.text));
 * await node.subscribe("room/1");
 * ```
 */
export class Client implements AsyncIterable<Message> {
  readonly url: string;
  readonly identity: Identity | undefined;
  /** §12: public keys of token nodes, by node id. */
  readonly keys: Record<string, Uint8Array>;
  readonly groupKeys: GroupKeys;
  #o: Required<Pick<ClientOptions, "autoAck" | "reconnect" | "backoffMinMs" | "backoffMaxMs" | "connectTimeoutMs" | "openTimeoutMs" | "requestTimeoutMs" | "recentMids" | "maxQueue" | "outboxMax" | "sign" | "encrypt">> & ClientOptions;
  #state: State = "idle";
  #conn: Conn | null = null; // open, welcomed, resumed: where requests go
  #live: Conn | null = null; // open and welcomed (maybe still resuming): where acks go
  #welcome: Welcome | null = null;
  #closed = false;
  #final: ConnectionLost | null = null;
  #ids = 0;
  #waiters: { resolve(c: Conn): void; reject(e: Error): void }[] = [];
  #outbox = new Map<string, OutboxEntry>();
  #outboxDrained: (() => void)[] = [];
  #topics = new Map<string, TopicState>();
  #watches: PresenceWatch[] = [];
  #recent = new Map<string, true>();
  #unacked = new Set<string>();
  #replies = new Map<string, { from: string; resolve(m: Message): void }>();
  #handler: RequestHandler | null;
  #listeners = new Map<string, Set<(ev: any) => unknown>>();
  #deliveries: Message[] = [];
  #handling = 0;
  #order: Promise<unknown> = Promise.resolve();
  #outboxStore: OutboxStorage | undefined;
  #journaled: Promise<void> = Promise.resolve();
  #delivering = false;
  #inbox: Stream<Message>;
  #attempt = 0;
  #lastKick = -Infinity;
  #reconnectTimer: ReturnType<typeof setTimeout> | null = null;

  constructor(url = "ws://127.0.0.1:8765/v1/ws", opts: ClientOptions = {}) {
    if (opts.identity === undefined && opts.token === undefined) throw new TypeError("give identity or token");
    if ((opts.sign || opts.encrypt) && !opts.identity) throw new TypeError("sign / encrypt: need an identity");
    this.url = url;
    this.identity = opts.identity;
    this.#o = {
      autoAck: true,
      reconnect: true,
      backoffMinMs: 200,
      backoffMaxMs: 30_000,
      connectTimeoutMs: 30_000,
      openTimeoutMs: 10_000,
      requestTimeoutMs: 10_000,
      recentMids: 10_000,
      maxQueue: 10_000,
      outboxMax: 10_000,
      sign: false,
      encrypt: false,
      ...opts,
    };
    if (!(this.#o.backoffMinMs > 0 && this.#o.backoffMinMs <= this.#o.backoffMaxMs)) {
      throw new RangeError("backoffMinMs: must be > 0 and <= backoffMaxMs");
    }
    this.keys = { ...opts.keys };
    this.groupKeys = opts.groupKeys ?? new GroupKeys();
    this.#handler = opts.onRequest ?? null;
    if (opts.outboxFile !== undefined) this.#outboxStore = outboxStorage(opts.outboxFile);
    this.#inbox = new Stream(this.#o.maxQueue);
    this.#inbox.onTake = (m) => this.#autoAck(m);
    this.#inbox.onDrop = (m) => {
      // not acked: forgotten, so that its redelivery is taken again
      this.#unacked.delete(m.mid);
      this.#recent.delete(m.mid);
    };
  }

  // -- state ------------------------------------------------------------------------

  get state(): State {
    return this.#state;
  }
  get connected(): boolean {
    return this.#conn !== null;
  }
  /** The `welcome` of the current (or last) session. */
  get welcome(): Welcome | null {
    return this.#welcome;
  }
  get nodeId(): string | undefined {
    return this.#welcome?.node ?? this.identity?.nodeId;
  }
  get session(): string | undefined {
    return this.#welcome?.session;
  }
  /** Topics held, each with the last `seq` handled (§5). */
  get subscriptions(): Record<string, number> {
    return Object.fromEntries([...this.#topics].map(([t, s]) => [t, s.last]));
  }
  /** QoS 1 sends not yet confirmed by the hub. */
  get outboxSize(): number {
    return this.#outbox.size;
  }

  /** Listen to an event; returns a function that removes the listener. */
  on<K extends keyof ClientEvents>(type: K, listener: (ev: ClientEvents[K]) => unknown): () => void {
    let set = this.#listeners.get(type);
    if (!set) this.#listeners.set(type, (set = new Set()));
    set.add(listener);
    return () => void set.delete(listener);
  }

  #listening(type: keyof ClientEvents): boolean {
    return (this.#listeners.get(type)?.size ?? 0) > 0;
  }

  #fire(type: string, ev: unknown): void {
    for (const fn of [...(this.#listeners.get(type) ?? [])]) {
      try {
        const r = fn(ev);
        if (r instanceof Promise) r.catch(() => undefined);
      } catch {
        // a listener's failure is its own
      }
    }
  }

  #emit(ev: Event): void {
    this.#fire(ev.type, ev);
    if (ev.type === "connected" || ev.type === "disconnected" || ev.type === "closed") this.#fire("state", ev);
    this.#fire("event", ev);
  }

  // -- lifecycle --------------------------------------------------------------------

  /**
   * Open the first session. Retries with backoff (unless `reconnect: false`) until one
   * opens or `connectTimeoutMs` passes (`ConnectTimeout`); rejects at once with
   * `AuthError` when the hub refuses the hello.
   */
  async connect(): Promise<void> {
    if (this.#state !== "idle") throw new ClientError("connect() was already called on this client");
    this.#state = "connecting";
    try {
      await this.#loadOutbox();
    } catch (e) {
      this.#state = "idle";
      throw e;
    }
    const end = Date.now() + this.#o.connectTimeoutMs;
    for (let attempt = 0; ; attempt++) {
      let error: Error;
      try {
        const conn = await this.#open();
        await this.#resume(conn);
        return;
      } catch (e) {
        error = e as Error;
      }
      if (this.#closed) throw this.#final ?? new ConnectionLost(1000, "closed by client", true);
      const code = error instanceof ConnectionLost ? error.code : 1006;
      const delay = reconnectDelay(attempt, this.#o.backoffMinMs, this.#o.backoffMaxMs, code);
      const retry = !(error instanceof AuthError) && this.#o.reconnect && !isFinalClose(code) && Date.now() + delay < end;
      this.#emit({ type: "disconnected", code, reason: error.message, willRetry: retry, attempt: attempt + 1, delayMs: retry ? delay : 0 });
      if (!retry) {
        const out = error instanceof AuthError ? error
          : this.#o.reconnect && !isFinalClose(code) ? new ConnectTimeout(`no session within ${this.#o.connectTimeoutMs} ms`, { cause: error })
          : error instanceof ConnectError ? error : new ConnectError(error.message, { cause: error });
        this.#finish(new ConnectionLost(code, error.message, true));
        throw out;
      }
      await sleep(delay);
    }
  }

  /** Until a session is open (`ConnectTimeout` after `timeoutMs`). */
  async waitConnected(timeoutMs = this.#o.connectTimeoutMs): Promise<void> {
    await this.#readyConn(timeoutMs);
  }

  /** Close with 1000; calls in flight and unconfirmed QoS 1 sends fail with a final `ConnectionLost`. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#reconnectTimer) clearTimeout(this.#reconnectTimer);
    const conn = this.#conn ?? this.#live;
    if (conn) {
      try {
        conn.ws.close(1000, "bye");
      } catch {
        // already closing
      }
      this.#down(conn, 1000, "closed by client");
    }
    this.#finish(new ConnectionLost(1000, "closed by client", true));
  }

  // -- direct messages (§4) ---------------------------------------------------------

  /**
   * Send a direct message (§4); resolves with its `mid`. QoS 0 resolves once the hub
   * routed it (`HubError` `no_route` when `to` is offline). QoS 1 goes through the
   * outbox with `cid` and resolves once the hub stored it; across a reconnect it is sent
   * again with the same `cid`, so it is delivered once. A timeout leaves it in the outbox.
   */
  async send(to: string, body: Uint8Array | string, opts: SendOptions = {}): Promise<string> {
    checkNode(to);
    const qos = opts.qos ?? 0;
    if (qos !== 0 && qos !== 1) throw new TypeError("qos: must be 0 or 1");
    if (opts.cid !== undefined && !/^[\x21-\x7e]{1,64}$/.test(opts.cid)) throw new RangeError("cid: 1..64 printable ASCII chars");
    const [sent] = await this.#inOrder(async () => {
      const frame = await this.#sendFrame(to, body, opts);
      frame.qos = qos;
      if (opts.receipt && qos === 1) frame.receipt = true;
      if (qos === 0) return [this.#request(frame, { timeoutMs: opts.timeoutMs }).then((r) => str(r.mid) ?? "")] as const;
      frame.cid = opts.cid ?? toHex(randomBytes(12));
      return this.#viaOutbox(frame, opts.timeoutMs);
    });
    return sent;
  }

  /**
   * Frames leave in the order of the calls that made them, also when signing or
   * encrypting (asynchronous with WebCrypto) makes one call take longer than the next.
   * `fn` resolves once its frame is written (or queued); the reply is awaited outside.
   */
  #inOrder<T>(fn: () => Promise<T>): Promise<T> {
    const r = this.#order.then(fn);
    this.#order = r.catch(() => undefined);
    return r;
  }

  async #sendFrame(to: string, body: Uint8Array | string, opts: { meta?: Record<string, string>; encrypt?: boolean; sign?: boolean; ttl?: number }): Promise<Frame> {
    const meta = { ...opts.meta };
    let wire = asBytes(body);
    if (opts.encrypt ?? this.#o.encrypt) {
      wire = await this.#needIdentity("encrypt").boxSeal(this.#keyOf(to), wire);
      meta.enc = "box";
    }
    checkMeta(meta);
    const frame: Frame = { t: "send", to, body: wire };
    if (opts.ttl !== undefined) frame.ttl = opts.ttl;
    if (opts.sign ?? this.#o.sign) frame.sig = await this.#needIdentity("sign").sign(bodySigMessage(to, wire));
    if (Object.keys(meta).length) frame.meta = meta;
    return frame;
  }

  /**
   * Write a QoS 0 message without an `id` (§3): no reply, no `no_route`; an error about
   * it reaches `error` listeners. Rejects with `ConnectionLost` when not connected.
   */
  async sendNowait(to: string, body: Uint8Array | string, opts: Omit<SendOptions, "qos" | "receipt" | "cid" | "timeoutMs"> = {}): Promise<void> {
    checkNode(to);
    await this.#inOrder(async () => {
      const frame = await this.#sendFrame(to, body, opts);
      const conn = this.#conn;
      if (!conn || conn.dead) throw this.#final ?? new ConnectionLost(1006, "not connected");
      this.#write(conn, this.#encodeChecked(conn, frame));
    });
  }

  /** Until every QoS 1 send in the outbox is confirmed by the hub (§4.2). */
  async flush(timeoutMs?: number): Promise<void> {
    if (this.#outbox.size) {
      if (this.#final) throw this.#final;
      await new Promise<void>((resolve, reject) => {
        const timer = timeoutMs === undefined ? undefined : setTimeout(() => reject(new RequestTimeout(`outbox not confirmed within ${timeoutMs} ms`)), timeoutMs);
        this.#outboxDrained.push(() => {
          clearTimeout(timer);
          if (this.#outbox.size && this.#final) reject(this.#final);
          else resolve();
        });
      });
    }
    await this.#journaled; // and the kept outbox says so
  }

  /** Ack a QoS 1 message (§4). Best effort: offline, the hub's redelivery is acked instead. */
  ack(msg: Message | string): void {
    if (typeof msg !== "string") {
      msg.ack(); // marks it, and comes back here with the mid (nothing for QoS 0)
      return;
    }
    const mid = msg;
    this.#unacked.delete(mid);
    const conn = this.#live;
    if (conn && !conn.dead) this.#write(conn, encodeFrame({ t: "ack", mid }));
  }

  #autoAck(m: Message): void {
    if (this.#o.autoAck && !m.acked) m.ack();
  }

  /** Direct messages not taken by a `message` listener (or a request handler), in order. */
  [Symbol.asyncIterator](): AsyncIterator<Message> {
    return this.#inbox[Symbol.asyncIterator]();
  }

  // -- request and reply (§4.3) -----------------------------------------------------

  /**
   * Send a request (`meta.req`) and resolve with the reply. Rejects with `RemoteError`
   * when the responder replied `meta.err`, `RequestTimeout` without a reply in time,
   * `HubError` when the hub refused the request (`no_route` at QoS 0).
   */
  async request(to: string, body: Uint8Array | string, opts: RequestOptions = {}): Promise<Message> {
    const req = toHex(randomBytes(12));
    const timeoutMs = opts.timeoutMs ?? this.#o.requestTimeoutMs;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const reply = new Promise<Message>((resolve, reject) => {
      this.#replies.set(req, { from: to, resolve });
      timer = setTimeout(() => reject(new RequestTimeout(`no reply within ${timeoutMs} ms`)), timeoutMs);
    });
    reply.catch(() => undefined);
    try {
      await Promise.race([this.send(to, body, { ...opts, meta: { ...opts.meta, req } }), reply]);
      const msg = await reply;
      if (msg.meta.err !== undefined) throw new RemoteError(msg.meta.err, msg);
      return msg;
    } finally {
      clearTimeout(timer);
      this.#replies.delete(req);
    }
  }

  /** Answer the request `msg` (same QoS); with `error`, the reply carries `meta.err`. */
  reply(msg: Message, body: Uint8Array | string = new Uint8Array(), opts: ReplyOptions = {}): Promise<string> {
    const req = msg.requestId;
    if (req === undefined) throw new TypeError("msg: not a request (no meta.req)");
    const meta: Record<string, string> = { ...opts.meta, re: req };
    if (opts.error !== undefined) meta.err = opts.error.slice(0, 512) || "error";
    const encrypt = opts.encrypt ?? (msg.enc === "box" ? true : undefined);
    return this.send(msg.sender, body, { qos: msg.qos as 0 | 1, meta, sign: opts.sign, encrypt });
  }

  /** Answer requests with `handler` (its result is the reply body; a throw replies `meta.err`). */
  onRequest(handler: RequestHandler | null): void {
    this.#handler = handler;
  }

  // -- topics (§5) ------------------------------------------------------------------

  /**
   * Publish (§5); resolves with `{ mid, seq }`. With a group key for the topic in
   * `groupKeys` the body is encrypted (§12 `secretbox`) unless `encrypt: false`.
   */
  async publish(topic: string, body: Uint8Array | string, opts: PublishOptions = {}): Promise<{ mid: string; seq: number }> {
    checkTopic(topic);
    const [published] = await this.#inOrder(() => this.#publishFrame(topic, body, opts));
    const reply = await published;
    return { mid: str(reply.mid) ?? "", seq: num(reply.seq) ?? 0 };
  }

  /** Writes the `pub`; its reply comes in a tuple (an async function would wait for it). */
  async #publishFrame(topic: string, body: Uint8Array | string, opts: PublishOptions): Promise<readonly [Promise<Frame>]> {
    const meta = { ...opts.meta };
    let wire = asBytes(body);
    if (opts.encrypt !== false) {
      const current = this.groupKeys.current(topic);
      if (!current && opts.encrypt) throw new CryptoError(`no group key for ${topic}`);
      if (current) {
        wire = secretboxSeal(current[1], wire);
        meta.enc = "secretbox";
        meta.kid = current[0];
      }
    }
    checkMeta(meta);
    const frame: Frame = { t: "pub", topic, body: wire };
    if (opts.sign ?? this.#o.sign) frame.sig = await this.#needIdentity("sign").sign(topicSigMessage(topic, wire));
    if (Object.keys(meta).length) frame.meta = meta;
    const reply = this.#request(frame, {
      timeoutMs: opts.timeoutMs,
      // §5: a node never receives its own publication; count it as handled.
      onOk: (r) => this.#topics.get(topic)?.mark(num(r.seq) ?? 0),
    });
    reply.catch(() => undefined);
    return [reply] as const;
  }

  /**
   * Hold `topic` (§5) and return its `Subscription`. With `since`, history after that
   * `seq` comes first. Held across reconnects (from the last `seq` handled) until
   * `unsubscribe()`; subscribing a topic already held returns the same object.
   */
  async subscribe(topic: string, opts: { since?: number } = {}): Promise<Subscription> {
    checkTopic(topic);
    const since = opts.since;
    if (since !== undefined && !(Number.isSafeInteger(since) && since >= 0)) throw new RangeError("since: an integer >= 0");
    let sub: Subscription | undefined;
    await this.#request({ t: "sub", topic, since }, { onOk: (r) => (sub = this.#onSubOk(topic, since, r)) });
    return sub!;
  }

  #onSubOk(topic: string, since: number | undefined, r: Frame): Subscription {
    // In the reader, before any message after this ok.
    const seq = num(r.seq) ?? 0;
    const recovered = typeof r.recovered === "boolean" ? r.recovered : undefined;
    let st = this.#topics.get(topic);
    if (!st) {
      const sub = new Subscription(topic, seq, recovered, (t) => this.unsubscribe(t), this.#o.maxQueue);
      sub.onTake = (m) => m instanceof Message && this.#autoAck(m);
      this.#topics.set(topic, (st = new TopicState(since ?? seq, sub)));
    } else {
      st.sub.seq = seq;
      st.sub.recovered = recovered;
      if (since !== undefined) st.last = since;
    }
    if (recovered === false && since !== undefined) {
      // §5: publications after `since` are lost; where the loss ends is known from the
      // first message history still delivers, else from the `ok`'s seq.
      st.gapFrom = since + 1;
      st.gapTo = seq;
      clearTimeout(st.gapTimer);
      const s = st;
      st.gapTimer = setTimeout(() => this.#gapReport(topic, s, undefined), GAP_WAIT_MS);
    }
    return st.sub;
  }

  #gapReport(topic: string, st: TopicState, nextSeq: number | undefined): void {
    if (st.gapFrom === undefined) return;
    clearTimeout(st.gapTimer);
    st.gapTimer = undefined;
    const to = nextSeq === undefined ? st.gapTo : Math.min(nextSeq - 1, st.gapTo);
    const from = st.gapFrom;
    st.gapFrom = undefined;
    if (to < from) return;
    const gap: TopicGap = { type: "gap", topic, fromSeq: from, toSeq: to };
    if (!this.#listening("gap")) st.sub.put(gap);
    this.#emit(gap);
  }

  /** Stop holding `topic` (§5), at once (a reconnect does not take it again); its `Subscription` ends. */
  async unsubscribe(topic: string): Promise<void> {
    checkTopic(topic);
    const st = this.#topics.get(topic);
    if (st) {
      this.#topics.delete(topic);
      clearTimeout(st.gapTimer);
      st.sub.finish();
    }
    await this.#request({ t: "unsub", topic });
  }

  /** The newest `limit` (1..1000) kept publications of `topic` below `before`, oldest first (§5.2). */
  async history(topic: string, opts: { limit?: number; before?: number } = {}): Promise<History> {
    checkTopic(topic);
    const limit = opts.limit ?? 100;
    if (!(Number.isInteger(limit) && limit >= 1 && limit <= 1000)) throw new RangeError("limit: an integer in 1..1000");
    const reply = await this.#request({ t: "history", topic, limit, before: opts.before });
    const messages: Message[] = [];
    for (const m of Array.isArray(reply.msgs) ? reply.msgs : []) {
      if (m && typeof m === "object") {
        const msg = await this.#messageOf({ topic, qos: 0, ...(m as Frame) }, false);
        if (msg.topic === topic) messages.push(msg);
      }
    }
    return { seq: num(reply.seq) ?? 0, messages, more: reply.more === true };
  }

  // -- presence (§6, §6.1) ----------------------------------------------------------

  /** Which of `nodes` are online now (§6). */
  async presence(nodes: Iterable<string>): Promise<Record<string, boolean>> {
    return onlineOf(await this.#request({ t: "presence", nodes: [...nodes] }));
  }

  /**
   * Watch nodes coming and going, a topic's subscribers, or both (§6.1). The returned
   * `PresenceWatch` holds the `online` snapshot and yields `PresenceChanged` events
   * (also given to `presence` listeners). Watched again after every reconnect.
   */
  async watch(nodes: Iterable<string> = [], opts: { topic?: string } = {}): Promise<PresenceWatch> {
    const wanted = new Set(nodes);
    for (const n of wanted) if (!isNodeId(n)) throw new TypeError("nodes: not node ids");
    const topic = opts.topic;
    if (topic !== undefined) checkTopic(topic);
    if (!wanted.size && topic === undefined) throw new TypeError("watch: give nodes, a topic, or both");
    let made: PresenceWatch | undefined;
    await this.#request({ t: "watch", nodes: wanted.size ? [...wanted].sort() : undefined, topic }, {
      onOk: (r) => {
        const snap = onlineOf(r);
        const online: Record<string, boolean> = {};
        for (const n of wanted) online[n] = snap[n] ?? false;
        made = new PresenceWatch(wanted, topic, online, (w) => this.#unwatch(w));
        this.#watches.push(made);
      },
    });
    return made!;
  }

  async #unwatch(w: PresenceWatch): Promise<void> {
    const i = this.#watches.indexOf(w);
    if (i < 0) return;
    this.#watches.splice(i, 1);
    const still = new Set(this.#watches.flatMap((x) => [...x.nodes]));
    const gone = [...w.nodes].filter((n) => !still.has(n));
    const topicGone = w.topic !== undefined && !this.#watches.some((x) => x.topic === w.topic);
    if (!gone.length && !topicGone) return;
    await this.#request({ t: "unwatch", nodes: gone.length ? gone : undefined, topic: topicGone ? w.topic : undefined });
  }

  #onPresence(ev: PresenceChanged): void {
    const listened = this.#listening("presence");
    for (const w of this.#watches) {
      if (!w.matches(ev)) continue;
      if (ev.topic === undefined) w.online[ev.node] = ev.online;
      if (!listened) w.put(ev);
    }
    this.#emit(ev);
  }

  // -- requests on the wire ---------------------------------------------------------

  #needIdentity(what: string): Identity {
    if (!this.identity) throw new CryptoError(`${what}: needs an identity`);
    return this.identity;
  }

  #keyOf(node: string): Uint8Array {
    const k = this.keys[node] ?? publicKeyOf(node);
    if (!k) throw new CryptoError(`no key known for ${node} (options.keys)`);
    return k;
  }

  #readyConn(timeoutMs = this.#o.connectTimeoutMs): Promise<Conn> {
    if (this.#conn && !this.#conn.dead) return Promise.resolve(this.#conn);
    if (this.#final) return Promise.reject(this.#final);
    if (this.#state === "idle") return Promise.reject(new ClientError("connect() first"));
    return new Promise((resolve, reject) => {
      const w = {
        resolve: (c: Conn) => {
          clearTimeout(timer);
          resolve(c);
        },
        reject: (e: Error) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      const timer = setTimeout(() => {
        this.#waiters.splice(this.#waiters.indexOf(w), 1);
        reject(new ConnectTimeout(`not connected within ${timeoutMs} ms`));
      }, timeoutMs);
      this.#waiters.push(w);
    });
  }

  #encodeChecked(conn: Conn, frame: Frame): Uint8Array {
    // §1: a body over the limit is refused, a frame over the limit closes the session.
    const body = frame.body;
    if (body instanceof Uint8Array && body.length > conn.maxBody) throw new HubError("too_large", `body larger than ${conn.maxBody} bytes`);
    const data = encodeFrame(frame);
    if (data.length > conn.maxFrame) throw new HubError("too_large", `frame larger than ${conn.maxFrame} bytes`);
    return data;
  }

  /** Write `frame` with a fresh `id` now when connected (else once connected); its reply. */
  #request(frame: Frame, opt: { onOk?: (r: Frame) => void; timeoutMs?: number; conn?: Conn } = {}): Promise<Frame> {
    const now = opt.conn ?? (this.#conn && !this.#conn.dead ? this.#conn : null);
    if (now) return this.#requestOn(now, frame, opt);
    return this.#readyConn().then((c) => this.#requestOn(c, frame, opt));
  }

  #requestOn(conn: Conn, frame: Frame, opt: { onOk?: (r: Frame) => void; timeoutMs?: number }): Promise<Frame> {
    const timeoutMs = opt.timeoutMs ?? this.#o.requestTimeoutMs;
    const id = ++this.#ids;
    let data: Uint8Array;
    try {
      data = this.#encodeChecked(conn, { ...frame, id });
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        conn.pending.delete(id);
        reject(new RequestTimeout(`no reply to ${frame.t} within ${timeoutMs} ms`));
      }, timeoutMs);
      conn.pending.set(id, {
        resolve: (r) => {
          clearTimeout(timer);
          resolve(r);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
        onOk: opt.onOk,
      });
      this.#write(conn, data);
    });
  }

  /** Keep `frame` in the outbox (and its file) and write it when connected; the `ok`'s mid, in a tuple. */
  async #viaOutbox(frame: Frame, timeoutMs?: number): Promise<readonly [Promise<string>]> {
    if (this.#final) throw this.#final;
    const cid = frame.cid as string;
    let entry = this.#outbox.get(cid);
    if (!entry) {
      if (this.#outbox.size >= this.#o.outboxMax) throw new OutboxFull(`the outbox holds ${this.#o.outboxMax} messages`);
      entry = { cid, frame, waiters: [], inflight: false, retries: 0, createdMs: Date.now() };
      this.#outbox.set(cid, entry);
      const f = entry.frame;
      await this.#journal((st) => st.add({
        cid, to: f.to as string, body: f.body as Uint8Array, ttl: num(f.ttl) ?? null, sig: bytes(f.sig) ?? null,
        receipt: f.receipt === true, meta: (f.meta as Record<string, string> | undefined) ?? null, created_ms: entry!.createdMs,
      })); // kept before it goes out: a restart sends it again
    }
    const e = entry;
    const done = new Promise<string>((resolve, reject) => e.waiters.push({ resolve, reject }));
    done.catch(() => undefined);
    const conn = this.#conn;
    if (conn && !conn.dead && !e.inflight) this.#sendEntry(conn, e);
    if (timeoutMs === undefined) return [done] as const;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new RequestTimeout(`not stored within ${timeoutMs} ms (still in the outbox)`)), timeoutMs);
    });
    return [Promise.race([done, timeout]).finally(() => clearTimeout(timer))] as const;
  }

  /** Changes to the kept outbox, one at a time and in order; a failure does not stop the next. */
  #journal(op: (store: OutboxStorage) => Promise<void>): Promise<void> {
    const store = this.#outboxStore;
    if (!store) return Promise.resolve();
    const r = this.#journaled.then(() => op(store)).catch((e) => {
      throw new OutboxError(`cannot write the outbox ${this.#o.outboxFile}: ${(e as Error).message}`);
    });
    this.#journaled = r.catch(() => undefined);
    return r;
  }

  /** The outbox a previous run left (entries not confirmed by the hub then). */
  async #loadOutbox(): Promise<void> {
    const store = this.#outboxStore;
    if (!store) return;
    let records: OutboxRecord[];
    try {
      records = await store.load();
    } catch (e) {
      throw new OutboxError(`cannot read the outbox ${this.#o.outboxFile}: ${(e as Error).message}`);
    }
    for (const r of records) {
      if (this.#outbox.has(r.cid)) continue;
      const frame: Frame = { t: "send", to: r.to, body: r.body, qos: 1, cid: r.cid };
      if (r.ttl !== null) frame.ttl = r.ttl;
      if (r.sig) frame.sig = r.sig;
      if (r.receipt) frame.receipt = true;
      if (r.meta && Object.keys(r.meta).length) frame.meta = r.meta;
      this.#outbox.set(r.cid, { cid: r.cid, frame, waiters: [], inflight: false, retries: 0, createdMs: r.created_ms });
    }
  }

  #outboxDone(entry: OutboxEntry): void {
    this.#outbox.delete(entry.cid);
    this.#journal((st) => st.remove(entry.cid)).catch(() => undefined);
    if (!this.#outbox.size) for (const f of this.#outboxDrained.splice(0)) f();
  }

  #sendEntry(conn: Conn, entry: OutboxEntry): void {
    const id = ++this.#ids;
    let data: Uint8Array;
    try {
      data = this.#encodeChecked(conn, { ...entry.frame, id });
    } catch (e) {
      this.#outboxDone(entry);
      for (const w of entry.waiters) w.reject(e as Error);
      return;
    }
    entry.inflight = true;
    conn.pending.set(id, {
      entry,
      resolve: (reply) => {
        this.#outboxDone(entry);
        for (const w of entry.waiters) w.resolve(str(reply.mid) ?? "");
      },
      reject: (err) => {
        entry.inflight = false;
        if (err instanceof HubError && RETRY_CODES.has(err.code)) {
          // §8: not accepted, may succeed later: same cid, after a pause.
          setTimeout(() => {
            const c = this.#conn;
            if (c && !c.dead && !entry.inflight && this.#outbox.get(entry.cid) === entry) this.#sendEntry(c, entry);
          }, reconnectDelay(entry.retries++, 250, 4000, 0));
          return;
        }
        this.#outboxDone(entry);
        // A message restored from the outbox file has nobody awaiting it: say it here.
        if (!entry.waiters.length && err instanceof HubError) this.#fire("error", err);
        for (const w of entry.waiters) w.reject(err);
      },
    });
    this.#write(conn, data);
  }

  #write(conn: Conn, data: Uint8Array): void {
    try {
      conn.ws.send(data);
    } catch {
      // the close event follows
    }
  }

  // -- connections ------------------------------------------------------------------

  /** One attempt: upgrade, challenge, hello, welcome. */
  async #open(): Promise<Conn> {
    const WS = this.#o.WebSocket ?? (await webSocketImpl());
    let ws: WebSocketLike;
    try {
      ws = new WS(this.url);
    } catch (e) {
      throw new ConnectError(String((e as Error).message ?? e), { cause: e });
    }
    ws.binaryType = "arraybuffer";
    const conn: Conn = {
      ws, phase: "challenge", pending: new Map(), chain: Promise.resolve(), dead: false,
      lastRx: Date.now(), probeAt: 0, opened: Date.now(), maxBody: 65536, maxFrame: 131072,
    };
    return new Promise<Conn>((resolve, reject) => {
      let settled = false;
      const fail = (e: Error): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        conn.dead = true;
        try {
          ws.close();
        } catch {
          // not open yet
        }
        ws.terminate?.();
        reject(e);
      };
      const timer = setTimeout(() => fail(new ConnectError(`no session within ${this.#o.openTimeoutMs} ms`)), this.#o.openTimeoutMs);
      conn.onWelcome = () => {
        settled = true;
        clearTimeout(timer);
        resolve(conn);
      };
      ws.addEventListener("message", (ev: { data: unknown }) => {
        conn.lastRx = Date.now();
        const data = ev.data;
        conn.chain = conn.chain.then(() => this.#onData(conn, data, fail)).catch(() => undefined);
      });
      ws.on?.("ping", () => (conn.lastRx = Date.now()));
      ws.addEventListener("close", (ev: { code: number; reason: string }) => {
        conn.chain = conn.chain.then(() => {
          if (!settled) {
            const hs = conn.hsError;
            if (hs && (ev.code === 4001 || ev.code === 4003)) fail(new AuthError(hs.code, ev.code, hs.msg));
            else fail(new ConnectionLost(ev.code || 1006, ev.reason || (hs ? `${hs.code}: ${hs.msg}` : "connection failed")));
            return;
          }
          this.#down(conn, ev.code || 1006, ev.reason ?? "");
        });
      });
      ws.addEventListener("error", () => undefined); // the close event says what happened
    });
  }

  async #onData(conn: Conn, data: unknown, fail: (e: Error) => void): Promise<void> {
    if (conn.dead) return;
    if (!(data instanceof ArrayBuffer) && !(data instanceof Uint8Array)) return; // §1: binary only
    let frames: Frame[];
    try {
      frames = decodeFrames(data);
    } catch {
      fail(new ConnectionLost(1007, "undecodable message from the hub"));
      this.#drop(conn, 1007, "undecodable message from the hub");
      return;
    }
    for (const f of frames) {
      if (conn.dead) return;
      if (conn.phase === "open") {
        await this.#dispatch(conn, f);
      } else if (conn.phase === "challenge" && f.t === "challenge") {
        const hub = str(f.hub) ?? "";
        const nonce = bytes(f.nonce) ?? new Uint8Array();
        if ((num(f.v) ?? 1) < 1) {
          fail(new ConnectError("the hub speaks no protocol version this client knows"));
          return;
        }
        const hello: Frame = { t: "hello", v: 1 };
        const token = this.#o.token;
        if (token !== undefined) {
          hello.token = typeof token === "function" ? await token() : token;
        } else {
          hello.key = this.identity!.publicKey;
          hello.sig = await this.identity!.sign(authMessage(hub, nonce)); // the challenge's own hub id
        }
        if (this.#o.batch) hello.batch = true;
        if (this.#o.meta) hello.meta = this.#o.meta;
        conn.phase = "hello";
        this.#write(conn, encodeFrame(hello));
      } else if (conn.phase === "hello" && f.t === "welcome") {
        const limits: Record<string, number> = {};
        if (f.limits && typeof f.limits === "object") {
          for (const [k, x] of Object.entries(f.limits)) if (num(x) !== undefined) limits[k] = num(x)!;
        }
        conn.welcome = { node: str(f.node) ?? "", session: str(f.session) ?? "", hb: num(f.hb) ?? 20, pending: num(f.pending) ?? 0, limits };
        conn.maxBody = limits.max_body_bytes ?? conn.maxBody;
        conn.maxFrame = limits.max_frame_bytes ?? conn.maxFrame;
        conn.phase = "open";
        if (!this.#closed) {
          this.#welcome = conn.welcome; // before the messages that follow it are handled
          this.#live = conn; // acks go here at once, also while the session is resumed
        }
        conn.onWelcome?.();
      } else if (f.t === "error") {
        conn.hsError = { code: str(f.code) ?? "error", msg: str(f.msg) ?? "" };
      }
    }
  }

  /**
   * After a `welcome`: hold every topic again with `since`, watch again, resend the
   * outbox (same cids), then count as connected.
   */
  async #resume(conn: Conn): Promise<void> {
    if (this.#closed) {
      this.#drop(conn, 1000, "closed by client");
      throw new ConnectionLost(1000, "closed by client", true);
    }
    const hbMs = conn.welcome!.hb * 1000;
    conn.timer = setInterval(() => this.#liveness(conn, hbMs), 1000);
    this.#welcome = conn.welcome!;
    const subs = [...this.#topics].map(([topic, st]) => this.#resubscribe(conn, topic, st));
    const watches = this.#rewatch(conn);
    for (const entry of this.#outbox.values()) if (!entry.inflight) this.#sendEntry(conn, entry);
    await Promise.allSettled([...subs, ...watches]);
    if (conn.dead) throw new ConnectionLost(1006, "connection lost while resuming");
    this.#conn = conn;
    this.#state = "connected";
    this.#emit({ type: "connected", session: conn.welcome!.session, pending: conn.welcome!.pending, node: conn.welcome!.node });
    for (const w of this.#waiters.splice(0)) w.resolve(conn);
  }

  async #resubscribe(conn: Conn, topic: string, st: TopicState): Promise<void> {
    for (let round = 0; ; round++) {
      if (this.#topics.get(topic) !== st || conn.dead) return;
      try {
        await this.#request({ t: "sub", topic, since: st.last }, { conn, onOk: (r) => this.#onSubOk(topic, st.last, r) });
        return;
      } catch (e) {
        if (!(e instanceof HubError)) return; // the connection went: the next one tries again
        if (RETRY_CODES.has(e.code) && round + 1 < RESUB_ROUNDS) {
          await sleep(250);
          continue;
        }
        if (this.#topics.get(topic) === st) {
          this.#topics.delete(topic);
          st.sub.finish(new SubscriptionError(topic, e.code));
          this.#emit({ type: "subscriptionRefused", topic, code: e.code });
        }
        return;
      }
    }
  }

  #rewatch(conn: Conn): Promise<void>[] {
    const nodes = [...new Set(this.#watches.flatMap((w) => [...w.nodes]))];
    const frames: Frame[] = [];
    for (let i = 0; i < nodes.length; i += 1000) frames.push({ t: "watch", nodes: nodes.slice(i, i + 1000) });
    for (const topic of new Set(this.#watches.map((w) => w.topic))) if (topic !== undefined) frames.push({ t: "watch", topic });
    return frames.map((w) =>
      this.#request(w, { conn }).then(
        (reply) => {
          const ts = Date.now();
          for (const [node, online] of Object.entries(onlineOf(reply))) {
            const known = this.#watches.find((x) => x.nodes.has(node))?.online[node];
            if (known !== undefined && known !== online) this.#onPresence({ type: "presence", node, online, ts, snapshot: true });
          }
        },
        () => undefined,
      ),
    );
  }

  #liveness(conn: Conn, hbMs: number): void {
    const idle = Date.now() - conn.lastRx;
    if (idle > 3 * hbMs) {
      this.#drop(conn, 1006, "no sign of life from the hub");
    } else if (idle > hbMs + 1000 && Date.now() - conn.probeAt > hbMs) {
      conn.probeAt = Date.now();
      this.#write(conn, encodeFrame({ t: "presence", id: `probe-${++this.#ids}`, nodes: [conn.welcome!.node] }));
    }
  }

  /** Give up on a connection now (its close handshake may never finish). */
  #drop(conn: Conn, code: number, reason: string): void {
    try {
      conn.ws.close(code >= 3000 || code === 1000 ? code : 1000, reason);
    } catch {
      // not open
    }
    conn.ws.terminate?.();
    this.#down(conn, code, reason);
  }

  #down(conn: Conn, code: number, reason: string): void {
    if (conn.dead) return;
    conn.dead = true;
    clearInterval(conn.timer);
    const lost = new ConnectionLost(code, reason || conn.bye || "");
    for (const p of conn.pending.values()) {
      if (p.entry) p.entry.inflight = false;
      else p.reject(lost);
    }
    conn.pending.clear();
    if (this.#live === conn) this.#live = null;
    if (this.#conn !== conn) return; // still resuming: #resume sees `dead`
    this.#conn = null;
    this.#sessionEnded(conn, code, reason || conn.bye || "");
  }

  #sessionEnded(conn: Conn, code: number, reason: string): void {
    const stable = Date.now() - conn.opened >= SESSION_STABLE_MS;
    if (stable) this.#attempt = 0;
    let previous: number | undefined;
    if (code === 4012) {
      if (Date.now() - this.#lastKick < KICK_REPEAT_MS) previous = code;
      this.#lastKick = Date.now();
    }
    const final = this.#closed || !this.#o.reconnect || isFinalClose(code, previous);
    if (final) {
      this.#emit({ type: "disconnected", code, reason, willRetry: false, attempt: 0, delayMs: 0, retryMs: conn.retryMs });
      this.#finish(new ConnectionLost(code, reason, true));
      return;
    }
    this.#scheduleReconnect(code, reason, conn.retryMs);
  }

  #scheduleReconnect(code: number, reason: string, retryMs?: number): void {
    this.#state = "reconnecting";
    const attempt = this.#attempt++;
    const delay = reconnectDelay(attempt, this.#o.backoffMinMs, this.#o.backoffMaxMs, code, retryMs);
    this.#emit({ type: "disconnected", code, reason, willRetry: true, attempt: attempt + 1, delayMs: delay, ...(retryMs !== undefined ? { retryMs } : {}) });
    this.#reconnectTimer = setTimeout(() => void this.#reconnect(), delay);
  }

  async #reconnect(): Promise<void> {
    this.#reconnectTimer = null;
    if (this.#closed) return;
    let conn: Conn | undefined;
    try {
      conn = await this.#open();
      await this.#resume(conn);
    } catch (e) {
      if (this.#closed) return;
      if (e instanceof AuthError) {
        this.#emit({ type: "disconnected", code: e.closeCode, reason: e.message, willRetry: false, attempt: this.#attempt, delayMs: 0 });
        this.#finish(new ConnectionLost(e.closeCode, e.message, true));
        return;
      }
      const code = e instanceof ConnectionLost ? e.code : 1006;
      if (isFinalClose(code)) {
        this.#emit({ type: "disconnected", code, reason: (e as Error).message, willRetry: false, attempt: this.#attempt, delayMs: 0 });
        this.#finish(new ConnectionLost(code, (e as Error).message, true));
        return;
      }
      this.#scheduleReconnect(code, (e as Error).message, conn?.retryMs);
    }
  }

  #finish(lost: ConnectionLost): void {
    if (this.#state === "closed") return;
    this.#final = lost;
    this.#state = "closed";
    this.#conn = null;
    for (const w of this.#waiters.splice(0)) w.reject(lost);
    for (const e of this.#outbox.values()) for (const w of e.waiters) w.reject(lost);
    this.#outbox.clear();
    for (const f of this.#outboxDrained.splice(0)) f();
    const quiet = this.#closed ? undefined : lost; // streams end quietly after close()
    this.#inbox.finish(quiet);
    for (const st of this.#topics.values()) {
      clearTimeout(st.gapTimer);
      st.sub.finish(quiet);
    }
    for (const w of this.#watches) w.finish(quiet);
    this.#emit({ type: "closed", code: lost.code, reason: lost.reason });
  }

  // -- inbound ----------------------------------------------------------------------

  async #dispatch(conn: Conn, f: Frame): Promise<void> {
    switch (f.t) {
      case "ok":
      case "error": {
        const id = num(f.id);
        const p = id === undefined ? undefined : conn.pending.get(id);
        if (!p) {
          if (f.t === "error" && !(typeof f.id === "string" && f.id.startsWith("probe-"))) {
            this.#fire("error", new HubError(str(f.code) ?? "error", str(f.msg) ?? ""));
          }
          return;
        }
        conn.pending.delete(id!);
        if (f.t === "ok") {
          try {
            p.onOk?.(f);
          } finally {
            p.resolve(f);
          }
        } else {
          p.reject(new HubError(str(f.code) ?? "error", str(f.msg) ?? ""));
        }
        return;
      }
      case "msg":
        return this.#onMsg(conn, f);
      case "receipt":
        this.#emit({ type: "receipt", mid: str(f.mid) ?? "", to: str(f.to) ?? "", ts: num(f.ts) ?? 0 });
        return;
      case "presence": {
        const topic = str(f.topic);
        this.#onPresence({ type: "presence", node: str(f.node) ?? "", online: f.online === true, ts: num(f.ts) ?? 0, ...(topic !== undefined ? { topic } : {}), snapshot: false });
        return;
      }
      case "bye":
        conn.bye = str(f.reason);
        conn.retryMs = num(f.retry_ms);
        return;
      default:
        return; // §14: unknown frame types are ignored
    }
  }

  /** A `Message` of a `msg` frame: `sig` verified and the body opened (§12). */
  async #messageOf(f: Frame, ackable: boolean): Promise<Message> {
    const sender = str(f.from) ?? "";
    const topic = str(f.topic);
    const raw = bytes(f.body) ?? new Uint8Array();
    const sig = bytes(f.sig);
    const meta = strMap(f.meta);
    const key = this.keys[sender] ?? publicKeyOf(sender);
    let verified: boolean | undefined;
    if (sig && key) {
      verified = await verifySignature(sig, topic !== undefined ? topicSigMessage(topic, raw) : bodySigMessage(this.nodeId ?? "", raw), key);
    }
    let body = raw;
    let error: DecryptError | undefined;
    const enc = meta.enc;
    if (enc !== undefined) {
      try {
        if (enc === "box" && topic === undefined) {
          if (!key) throw new DecryptError(`no key known for ${sender}`);
          body = await this.#needIdentity("decrypt").boxOpen(key, raw); // the `from` node's key, never one named inside
        } else if (enc === "secretbox" && topic !== undefined) {
          const gk = meta.kid !== undefined ? this.groupKeys.get(topic, meta.kid) : undefined;
          if (!gk) throw new DecryptError(`no group key ${meta.kid} for ${topic}`);
          body = secretboxOpen(gk, raw);
        } else {
          throw new DecryptError(`unknown enc ${enc}`);
        }
      } catch (e) {
        error = e instanceof DecryptError ? e : new DecryptError("cannot open the body");
      }
    }
    const qos = num(f.qos) ?? 0;
    return new Message(
      { mid: str(f.mid) ?? "", sender, body, ts: num(f.ts) ?? 0, qos, topic, seq: num(f.seq), sig, meta, raw, verified, enc, error },
      ackable && qos === 1 ? (m) => this.ack(m.mid) : undefined,
    );
  }

  async #onMsg(conn: Conn, f: Frame): Promise<void> {
    const mid = str(f.mid) ?? "";
    const qos = num(f.qos) ?? 0;
    const topic = str(f.topic);
    let st: TopicState | undefined;
    if (topic === undefined) {
      // §4: drop repeats by mid; ack a repeat again unless it is still being handled.
      if (this.#recent.has(mid)) {
        if (qos === 1 && !this.#unacked.has(mid)) this.#write(conn, encodeFrame({ t: "ack", mid }));
        return;
      }
      this.#recent.set(mid, true);
      if (this.#recent.size > this.#o.recentMids) this.#recent.delete(this.#recent.keys().next().value!);
    } else {
      st = this.#topics.get(topic);
      if (!st) return; // not held (any more)
      const seq = num(f.seq) ?? 0;
      if (!st.isNew(seq)) return; // §5: a repeat
      if (st.gapFrom !== undefined) this.#gapReport(topic, st, seq);
      st.mark(seq);
    }
    const msg = await this.#messageOf(f, true);
    if (msg.qos === 1) this.#unacked.add(mid);
    const re = msg.replyTo;
    if (re !== undefined) {
      // §4.3: a reply is consumed by request(), never queued: one that comes after its
      // request gave up (or names none of ours) is acked and dropped.
      const waiting = this.#replies.get(re);
      msg.ack();
      if (waiting && waiting.from === msg.sender) {
        this.#replies.delete(re);
        waiting.resolve(msg);
      }
      return;
    }
    this.#deliveries.push(msg);
    if (!this.#delivering) void this.#deliverLoop();
  }

  /** Hands messages out in order: request handler, `message` listeners, or the streams. */
  async #deliverLoop(): Promise<void> {
    this.#delivering = true;
    try {
      for (let msg = this.#deliveries.shift(); msg; msg = this.#deliveries.shift()) {
        const handler = this.#handler;
        if (handler && msg.requestId !== undefined && this.#handling < MAX_REQUEST_HANDLERS) {
          // each request on its own (at most 64 at once; the rest come as messages)
          this.#handling++;
          void this.#answer(handler, msg).finally(() => this.#handling--);
          continue;
        }
        const listeners = this.#listeners.get("message");
        if (listeners?.size) {
          for (const fn of [...listeners]) {
            try {
              await fn(msg);
            } catch {
              // a listener's failure is its own; the message still counts as handled
            }
          }
          this.#autoAck(msg);
        } else if (msg.topic === undefined) {
          this.#inbox.put(msg);
        } else {
          this.#topics.get(msg.topic)?.sub.put(msg);
        }
      }
    } finally {
      this.#delivering = false;
    }
  }

  async #answer(handler: RequestHandler, msg: Message): Promise<void> {
    let body: Uint8Array | string;
    try {
      body = await handler(msg);
    } catch (e) {
      const err = String((e as Error)?.message ?? e).slice(0, 200) || "error";
      await this.reply(msg, new Uint8Array(), { error: err }).then(() => msg.ack(), () => undefined);
      return;
    }
    // Unacked when the reply fails: a QoS 1 request comes again next session.
    await this.reply(msg, body).then(() => msg.ack(), () => undefined);
  }
}
