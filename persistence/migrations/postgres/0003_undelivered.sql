-- 0003_undelivered: durable delivery hints (docs/protocol.md §5, §11 "Cluster").
-- One row per recipient that has QoS 1 messages stored by an instance whose broker could
-- not carry them: any instance reads these once its broker is up (and every few
-- seconds), tells the recipient's holder to read its stored queue again, and deletes the
-- row by (recipient, mark), so a mark written after that read survives.
-- `since` is the first time a row was marked (kept across re-marks); `mark` the mid of
-- the latest message marked.

CREATE TABLE undelivered (
    recipient  text COLLATE "C" PRIMARY KEY,
    since      bigint NOT NULL,
    mark       text COLLATE "C" NOT NULL
);

CREATE INDEX undelivered_since ON undelivered (since);
