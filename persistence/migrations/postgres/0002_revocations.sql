-- 0002_revocations: revoked node tokens (docs/protocol.md §2.4, README "Operator surface").
-- kind 'jti': one token, by its jti, kept until `expires`; kind 'node': every token of
-- node `subject` whose iat (ms) is before `issued_before`, kept until `expires` (never,
-- 2^63-1, for POST /v1/tokens/revoke). One row per (kind, subject): a new revocation
-- gives the row a fresh id, and writers take a table lock so that ids commit in order:
-- instances that page by id (hub/revocations.py) never skip one.

CREATE SEQUENCE revocations_id_seq AS bigint;

CREATE TABLE revocations (
    id             bigint NOT NULL DEFAULT nextval('revocations_id_seq') PRIMARY KEY,
    kind           text COLLATE "C" NOT NULL,
    subject        text COLLATE "C" NOT NULL,
    issued_before  bigint,
    created        bigint NOT NULL,
    expires        bigint NOT NULL,
    UNIQUE (kind, subject)
);

ALTER SEQUENCE revocations_id_seq OWNED BY revocations.id;

CREATE INDEX revocations_expires ON revocations (expires);
