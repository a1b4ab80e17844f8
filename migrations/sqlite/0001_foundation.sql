-- Foundation: tenants, the transactional outbox, stream sequences, consumer idempotency.
-- Times are INTEGER microseconds since the Unix epoch (same representation on every backend).

CREATE TABLE tenants (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL,
    version      INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);

-- A state change and its event are written in one transaction; the relay publishes rows in id
-- order and marks them published. Rows are deleted by retention once published.
CREATE TABLE outbox (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    stream       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    tenant_id    TEXT,
    seq          INTEGER,
    body         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    published_at INTEGER
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Per-stream sequence numbers for streams whose consumers must notice a lost event.
CREATE TABLE stream_sequences (
    stream   TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);

-- Idempotent consumers: an event's effect and its id are written in one transaction.
CREATE TABLE consumed_events (
    consumer    TEXT NOT NULL,
    event_id    TEXT NOT NULL,
    consumed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX consumed_events_age ON consumed_events (consumed_at);

-- The embedded bus.
CREATE TABLE bus_streams (
    stream  TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
CREATE TABLE bus_entries (
    stream     TEXT NOT NULL,
    id         INTEGER NOT NULL,
    payload    BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (stream, id)
);
CREATE TABLE bus_groups (
    stream         TEXT NOT NULL,
    grp            TEXT NOT NULL,
    last_delivered INTEGER NOT NULL,
    PRIMARY KEY (stream, grp)
);
CREATE TABLE bus_pending (
    stream       TEXT NOT NULL,
    grp          TEXT NOT NULL,
    entry_id     INTEGER NOT NULL,
    consumer     TEXT NOT NULL,
    delivered_at INTEGER NOT NULL,
    deliveries   INTEGER NOT NULL,
    PRIMARY KEY (stream, grp, entry_id)
);
CREATE INDEX bus_pending_idle ON bus_pending (stream, grp, delivered_at);
CREATE INDEX bus_pending_consumer ON bus_pending (stream, grp, consumer, entry_id);
