/**
 * Browser side of the platform: the global WebSocket, and identities kept in IndexedDB
 * (as non-extractable WebCrypto keys where the browser has Ed25519 in WebCrypto).
 */
import { Identity, webcryptoEd25519 } from "./crypto.js";
import type { StoredIdentity } from "./crypto.js";
import type { WebSocketCtor } from "./client.js";
import type { OutboxRecord, OutboxStorage } from "./codec.js";

export async function webSocketImpl(): Promise<WebSocketCtor> {
  const WS = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (!WS) throw new Error("no WebSocket in this runtime: pass options.WebSocket");
  return WS as WebSocketCtor;
}

const DB = "openred";
const STORE = "identities";
const OUTBOXES = "outboxes";

function db(): Promise<IDBDatabase> {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 2);
    req.onupgradeneeded = () => {
      for (const name of [STORE, OUTBOXES]) {
        if (!req.result.objectStoreNames.contains(name)) req.result.createObjectStore(name);
      }
    };
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function tx<T>(mode: IDBTransactionMode, op: (s: IDBObjectStore) => IDBRequest, store = STORE): Promise<T> {
  const d = await db();
  try {
    return await new Promise<T>((resolve, reject) => {
      const t = d.transaction(store, mode);
      const req = op(t.objectStore(store));
      t.oncomplete = () => resolve(req.result as T);
      t.onerror = () => reject(t.error);
      t.onabort = () => reject(t.error);
    });
  } finally {
    d.close();
  }
}

/** The identity stored under `name` (IndexedDB database `openred`), or undefined. */
export async function loadIdentity(name = "node"): Promise<Identity | undefined> {
  const s = await tx<StoredIdentity | undefined>("readonly", (st) => st.get(name));
  return s ? Identity.fromStored(s) : undefined;
}

/** Store `identity` under `name`. */
export async function saveIdentity(identity: Identity, name = "node"): Promise<void> {
  await tx("readwrite", (st) => st.put(identity.toStored(), name));
}

/** Forget the identity stored under `name`. */
export async function deleteIdentity(name = "node"): Promise<void> {
  await tx("readwrite", (st) => st.delete(name));
}

/**
 * The identity stored under `name`, or a new one stored there. New keys are
 * non-extractable WebCrypto keys where the browser allows (its seed never leaves
 * WebCrypto), else an extractable seed.
 */
export async function loadOrCreateIdentity(name = "node"): Promise<Identity> {
  const found = await loadIdentity(name);
  if (found) return found;
  const identity = await Identity.generate({ extractable: !(await webcryptoEd25519()) });
  await saveIdentity(identity, name);
  return identity;
}

/** Key files are for Node.js; in a browser keep keys in IndexedDB (`loadOrCreateIdentity`). */
export async function loadKeyFile(_path: string): Promise<Identity> {
  throw new Error("key files are for Node.js: in a browser use loadOrCreateIdentity (IndexedDB)");
}

/** Key files are for Node.js; in a browser keep keys in IndexedDB (`saveIdentity`). */
export async function saveKeyFile(_path: string, _identity: Identity, _opts: { force?: boolean } = {}): Promise<void> {
  throw new Error("key files are for Node.js: in a browser use saveIdentity (IndexedDB)");
}

/**
 * An outbox kept in IndexedDB (database `openred`, store `outboxes`): one entry per
 * kept send, keyed `[name, n]` so that they load in the order they were added.
 */
export function outboxStorage(name: string): OutboxStorage {
  const keys = new Map<string, [string, number]>();
  let n = 0;
  return {
    async load() {
      const range = IDBKeyRange.bound([name, -Infinity], [name, Infinity]);
      const [ks, vs] = await Promise.all([
        tx<[string, number][]>("readonly", (st) => st.getAllKeys(range), OUTBOXES),
        tx<OutboxRecord[]>("readonly", (st) => st.getAll(range), OUTBOXES),
      ]);
      ks.forEach((k, i) => keys.set(vs[i].cid, k));
      n = ks.length ? ks[ks.length - 1][1] : 0;
      return vs;
    },
    async add(rec) {
      const key: [string, number] = [name, ++n];
      keys.set(rec.cid, key);
      await tx("readwrite", (st) => st.put(rec, key), OUTBOXES);
    },
    async remove(cid) {
      const key = keys.get(cid);
      if (!key) return;
      keys.delete(cid);
      await tx("readwrite", (st) => st.delete(key), OUTBOXES);
    },
  };
}
