/**
 * Node.js side of the platform: the global WebSocket where there is one (Node 22+), else
 * the `ws` package (Node 20); identities kept in key files, the format of the Python
 * SDK and `openred-hub keygen` (unencrypted PKCS#8 PEM Ed25519 private key, mode 0600).
 */
import { Identity } from "./crypto.js";
import type { WebSocketCtor } from "./client.js";
import { concatBytes } from "./codec.js";
import type { OutboxRecord, OutboxStorage } from "./codec.js";
import { decode, encode } from "@msgpack/msgpack";

export async function webSocketImpl(): Promise<WebSocketCtor> {
  const WS = (globalThis as { WebSocket?: unknown }).WebSocket;
  if (WS) return WS as WebSocketCtor;
  const mod = (await import("ws")) as unknown as { WebSocket: WebSocketCtor };
  return mod.WebSocket;
}

/** Read a key file (PKCS#8 PEM Ed25519, as `openred-hub keygen` writes). */
export async function loadKeyFile(path: string): Promise<Identity> {
  const { readFile } = await import("node:fs/promises");
  const { createPrivateKey } = await import("node:crypto");
  const key = createPrivateKey(await readFile(path));
  if (key.asymmetricKeyType !== "ed25519") throw new Error(`${path}: not an Ed25519 private key`);
  const jwk = key.export({ format: "jwk" }) as { d?: string };
  return Identity.fromSeed(new Uint8Array(Buffer.from(jwk.d ?? "", "base64url")));
}

/** Write `identity` as a key file (mode 0600); refuses to overwrite unless `force`. */
export async function saveKeyFile(path: string, identity: Identity, opts: { force?: boolean } = {}): Promise<void> {
  const seed = identity.seed;
  if (!seed) throw new Error("a non-extractable identity cannot be written to a file");
  const { writeFile } = await import("node:fs/promises");
  const { createPrivateKey } = await import("node:crypto");
  const jwk = {
    kty: "OKP",
    crv: "Ed25519",
    d: Buffer.from(seed).toString("base64url"),
    x: Buffer.from(identity.publicKey).toString("base64url"),
  };
  const pem = createPrivateKey({ key: jwk, format: "jwk" }).export({ type: "pkcs8", format: "pem" });
  await writeFile(path, pem, { mode: 0o600, flag: opts.force ? "w" : "wx" });
}

/** The identity in the key file at `path`, or undefined when there is none. */
export async function loadIdentity(path = "node.key"): Promise<Identity | undefined> {
  try {
    return await loadKeyFile(path);
  } catch (e) {
    if ((e as { code?: string }).code === "ENOENT") return undefined;
    throw e;
  }
}

/** Store `identity` in the key file at `path` (overwriting it). */
export async function saveIdentity(identity: Identity, path = "node.key"): Promise<void> {
  await saveKeyFile(path, identity, { force: true });
}

/** Remove the key file at `path`. */
export async function deleteIdentity(path = "node.key"): Promise<void> {
  const { rm } = await import("node:fs/promises");
  await rm(path, { force: true });
}

/** The identity in the key file at `path`, or a new one written there. */
export async function loadOrCreateIdentity(path = "node.key"): Promise<Identity> {
  return (await loadIdentity(path)) ?? (await createIdentityFile(path));
}

async function createIdentityFile(path: string): Promise<Identity> {
  const identity = await Identity.generate();
  await saveKeyFile(path, identity);
  return identity;
}

const MAGIC = new TextEncoder().encode("openred-outbox/1\n");
const COMPACT_MIN_BYTES = 64 * 1024;

/**
 * An outbox kept in the journal file at `path`, in the Python SDK's format (so either
 * SDK reads what the other left): the header `openred-outbox/1\n`, then one record per
 * change, `["add", entry]` or `["del", cid]` in msgpack, each preceded by its length and
 * CRC-32 (big-endian u32s), appended and fsynced. A record cut short by a crash is
 * ignored on load. Past twice the live size (and 64 KiB) the journal is compacted: the
 * live entries are written to a temporary file, fsynced and renamed over it. Mode 0600.
 */
