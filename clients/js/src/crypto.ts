/**
 * Keys, signatures and end-to-end encryption (protocol §2.1, §2.2, §12).
 *
 * Ed25519 runs on WebCrypto where the runtime has it (Node.js 20, current browsers), else
 * on @noble/ed25519. Encryption is NaCl's: `crypto_box` = X25519 (WebCrypto) of keys
 * converted from Ed25519 as libsodium's `crypto_sign_ed25519_{pk,sk}_to_curve25519` do,
 * then HSalsa20 and XSalsa20-Poly1305 (@noble/ciphers); `crypto_secretbox` for topics.
 */
import * as ed from "@noble/ed25519";
import { hsalsa, xsalsa20poly1305 } from "@noble/ciphers/salsa.js";
import { bodySigMessage, concatBytes, fromHex, toHex, topicSigMessage } from "./codec.js";

/** WebCrypto, typed loosely: its TS 5.9 signatures want ArrayBuffer-backed views only. */
interface Subtle {
  importKey(format: string, data: Uint8Array, alg: unknown, extractable: boolean, usages: string[]): Promise<CryptoKey>;
  sign(alg: string, key: CryptoKey, data: Uint8Array): Promise<ArrayBuffer>;
  verify(alg: string, key: CryptoKey, sig: Uint8Array, data: Uint8Array): Promise<boolean>;
  deriveBits(alg: unknown, key: CryptoKey, length: number): Promise<ArrayBuffer>;
}

const subtle = (): Subtle => {
  const s = globalThis.crypto?.subtle as unknown as Subtle | undefined;
  if (!s) throw new Error("WebCrypto (crypto.subtle) is not available: use a secure context (https or localhost)");
  return s;
};

// PKCS#8 wrappings of a raw 32-byte private key (RFC 8410): the only private import
// format WebCrypto takes for these curves.
const PKCS8_ED25519 = fromHex("302e020100300506032b657004220420");
const PKCS8_X25519 = fromHex("302e020100300506032b656e04220420");
const TEST_PUBLIC = fromHex("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8");

let edProbe: Promise<boolean> | undefined;
let xProbe: Promise<boolean> | undefined;

/** Tests: force the @noble/ed25519 path (as on a runtime without WebCrypto Ed25519), or undo. */
export function forceSoftwareEd25519(on: boolean): void {
  edProbe = on ? Promise.resolve(false) : undefined;
}

/** Whether WebCrypto does Ed25519 here (probed once). */
export function webcryptoEd25519(): Promise<boolean> {
  edProbe ??= subtle()
    .importKey("raw", TEST_PUBLIC, { name: "Ed25519" }, true, ["verify"])
    .then(() => true, () => false);
  return edProbe;
}

/** Whether WebCrypto does X25519 here (probed once). */
export function webcryptoX25519(): Promise<boolean> {
  const base = new Uint8Array(32);
  base[0] = 9;
  xProbe ??= subtle()
    .importKey("raw", base, { name: "X25519" }, true, [])
    .then(() => true, () => false);
  return xProbe;
}

export const randomBytes = (n: number): Uint8Array => globalThis.crypto.getRandomValues(new Uint8Array(n));

/** Verify a detached Ed25519 signature (RFC 8032, no prehash). Never throws. */
export async function verifySignature(sig: Uint8Array, data: Uint8Array, publicKey: Uint8Array): Promise<boolean> {
  try {
    if (sig.length !== 64 || publicKey.length !== 32) return false;
    if (await webcryptoEd25519()) {
      const key = await subtle().importKey("raw", publicKey, { name: "Ed25519" }, false, ["verify"]);
      return await subtle().verify("Ed25519", key, sig, data);
    }
    return await ed.verifyAsync(sig, data, publicKey);
  } catch {
    return false;
  }
}

/** libsodium `crypto_sign_ed25519_pk_to_curve25519`: u = (1 + y) / (1 − y) mod p. */
export function ed25519PublicToX25519(publicKey: Uint8Array): Uint8Array {
  const point = ed.Point.fromBytes(publicKey); // rejects bytes that are not a point
  if (point.isSmallOrder()) throw new Error("public key of small order");
  const { y } = point.toAffine();
  const p = 2n ** 255n - 19n;
  let u = ed.etc.mod((1n + y) * ed.etc.invert(ed.etc.mod(1n - y, p), p), p);
  const out = new Uint8Array(32);
  for (let i = 0; i < 32; i++, u >>= 8n) out[i] = Number(u & 0xffn);
  return out;
}

// "expand 32-byte k", little-endian words: the HSalsa20 constant of crypto_box_beforenm.
const SIGMA = Uint32Array.of(0x61707865, 0x3320646e, 0x79622d32, 0x6b206574);

