/** Async-iterable queues: a topic's `Subscription`, a `PresenceWatch`, and `History`. */
import type { Message } from "./message.js";
import type { PresenceChanged, TopicGap } from "./events.js";

/** A queue read with `for await`; `onTake` runs when the reader asks for the next item. */
export class Stream<T> implements AsyncIterable<T> {
  #items: T[] = [];
  #wake: (() => void) | null = null;
  #done = false;
  #error: Error | undefined;
  #max: number;
  /** @internal called with the item handed out before, when the next is asked for */
  onTake: ((prev: T) => void) | undefined;
  /** @internal called with the oldest item when it is dropped, past `max` */
  onDrop: ((item: T) => void) | undefined;

  /** At most `max` items wait: past it the oldest is dropped. */
  constructor(max = Infinity) {
    this.#max = max;
  }

  /** @internal */
  put(item: T): void {
    if (this.#done) return;
    this.#items.push(item);
    if (this.#items.length > this.#max) this.onDrop?.(this.#items.shift()!);
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  /** @internal end the iteration (with `error`, after what is queued). */
  finish(error?: Error): void {
    if (this.#done) return;
    this.#done = true;
    this.#error = error;
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  get size(): number {
    return this.#items.length;
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    let prev: T | undefined;
    return {
      next: async (): Promise<IteratorResult<T>> => {
        if (prev !== undefined) this.onTake?.(prev);
        prev = undefined;
        for (;;) {
          if (this.#items.length) {
            prev = this.#items.shift()!;
            return { done: false, value: prev };
          }
          if (this.#done) {
            if (this.#error) throw this.#error;
            return { done: true, value: undefined };
          }
          await new Promise<void>((r) => (this.#wake = r));
        }
      },
      return: async (): Promise<IteratorResult<T>> => ({ done: true, value: undefined }),
    };
  }
}

/**
 * A topic held by the client (§5), and an async iterator of its publications in `seq`
 * order, with a `TopicGap` where history lost some across a reconnect. Messages reach
 * it when no `message` listener is registered on the client.
 */
export class Subscription extends Stream<Message | TopicGap> {
  readonly topic: string;
  /** The topic's seq in the hub's `ok`. */
  seq: number;
  /** `recovered` of that `ok` (undefined without `since`). */
  recovered: boolean | undefined;
  readonly #unsubscribe: (topic: string) => Promise<void>;

  constructor(topic: string, seq: number, recovered: boolean | undefined, unsubscribe: (topic: string) => Promise<void>, max = Infinity) {
    super(max);
    this.topic = topic;
    this.seq = seq;
    this.recovered = recovered;
    this.#unsubscribe = unsubscribe;
  }

  /** Unsubscribe (§5); iteration ends after what is queued. */
  close(): Promise<void> {
    return this.#unsubscribe(this.topic);
  }
}

/**
 * A §6.1 watch: `online` is the state known of each watched node (the snapshot, then
 * events); iterating yields each `PresenceChanged` (when no `presence` listener is
 * registered; at most 10,000 wait, the oldest dropped past that).
 */
export class PresenceWatch extends Stream<PresenceChanged> {
  readonly nodes: ReadonlySet<string>;
  readonly topic: string | undefined;
  readonly online: Record<string, boolean>;
  readonly #unwatch: (w: PresenceWatch) => Promise<void>;

  constructor(nodes: Set<string>, topic: string | undefined, online: Record<string, boolean>, unwatch: (w: PresenceWatch) => Promise<void>) {
    super(10_000);
    this.nodes = nodes;
    this.topic = topic;
    this.online = online;
    this.#unwatch = unwatch;
  }

  /** @internal */
  matches(ev: PresenceChanged): boolean {
    return ev.topic !== undefined ? ev.topic === this.topic : this.nodes.has(ev.node);
  }

  /** Stop watching (§6.1 `unwatch`); iteration ends. */
  async close(): Promise<void> {
    await this.#unwatch(this);
    this.finish();
  }
}

/** A page of a topic's history (§5.2): `messages` oldest first; `more`: older ones exist. */
export interface History {
  seq: number;
  messages: Message[];
  more: boolean;
}
