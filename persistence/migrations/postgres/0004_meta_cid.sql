-- 0004_meta_cid: message meta, publication signatures and client message ids
-- (docs/protocol.md §4.1, §4.2, §5.1, §5.2).
-- `meta` (messages, history) is the JSON text of a send's or pub's `meta` map (str keys
-- and values), NULL when it had none: text, not json, so it is neither parsed nor
-- reordered on the way (nullable without a default: no table rewrite, also on the
-- partitions of `messages`, which new day partitions copy through LIKE).
-- `history.sig` is a publication's signature.
-- `dedup` remembers (sender, cid) -> the mid of the message first sent with it until
-- `expires` (ms): written in the transaction that stores that message (the group
-- commit's one upsert per batch), so a row exists only for a stored message, and a
-- repeat committed by another instance meanwhile waits on the row's unique key.
-- purge_expired() deletes rows past `expires`.

ALTER TABLE messages ADD COLUMN meta text;

ALTER TABLE history ADD COLUMN sig bytea, ADD COLUMN meta text;

CREATE TABLE dedup (
    sender   text COLLATE "C" NOT NULL,
    cid      text COLLATE "C" NOT NULL,
    mid      text COLLATE "C" NOT NULL,
    created  bigint NOT NULL,
    expires  bigint NOT NULL,
    PRIMARY KEY (sender, cid)
);

CREATE INDEX dedup_expires ON dedup (expires);