/** crypto_box_beforenm's second half: HSalsa20(shared, zero nonce). */
function hsalsaKey(shared: Uint8Array): Uint8Array {
  if (shared.every((b) => b === 0)) throw new Error("X25519 gave the all-zero secret");
  const out = new Uint32Array(8);
  hsalsa(SIGMA, new Uint32Array(shared.slice().buffer), new Uint32Array(4), out);
  return new Uint8Array(out.buffer);
}

/** NaCl secretbox with a random nonce: `nonce(24) ‖ mac ‖ ciphertext` (§12). */
export function secretboxSeal(key: Uint8Array, plaintext: Uint8Array): Uint8Array {
  if (key.length !== 32) throw new TypeError("key: 32 bytes");
  const nonce = randomBytes(24);
  return concatBytes(nonce, xsalsa20poly1305(key, nonce).encrypt(plaintext));
}

/** Open `nonce ‖ secretbox`; throws when it does not authenticate. */
export function secretboxOpen(key: Uint8Array, data: Uint8Array): Uint8Array {
  if (key.length !== 32) throw new TypeError("key: 32 bytes");
  if (data.length < 24 + 16) throw new Error("ciphertext too short");
  return xsalsa20poly1305(key, data.subarray(0, 24)).decrypt(data.subarray(24));
}

/** What a stored identity holds: the seed, or WebCrypto keys that cannot be read back. */
export type StoredIdentity =
  | { publicKey: Uint8Array; seed: Uint8Array }
  | { publicKey: Uint8Array; signKey: CryptoKey; boxKey: CryptoKey | null };

/**
 * A node's Ed25519 key. Its node id is the hex of the public key (§2.1).
 *
 * `Identity.generate({ extractable: false })` keeps only WebCrypto keys that cannot be
 * exported (the seed is dropped once they exist), for storing in IndexedDB.
 */
export class Identity {
  readonly publicKey: Uint8Array;
  readonly nodeId: string;
  #seed: Uint8Array | null;
  #signKey: CryptoKey | null;
  #boxKey: CryptoKey | null; // X25519 private key (non-extractable)
  #boxSecret: Uint8Array | null = null; // X25519 secret bytes (when extractable)
  #shared = new Map<string, Uint8Array>(); // peer node id -> crypto_box key

  private constructor(publicKey: Uint8Array, seed: Uint8Array | null, signKey: CryptoKey | null, boxKey: CryptoKey | null) {
    this.publicKey = publicKey;
    this.nodeId = toHex(publicKey);
    this.#seed = seed;
    this.#signKey = signKey;
    this.#boxKey = boxKey;
  }

  /** A fresh random key. */
  static generate(opts: { extractable?: boolean } = {}): Promise<Identity> {
    return Identity.fromSeed(randomBytes(32), opts);
  }

  /** The key of a 32-byte Ed25519 seed (RFC 8032 secret key; PyNaCl's `SigningKey(seed)`). */
  static async fromSeed(seed: Uint8Array, opts: { extractable?: boolean } = {}): Promise<Identity> {
    if (!(seed instanceof Uint8Array) || seed.length !== 32) throw new TypeError("seed: 32 bytes");
    seed = seed.slice();
    const publicKey = await ed.getPublicKeyAsync(seed);
    if (opts.extractable !== false) return new Identity(publicKey, seed, null, null);
    if (!(await webcryptoEd25519())) {
      throw new Error("non-extractable keys need WebCrypto Ed25519");
    }
    const signKey = await subtle().importKey("pkcs8", concatBytes(PKCS8_ED25519, seed), { name: "Ed25519" }, false, ["sign"]);
    let boxKey: CryptoKey | null = null;
    if (await webcryptoX25519()) {
      const { head } = await ed.utils.getExtendedPublicKeyAsync(seed);
      boxKey = await subtle().importKey("pkcs8", concatBytes(PKCS8_X25519, head), { name: "X25519" }, false, ["deriveBits"]);
      head.fill(0);
    }
    seed.fill(0);
    return new Identity(publicKey, null, signKey, boxKey);
  }

  /** Rebuild an identity from `toStored()` (IndexedDB, a file). */
  static async fromStored(s: StoredIdentity): Promise<Identity> {
    if ("seed" in s) return Identity.fromSeed(s.seed);
    return new Identity(s.publicKey.slice(), null, s.signKey, s.boxKey);
  }

  /** The 32-byte seed; undefined for a non-extractable identity. */
  get seed(): Uint8Array | undefined {
    return this.#seed?.slice();
  }

  get extractable(): boolean {
    return this.#seed !== null;
  }

