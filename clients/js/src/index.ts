/**
 * @openred/client: an OpenRed node for browsers and Node.js (protocol v1, docs/protocol.md),
 * with the capabilities and names of the Python SDK (`openred.client`).
 */
export { Client, checkMeta } from "./client.js";
export type {
  ClientEvents, ClientOptions, PublishOptions, ReplyOptions, RequestHandler, RequestOptions, SendOptions, State,
  WebSocketCtor, WebSocketLike, Welcome,
} from "./client.js";
export { Message } from "./message.js";
export type { MessageInit } from "./message.js";
export { PresenceWatch, Subscription } from "./streams.js";
export type { History } from "./streams.js";
export type { Closed, Connected, Disconnected, Event, PresenceChanged, Receipt, StateEvent, SubscriptionRefused, TopicGap } from "./events.js";
export {
  GroupKeys, Identity, ed25519PublicToX25519, forceSoftwareEd25519, secretboxOpen, secretboxSeal, verifySignature,
} from "./crypto.js";
export type { StoredIdentity } from "./crypto.js";
export {
  AuthError, ClientError, ConnectError, ConnectTimeout, ConnectionLost, CryptoError, DecryptError, HubError, OutboxError, OutboxFull,
  RemoteError, RequestTimeout, SubscriptionError,
} from "./errors.js";
export {
  authMessage, bodySigMessage, decodeFrames, encodeFrame, fromHex, isNodeId, isTopic, publicKeyOf, toHex, topicSigMessage,
} from "./codec.js";
export type { Frame, OutboxRecord, OutboxStorage } from "./codec.js";
export { NO_RECONNECT_CODES, backoffDelay, isFinalClose, reconnectDelay } from "./policy.js";
export { deleteIdentity, loadIdentity, loadKeyFile, loadOrCreateIdentity, outboxStorage, saveIdentity, saveKeyFile } from "#platform";
