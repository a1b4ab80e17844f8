-- The coordinator's state: agent sessions, service leases with fencing, invocations between
-- agents, and per-tenant limits. Delegation edges (0003) link sessions; revocations (0003)
-- carry what a cascade revoked to every gateway.

CREATE TABLE sessions (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    agent_id        TEXT NOT NULL,
    -- The mandate the session was started with, its credential and Biscuit revocation ids.
    mandate_id      TEXT NOT NULL,
    credential      TEXT,
    revocation_ids  TEXT NOT NULL,
    parent_session  TEXT,
    status          TEXT NOT NULL,
    labels          TEXT NOT NULL,
    started_at      BIGINT NOT NULL,
    heartbeat_at    BIGINT NOT NULL,
    -- A session not heard from for `heartbeat_timeout` expires; none lives past `expires_at`.
    heartbeat_timeout_ms BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    ended_at        BIGINT,
    end_reason      TEXT,
    version         BIGINT NOT NULL
);
CREATE INDEX sessions_tenant_status ON sessions (tenant_id, status, id);
CREATE INDEX sessions_agent ON sessions (tenant_id, agent_id, status);
CREATE INDEX sessions_parent ON sessions (parent_session);
CREATE INDEX sessions_credential ON sessions (tenant_id, credential);
CREATE INDEX sessions_active_deadline ON sessions (status, expires_at);

CREATE TABLE leases (
    tenant_id     TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    agent_id      TEXT NOT NULL,
    holder        TEXT,
    -- Fencing: +1 on every acquisition; a holder's writes carry it and stale ones are refused.
    generation    BIGINT NOT NULL,
    ttl_ms        BIGINT NOT NULL,
    acquired_at   BIGINT,
    renewed_at    BIGINT,
    expires_at    BIGINT,
    released_at   BIGINT,
    PRIMARY KEY (tenant_id, name)
);
CREATE INDEX leases_expiry ON leases (expires_at);

CREATE TABLE invocations (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    caller_agent     TEXT NOT NULL,
    caller_session   TEXT,
    target           TEXT NOT NULL,
    operation        TEXT NOT NULL,
    input            TEXT NOT NULL,
    status           TEXT NOT NULL,
    attempt          BIGINT NOT NULL,
    max_attempts     BIGINT NOT NULL,
    backoff_ms       BIGINT NOT NULL,
    deadline_at      BIGINT NOT NULL,
    next_attempt_at  BIGINT NOT NULL,
    worker           TEXT,
    result           TEXT,
    error            TEXT,
    idempotency_key  TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    version          BIGINT NOT NULL
);
CREATE UNIQUE INDEX invocations_idem ON invocations (tenant_id, caller_agent, idempotency_key);
CREATE INDEX invocations_target ON invocations (tenant_id, target, status, next_attempt_at);
CREATE INDEX invocations_session ON invocations (caller_session, status);
CREATE INDEX invocations_deadline ON invocations (status, deadline_at);

CREATE TABLE tenant_limits (
    tenant_id             TEXT PRIMARY KEY REFERENCES tenants(id) ON DELETE CASCADE,
    max_active_sessions   BIGINT,
    max_leases            BIGINT,
    max_open_invocations  BIGINT,
    updated_at            BIGINT NOT NULL
);