export function outboxStorage(path: string): OutboxStorage {
  const live = new Map<string, { rec: OutboxRecord; bytes: number }>();
  let fileBytes = 0;
  let liveBytes = 0;

  const record = async (payload: unknown): Promise<Uint8Array> => {
    const { crc32 } = await import("node:zlib");
    const data = encode(payload);
    const out = new Uint8Array(8 + data.length);
    const view = new DataView(out.buffer);
    view.setUint32(0, data.length);
    view.setUint32(4, crc32(data));
    out.set(data, 8);
    return out;
  };

  const atomicWrite = async (data: Uint8Array): Promise<void> => {
    const { open, rename, rm } = await import("node:fs/promises");
    const { dirname, basename, join } = await import("node:path");
    const { randomBytes } = await import("node:crypto");
    const tmp = join(dirname(path), `.${basename(path)}.${randomBytes(6).toString("hex")}.tmp`);
    try {
      const fh = await open(tmp, "wx", 0o600);
      try {
        await fh.writeFile(data);
        await fh.sync();
      } finally {
        await fh.close();
      }
      await rename(tmp, path);
    } catch (e) {
      await rm(tmp, { force: true });
      throw e;
    }
    try {
      const dir = await open(dirname(path), "r");
      await dir.sync().finally(() => dir.close());
    } catch {
      // not every platform syncs a directory
    }
  };

  const append = async (data: Uint8Array): Promise<void> => {
    if (fileBytes === 0) {
      await atomicWrite(concatBytes(MAGIC, data)); // a new journal: header first
      fileBytes = MAGIC.length + data.length;
      return;
    }
    const { open } = await import("node:fs/promises");
    const fh = await open(path, "a", 0o600);
    try {
      await fh.write(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    fileBytes += data.length;
    if (fileBytes > 2 * (liveBytes + MAGIC.length) && fileBytes > COMPACT_MIN_BYTES) {
      const parts: Uint8Array[] = [MAGIC];
      for (const { rec } of live.values()) parts.push(await record(["add", rec]));
      const snapshot = concatBytes(...parts);
      await atomicWrite(snapshot);
      fileBytes = snapshot.length;
    }
  };

  return {
    async load() {
      const { readFile } = await import("node:fs/promises");
      const { crc32 } = await import("node:zlib");
      let data: Uint8Array;
      try {
        data = new Uint8Array(await readFile(path));
      } catch (e) {
        if ((e as { code?: string }).code === "ENOENT") return [];
        throw e;
      }
      if (data.length < MAGIC.length || MAGIC.some((b, i) => data[i] !== b)) throw new Error(`${path} is not an outbox`);
      const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
      let pos = MAGIC.length;
      while (pos + 8 <= data.length) {
        const size = view.getUint32(pos);
        const body = data.subarray(pos + 8, pos + 8 + size);
        if (body.length < size) break; // cut short by a crash: that change never happened
        if (crc32(body) !== view.getUint32(pos + 4)) {
          if (pos + 8 + size < data.length) throw new Error(`${path}: a damaged record before others`);
          break;
        }
        const op = decode(body) as [string, unknown];
        if (op[0] === "add") {
          const r = op[1] as OutboxRecord;
          live.delete(r.cid);
          live.set(r.cid, { rec: r, bytes: 8 + size });
        } else if (op[0] === "del") {
          live.delete(op[1] as string);
        }
        pos += 8 + size;
      }
      fileBytes = pos;
      liveBytes = [...live.values()].reduce((n, x) => n + x.bytes, 0);
      return [...live.values()].map((x) => x.rec);
    },
    async add(rec) {
      const data = await record(["add", rec]);
      live.set(rec.cid, { rec, bytes: data.length });
      liveBytes += data.length;
      await append(data);
    },
    async remove(cid) {
      const had = live.get(cid);
      if (!had) return;
      live.delete(cid);
      liveBytes -= had.bytes;
      await append(await record(["del", cid]));
    },
  };
}
