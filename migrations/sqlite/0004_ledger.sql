-- The audit ledger: every event from every service, in one total order. `seq` is the leaf
-- index of the RFC 6962 Merkle tree; `leaf_hash` = SHA-256(0x00 || canonical record), see
-- shared/src/ledger.rs for the encoding. Duplicates (at-least-once delivery) are dropped by
-- event id before a sequence number is assigned.
CREATE TABLE ledger_entries (
    seq          BIGINT PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    stream       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    tenant_id    TEXT,
    agent_id     TEXT,
    resource_id  TEXT,
    decision     TEXT,
    occurred_at  BIGINT NOT NULL,
    recorded_at  BIGINT NOT NULL,
    body         TEXT NOT NULL,
    leaf_hash    BLOB NOT NULL
);
CREATE INDEX ledger_entries_agent ON ledger_entries (agent_id, seq);
CREATE INDEX ledger_entries_resource ON ledger_entries (resource_id, seq);
CREATE INDEX ledger_entries_tenant ON ledger_entries (tenant_id, seq);
CREATE INDEX ledger_entries_time ON ledger_entries (occurred_at);
CREATE INDEX ledger_entries_recorded ON ledger_entries (recorded_at);

-- Hashes of complete aligned subtrees (level >= 1; level 0 is ledger_entries.leaf_hash):
-- node (level, idx) covers leaves [idx * 2^level, (idx + 1) * 2^level). Every proof is a
-- handful of these.
CREATE TABLE ledger_nodes (
    level  INTEGER NOT NULL,
    idx    BIGINT NOT NULL,
    hash   BLOB NOT NULL,
    PRIMARY KEY (level, idx)
);

-- One row: the ledger's size (the next seq) and how far retention has pruned leaf bodies.
CREATE TABLE ledger_state (
    id            INTEGER PRIMARY KEY,
    size          BIGINT NOT NULL,
    pruned_below  BIGINT NOT NULL
);
INSERT INTO ledger_state (id, size, pruned_below) VALUES (1, 0, 0);

-- Signed tree heads (ECDSA P-256 over the checkpoint text).
CREATE TABLE ledger_heads (
    tree_size  BIGINT PRIMARY KEY,
    root_hash  TEXT NOT NULL,
    signed_at  BIGINT NOT NULL,
    key_id     TEXT NOT NULL,
    signature  TEXT NOT NULL
);
CREATE INDEX ledger_heads_time ON ledger_heads (signed_at);

-- Tree-head signing keys; the private key is sealed (keys.seal) and bound to its key id.
CREATE TABLE ledger_keys (
    key_id        TEXT PRIMARY KEY,
    public_key    TEXT NOT NULL,
    priv_kek_id   TEXT NOT NULL,
    priv_wrapped  BLOB NOT NULL,
    priv_nonce    BLOB NOT NULL,
    priv_sealed   BLOB NOT NULL,
    state         TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);
