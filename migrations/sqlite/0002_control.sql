-- Control plane: agents and their workload credentials, resources (with sealed upstream
-- credentials), versioned policies, grants, budgets, signing keys, admin tokens and
-- idempotency records. Every tenant-owned row carries tenant_id and every query filters on it.
-- Booleans are INTEGER 0/1 and JSON is TEXT, identical on both backends.

CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    description TEXT NOT NULL,
    labels      TEXT NOT NULL,
    disabled    INTEGER NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX agents_tenant ON agents (tenant_id, id);

-- API keys are stored only as a keyed hash (HMAC with the pepper key named by hash_kid).
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id     TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash_kid     TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    revoked_at   INTEGER,
    replaced_by  TEXT
);
CREATE INDEX api_keys_agent ON api_keys (tenant_id, agent_id, id);

CREATE TABLE jwt_issuers (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    issuer        TEXT NOT NULL,
    audiences     TEXT NOT NULL,
    jwks_url      TEXT,
    jwks          TEXT,
    subject_claim TEXT NOT NULL,
    max_skew_secs INTEGER NOT NULL,
    version       INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, issuer)
);
CREATE INDEX jwt_issuers_issuer ON jwt_issuers (issuer);

CREATE TABLE mtls_cas (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    ca_pem      TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    version     INTEGER NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);

-- Workload identities bound to an agent: a JWT subject of a trusted issuer, or an mTLS
-- certificate name under a trusted CA.
CREATE TABLE identities (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id   TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL,
    issuer_id  TEXT REFERENCES jwt_issuers(id) ON DELETE CASCADE,
    ca_id      TEXT REFERENCES mtls_cas(id) ON DELETE CASCADE,
    -- issuer_id or ca_id, never NULL, so the uniqueness below holds.
    ref_id     TEXT NOT NULL,
    match_kind TEXT NOT NULL,
    subject    TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    UNIQUE (kind, ref_id, match_kind, subject)
);
CREATE INDEX identities_agent ON identities (tenant_id, agent_id, id);


-- Protected upstreams. The credential is sealed (envelope encryption; the associated data
-- binds it to tenant, resource and credential version).
CREATE TABLE resources (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name             TEXT NOT NULL,
    description      TEXT NOT NULL,
    base_url         TEXT NOT NULL,
    hosts            TEXT NOT NULL,
    inject_kind      TEXT NOT NULL,
    inject_name      TEXT,
    cred_kek_id      TEXT,
    cred_wrapped_dek BLOB,
    cred_nonce       BLOB,
    cred_ciphertext  BLOB,
    cred_version     INTEGER NOT NULL,
    settings         TEXT NOT NULL,
    version          INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX resources_tenant ON resources (tenant_id, id);

CREATE TABLE policies (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL,
    active_version INTEGER,
    latest_version INTEGER NOT NULL,
    version        INTEGER NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX policies_tenant ON policies (tenant_id, id);

-- Immutable policy versions: the document as written and its normalised form.
CREATE TABLE policy_versions (
    policy_id  TEXT NOT NULL REFERENCES policies(id) ON DELETE CASCADE,
    version    INTEGER NOT NULL,
    tenant_id  TEXT NOT NULL,
    format     TEXT NOT NULL,
    source     TEXT NOT NULL,
    normalized TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (policy_id, version)
);

CREATE TABLE grants (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id          TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    resource_id       TEXT NOT NULL REFERENCES resources(id) ON DELETE CASCADE,
    policy_id         TEXT NOT NULL REFERENCES policies(id),
    scopes            TEXT NOT NULL,
    max_lifetime_secs INTEGER NOT NULL,
    version           INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    updated_at        INTEGER NOT NULL,
    UNIQUE (tenant_id, agent_id, resource_id)
);
CREATE INDEX grants_tenant ON grants (tenant_id, id);
CREATE INDEX grants_agent ON grants (tenant_id, agent_id);

CREATE TABLE budgets (
    id           TEXT PRIMARY KEY,
    tenant_id    TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    scope_kind   TEXT NOT NULL,
    scope_id     TEXT,
    unit         TEXT NOT NULL,
    limit_amount INTEGER NOT NULL,
    window_kind  TEXT NOT NULL,
    window_tz    TEXT NOT NULL,
    rolling_secs INTEGER,
    hard         INTEGER NOT NULL,
    version      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    UNIQUE (tenant_id, name)
);
CREATE INDEX budgets_tenant ON budgets (tenant_id, id);

-- Settled spend per budget window (the durable ledger behind the Redis reservations).
CREATE TABLE budget_usage (
    budget_id    TEXT NOT NULL REFERENCES budgets(id) ON DELETE CASCADE,
    window_start INTEGER NOT NULL,
    spent        INTEGER NOT NULL,
    reserved     INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (budget_id, window_start)
);

-- Mandate signing keys (Ed25519). Private keys are sealed with the seal KEK.
CREATE TABLE signing_keys (
    kid            INTEGER PRIMARY KEY,
    alg            TEXT NOT NULL,
    public_key     TEXT NOT NULL,
    priv_kek_id    TEXT NOT NULL,
    priv_wrapped   BLOB NOT NULL,
    priv_nonce     BLOB NOT NULL,
    priv_sealed    BLOB NOT NULL,
    state          TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    activated_at   INTEGER,
    retire_after   INTEGER,
    retired_at     INTEGER
);

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    prefix      TEXT NOT NULL,
    hash_kid    TEXT NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
);
CREATE INDEX admin_tokens_tenant ON admin_tokens (tenant_id, id);

-- Idempotency-Key records: a repeated create returns the first response.
CREATE TABLE idempotency_keys (
    scope        TEXT NOT NULL,
    key          TEXT NOT NULL,
    method       TEXT NOT NULL,
    path         TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status       INTEGER NOT NULL,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_age ON idempotency_keys (created_at);
