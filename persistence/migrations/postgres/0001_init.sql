-- 0001_init: nodes, QoS 1 queues, topic history and audit log (PROTOCOL.md §4-5).
-- Applied once, in one transaction under an advisory lock, by persistence/postgres.py;
-- never edit an applied migration (its checksum is recorded): add 0002_... instead.
-- Times are milliseconds since the epoch (bigint); JSON columns hold JSON objects (json,
-- not jsonb: stored as given, so any JSON the hub accepts round-trips). Text keys use
-- the "C" collation: byte order (as SQLite), and cheaper comparisons in every index.
--
-- `messages` and `audit` are range-partitioned by day on their time column (ms, UTC
-- days). PostgresStore.maintain() creates the day partitions ahead and drops those older
-- than store.retention_days (no big DELETEs); the DEFAULT partitions catch rows whose day
-- has no partition yet, so an insert never fails for want of one.

CREATE TABLE nodes (
    id          text COLLATE "C" PRIMARY KEY,
    key         bytea,
    meta        json NOT NULL DEFAULT '{}',
    banned      boolean NOT NULL DEFAULT false,
    registered  boolean NOT NULL DEFAULT false,
    first_seen  bigint NOT NULL,
    last_seen   bigint NOT NULL
);

-- seq is the enqueue order (pending() pages by the seq of `after_mid`, §4 "in its
-- original order"); a sequence, so a seq is never reused. Uniqueness on a partitioned
-- table must include the partition key: (mid, created). The group commit inserts with
-- ON CONFLICT DO NOTHING, so a repeated (mid, created) fails that one caller only.
CREATE SEQUENCE messages_seq AS bigint;

CREATE TABLE messages (
    seq        bigint NOT NULL DEFAULT nextval('messages_seq'),
    mid        text COLLATE "C" NOT NULL,
    sender     text COLLATE "C" NOT NULL,
    recipient  text COLLATE "C" NOT NULL,
    body       bytea NOT NULL,
    sig        bytea,
    receipt    boolean NOT NULL DEFAULT false,
    created    bigint NOT NULL,
    expires    bigint NOT NULL,
    delivered  bigint,
    acked      bigint,
    PRIMARY KEY (mid, created)
) PARTITION BY RANGE (created);

ALTER SEQUENCE messages_seq OWNED BY messages.seq;

CREATE TABLE messages_default PARTITION OF messages DEFAULT;

-- pending(), count_pending() and the queue bound: "recipient = $1 AND acked IS NULL AND
-- expires > $2 ORDER BY seq". expires rides along so the expiry filter and the count
-- are answered from the index. Lookups by mid (ack, message_state) use the primary key.
CREATE INDEX messages_pending ON messages (recipient, seq) INCLUDE (expires)
    WHERE acked IS NULL;
-- purge_expired() housekeeping: expired rows, and acked rows kept a day for message_state.
CREATE INDEX messages_expires ON messages (expires);
CREATE INDEX messages_acked ON messages (acked) WHERE acked IS NOT NULL;

CREATE TABLE topics (
    name      text COLLATE "C" PRIMARY KEY,
    last_seq  bigint NOT NULL
);

CREATE TABLE history (
    topic   text COLLATE "C" NOT NULL,
    seq     bigint NOT NULL,
    mid     text NOT NULL,
    sender  text NOT NULL,
    body    bytea NOT NULL,
    ts      bigint NOT NULL,
    PRIMARY KEY (topic, seq)
);

CREATE SEQUENCE audit_id_seq AS bigint;

CREATE TABLE audit (
    id      bigint NOT NULL DEFAULT nextval('audit_id_seq'),
    ts      bigint NOT NULL,
    kind    text COLLATE "C" NOT NULL,
    node    text COLLATE "C",
    ip      text,
    detail  json NOT NULL DEFAULT '{}'
) PARTITION BY RANGE (ts);

ALTER SEQUENCE audit_id_seq OWNED BY audit.id;

CREATE TABLE audit_default PARTITION OF audit DEFAULT;

-- audit_query() is newest first (id DESC) filtered by node, kind and/or ts.
CREATE INDEX audit_id ON audit (id);
CREATE INDEX audit_node ON audit (node, id);
CREATE INDEX audit_kind ON audit (kind, id);
CREATE INDEX audit_ts ON audit (ts);
