-- The ledger's entries, partitioned by sequence range so that retention drops whole
-- partitions (no row-by-row delete, no vacuum debt) while proofs stay valid (see
-- shared/src/store/ledger.rs). Partition `ledger_entries_p<N>` holds
-- seq in [N * partition_size, (N + 1) * partition_size); the appender creates them ahead of
-- the ledger's size, under the ledger's lock. `partition_size` is fixed once the first
-- partition exists (audit.partition_entries sets it before that).
--
-- Event ids stay unique: the appender drops known ids under that same lock before numbering
-- (a unique constraint on a partitioned table would have to include seq).
ALTER TABLE ledger_state ADD COLUMN partition_size BIGINT NOT NULL DEFAULT 4194304;
ALTER TABLE ledger_state ADD COLUMN partitions_below BIGINT NOT NULL DEFAULT 0;

ALTER TABLE ledger_entries RENAME TO ledger_entries_unpartitioned;
ALTER INDEX ledger_entries_pkey RENAME TO ledger_entries_unpartitioned_pkey;
ALTER INDEX ledger_entries_event_id_key RENAME TO ledger_entries_unpartitioned_event_id_key;
DROP INDEX ledger_entries_agent, ledger_entries_resource, ledger_entries_tenant,
    ledger_entries_time, ledger_entries_recorded;

CREATE TABLE ledger_entries (
    seq          BIGINT NOT NULL,
    event_id     TEXT NOT NULL,
    stream       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    tenant_id    TEXT,
    agent_id     TEXT,
    resource_id  TEXT,
    decision     TEXT,
    occurred_at  BIGINT NOT NULL,
    recorded_at  BIGINT NOT NULL,
    body         TEXT NOT NULL,
    leaf_hash    BYTEA NOT NULL,
    PRIMARY KEY (seq)
) PARTITION BY RANGE (seq);

-- Partitions for what the ledger already holds (none while it is empty).
DO $$
DECLARE
    psize BIGINT;
    upto  BIGINT;
    low   BIGINT;
    n     BIGINT := 0;
BEGIN
    SELECT partition_size, size, pruned_below INTO psize, upto, low FROM ledger_state WHERE id = 1;
    n := low / psize;
    WHILE n * psize < upto LOOP
        EXECUTE format('CREATE TABLE ledger_entries_p%s PARTITION OF ledger_entries FOR VALUES FROM (%s) TO (%s)',
                       n, n * psize, (n + 1) * psize);
        n := n + 1;
    END LOOP;
    UPDATE ledger_state SET partitions_below = CASE WHEN upto > 0 THEN n * psize ELSE 0 END WHERE id = 1;
END $$;

INSERT INTO ledger_entries SELECT * FROM ledger_entries_unpartitioned;
DROP TABLE ledger_entries_unpartitioned;

CREATE INDEX ledger_entries_event ON ledger_entries (event_id);
CREATE INDEX ledger_entries_agent ON ledger_entries (agent_id, seq);
CREATE INDEX ledger_entries_resource ON ledger_entries (resource_id, seq);
CREATE INDEX ledger_entries_tenant ON ledger_entries (tenant_id, seq);
CREATE INDEX ledger_entries_time ON ledger_entries (occurred_at);
CREATE INDEX ledger_entries_recorded ON ledger_entries (recorded_at);
