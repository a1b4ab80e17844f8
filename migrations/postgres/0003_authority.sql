-- Authority state shared by the STS, coordinator and gateways: pending human approvals,
-- delegation edges between mandates, and revocations (by Biscuit revocation id).

CREATE TABLE approvals (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id       TEXT NOT NULL REFERENCES agents(id) ON DELETE CASCADE,
    -- The exact exchange that was asked for (resources, scopes, lifetime, rules needing approval).
    request        TEXT NOT NULL,
    -- Hash of the credential that asked; only it may collect the mandate.
    requester      TEXT NOT NULL,
    status         TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    decided_at     BIGINT,
    decided_by     TEXT,
    reason         TEXT,
    released_at    BIGINT,
    mandate_id     TEXT,
    last_polled_at BIGINT
);
CREATE INDEX approvals_tenant ON approvals (tenant_id, status, id);

CREATE TABLE delegations (
    id                 TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    parent_mandate     TEXT NOT NULL,
    child_mandate      TEXT NOT NULL UNIQUE,
    parent_agent       TEXT NOT NULL,
    child_agent        TEXT NOT NULL,
    parent_session     TEXT,
    child_session      TEXT,
    scope              TEXT NOT NULL,
    revocation_ids     TEXT NOT NULL,
    depth              BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    expires_at         BIGINT NOT NULL
);
CREATE INDEX delegations_parent ON delegations (tenant_id, parent_mandate);
CREATE INDEX delegations_child_agent ON delegations (tenant_id, child_agent);

-- Revocations. Each names a subject — a Biscuit revocation id, an agent, a session, a mandate
-- or a credential — and revokes every mandate of that subject issued at or before revoked_at.
-- Gateways load the live entries at start, apply the sequenced revocation stream, and
-- reconcile against this table. An entry is useless once every mandate it could match has
-- expired (expires_at) and is then pruned.
CREATE TABLE revocations (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    revoked_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX revocations_expiry ON revocations (expires_at);
CREATE INDEX revocations_tenant ON revocations (tenant_id, kind);
