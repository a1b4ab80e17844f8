-- Foundation: tenants, the transactional outbox, stream sequences, consumer idempotency.
-- Times are BIGINT microseconds since the Unix epoch (same representation on every backend).

CREATE TABLE tenants (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    version      BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- A state change and its event are written in one transaction; the relay publishes rows in id
-- order and marks them published. Rows are deleted by retention once published.
CREATE TABLE outbox (
    id           BIGSERIAL PRIMARY KEY,
    event_id     TEXT NOT NULL UNIQUE,
    stream       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    tenant_id    TEXT,
    seq          BIGINT,
    body         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Per-stream sequence numbers for streams whose consumers must notice a lost event.
CREATE TABLE stream_sequences (
    stream   TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- Idempotent consumers: an event's effect and its id are written in one transaction.
CREATE TABLE consumed_events (
    consumer    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    consumed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX consumed_events_age ON consumed_events (consumed_at);

-- The embedded bus (used with SQLite; present here so the schema is the same everywhere).
CREATE TABLE bus_streams (
    stream  TEXT PRIMARY KEY,
    last_id BIGINT NOT NULL
);
CREATE TABLE bus_entries (
    stream     TEXT NOT NULL,
    id         BIGINT NOT NULL,
    payload    BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (stream, id)
);
CREATE TABLE bus_groups (
    stream         TEXT NOT NULL,
    grp            TEXT NOT NULL,
    last_delivered BIGINT NOT NULL,
    PRIMARY KEY (stream, grp)
);
CREATE TABLE bus_pending (
    stream       TEXT NOT NULL,
    grp          TEXT NOT NULL,
    entry_id     BIGINT NOT NULL,
    consumer     TEXT NOT NULL,
    delivered_at BIGINT NOT NULL,
    deliveries   BIGINT NOT NULL,
    PRIMARY KEY (stream, grp, entry_id)
);
CREATE INDEX bus_pending_idle ON bus_pending (stream, grp, delivered_at);
CREATE INDEX bus_pending_consumer ON bus_pending (stream, grp, consumer, entry_id);