  toStored(): StoredIdentity {
    if (this.#seed) return { publicKey: this.publicKey.slice(), seed: this.#seed.slice() };
    return { publicKey: this.publicKey.slice(), signKey: this.#signKey!, boxKey: this.#boxKey };
  }

  /** Ed25519 signature of `data` (64 bytes). */
  async sign(data: Uint8Array): Promise<Uint8Array> {
    if (!this.#signKey && this.#seed && (await webcryptoEd25519())) {
      this.#signKey = await subtle().importKey("pkcs8", concatBytes(PKCS8_ED25519, this.#seed), { name: "Ed25519" }, false, ["sign"]);
    }
    if (this.#signKey) return new Uint8Array(await subtle().sign("Ed25519", this.#signKey, data));
    return ed.signAsync(data, this.#seed!);
  }

  /** §4 / §12: the `sig` of a direct message's body to `to`. */
  signBody(to: string, body: Uint8Array): Promise<Uint8Array> {
    return this.sign(bodySigMessage(to, body));
  }

  /** §5.1 / §12: the `sig` of a publication's body on `topic`. */
  signTopic(topic: string, body: Uint8Array): Promise<Uint8Array> {
    return this.sign(topicSigMessage(topic, body));
  }

  /** The crypto_box key shared with the holder of `peerPublicKey` (Ed25519), cached. */
  async boxKeyFor(peerPublicKey: Uint8Array): Promise<Uint8Array> {
    const id = toHex(peerPublicKey);
    const hit = this.#shared.get(id);
    if (hit) return hit;
    const peer = ed25519PublicToX25519(peerPublicKey);
    if (!(await webcryptoX25519())) throw new Error("encryption needs WebCrypto X25519");
    if (!this.#boxKey) {
      if (!this.#seed) throw new Error("this identity has no X25519 key");
      this.#boxSecret ??= (await ed.utils.getExtendedPublicKeyAsync(this.#seed)).head;
      this.#boxKey = await subtle().importKey("pkcs8", concatBytes(PKCS8_X25519, this.#boxSecret), { name: "X25519" }, false, ["deriveBits"]);
    }
    const pub = await subtle().importKey("raw", peer, { name: "X25519" }, false, []);
    const shared = new Uint8Array(await subtle().deriveBits({ name: "X25519", public: pub }, this.#boxKey, 256));
    const key = hsalsaKey(shared);
    if (this.#shared.size > 1000) this.#shared.clear();
    this.#shared.set(id, key);
    return key;
  }

  /** NaCl box to `peerPublicKey`: `nonce(24) ‖ box` (§12, `meta.enc = "box"`). */
  async boxSeal(peerPublicKey: Uint8Array, plaintext: Uint8Array): Promise<Uint8Array> {
    return secretboxSeal(await this.boxKeyFor(peerPublicKey), plaintext);
  }

  /** Open a box from `peerPublicKey` (the sender's key); throws when it does not authenticate. */
  async boxOpen(peerPublicKey: Uint8Array, data: Uint8Array): Promise<Uint8Array> {
    return secretboxOpen(await this.boxKeyFor(peerPublicKey), data);
  }
}

/**
 * The group keys of topics (§12 `secretbox`), as the Python SDK's `GroupKeys`: per
 * topic, keys by `kid`, and the current one, used to encrypt. Older keys stay for
 * opening what was sent under them until `remove()`.
 */
export class GroupKeys {
  #topics = new Map<string, { current: string | undefined; keys: Map<string, Uint8Array> }>();

  add(topic: string, kid: string, key: Uint8Array, opts: { current?: boolean } = {}): void {
    if (!/^[\x21-\x7e]{1,64}$/.test(kid)) throw new RangeError("kid: must be 1..64 printable ASCII chars");
    if (!(key instanceof Uint8Array) || key.length !== 32) throw new RangeError("key: must be 32 bytes");
    let tk = this.#topics.get(topic);
    if (!tk) this.#topics.set(topic, (tk = { current: undefined, keys: new Map() }));
    tk.keys.set(kid, key.slice());
    if (opts.current !== false || tk.current === undefined) tk.current = kid;
  }

  /** Forget one key of `topic`, or all of them (`kid` undefined). */
  remove(topic: string, kid?: string): void {
    const tk = this.#topics.get(topic);
    if (!tk) return;
    if (kid === undefined) {
      this.#topics.delete(topic);
      return;
    }
    tk.keys.delete(kid);
    if (tk.current === kid) tk.current = tk.keys.keys().next().value;
  }

  /** The `[kid, key]` publications to `topic` are encrypted with, if any. */
  current(topic: string): [string, Uint8Array] | undefined {
    const tk = this.#topics.get(topic);
    if (!tk || tk.current === undefined) return undefined;
    return [tk.current, tk.keys.get(tk.current)!];
  }

  get(topic: string, kid: string): Uint8Array | undefined {
    return this.#topics.get(topic)?.keys.get(kid);
  }
}
