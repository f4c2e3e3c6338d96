-- 0001_init: nodes, QoS 1 queues, topic history and audit log (PROTOCOL.md §4-5).
-- Applied once, in one transaction, by persistence/sqlite.py; never edit an applied
-- migration (its checksum is recorded): add 0002_... instead.
-- Times are milliseconds since the epoch; JSON columns hold UTF-8 JSON objects.

CREATE TABLE nodes (
    id          TEXT PRIMARY KEY,
    key         BLOB,
    meta        TEXT NOT NULL DEFAULT '{}',
    banned      INTEGER NOT NULL DEFAULT 0,
    registered  INTEGER NOT NULL DEFAULT 0,
    first_seen  INTEGER NOT NULL,
    last_seen   INTEGER NOT NULL
);

-- seq is the enqueue order; AUTOINCREMENT so a seq is never reused after the newest rows
-- are purged (pending() pages by the seq of `after_mid`, §4 "in its original order").
CREATE TABLE messages (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    mid        TEXT NOT NULL UNIQUE,
    sender     TEXT NOT NULL,
    recipient  TEXT NOT NULL,
    body       BLOB NOT NULL,
    sig        BLOB,
    receipt    INTEGER NOT NULL DEFAULT 0,
    created    INTEGER NOT NULL,
    expires    INTEGER NOT NULL,
    delivered  INTEGER,
    acked      INTEGER
);

-- pending() and the queue bound: "recipient = ? AND acked IS NULL ... ORDER BY seq".
-- expires rides along so the expiry filter and the count are answered from the index.
CREATE INDEX messages_pending ON messages (recipient, acked, seq, expires);
-- purge_expired() housekeeping: expired rows, and acked rows kept a day for message_state.
CREATE INDEX messages_expires ON messages (expires);
CREATE INDEX messages_acked ON messages (acked) WHERE acked IS NOT NULL;

CREATE TABLE topics (
    name      TEXT PRIMARY KEY,
    last_seq  INTEGER NOT NULL
);

CREATE TABLE history (
    topic   TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    mid     TEXT NOT NULL,
    sender  TEXT NOT NULL,
    body    BLOB NOT NULL,
    ts      INTEGER NOT NULL,
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;

CREATE TABLE audit (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ts      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    node    TEXT,
    ip      TEXT,
    detail  TEXT NOT NULL DEFAULT '{}'
);

-- audit_query() is newest first (id DESC) filtered by node, kind and/or ts.
CREATE INDEX audit_node ON audit (node, id);
CREATE INDEX audit_kind ON audit (kind, id);
CREATE INDEX audit_ts ON audit (ts);
