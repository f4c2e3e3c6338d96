-- 0002_revocations: revoked node tokens (docs/protocol.md §2.4, README "Operator surface").
-- kind 'jti': one token, by its jti, kept until `expires`; kind 'node': every token of
-- node `subject` whose iat (ms) is before `issued_before`, kept until `expires` (never,
-- 2^63-1, for POST /v1/tokens/revoke). One row per (kind, subject): a new revocation
-- replaces the row with a fresh id, so instances that page by id see every change.

CREATE TABLE revocations (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    kind           TEXT NOT NULL,
    subject        TEXT NOT NULL,
    issued_before  INTEGER,
    created        INTEGER NOT NULL,
    expires        INTEGER NOT NULL,
    UNIQUE (kind, subject)
);

CREATE INDEX revocations_expires ON revocations (expires);
