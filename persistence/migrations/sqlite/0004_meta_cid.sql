-- 0004_meta_cid: message meta, publication signatures and client message ids
-- (docs/protocol.md §4.1, §4.2, §5.1, §5.2).
-- `meta` (messages, history) is the JSON text of a send's or pub's `meta` map (str keys
-- and values), NULL when it had none; `history.sig` a publication's signature.
-- `dedup` remembers (sender, cid) -> the mid of the message first sent with it until
-- `expires` (ms): written in the transaction that stores that message, so a row exists
-- only for a stored message; purge_expired() deletes rows past `expires`.

ALTER TABLE messages ADD COLUMN meta TEXT;

ALTER TABLE history ADD COLUMN sig BLOB;

ALTER TABLE history ADD COLUMN meta TEXT;

CREATE TABLE dedup (
    sender   TEXT NOT NULL,
    cid      TEXT NOT NULL,
    mid      TEXT NOT NULL,
    created  INTEGER NOT NULL,
    expires  INTEGER NOT NULL,
    PRIMARY KEY (sender, cid)
) WITHOUT ROWID;

CREATE INDEX dedup_expires ON dedup (expires);
