-- Postgres partitions the ledger's entries by sequence range (see the Postgres migration of
-- the same number). The embedded database keeps one table; these columns exist so both
-- backends share one ledger_state shape (partition_size 0: not partitioned).
ALTER TABLE ledger_state ADD COLUMN partition_size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE ledger_state ADD COLUMN partitions_below BIGINT NOT NULL DEFAULT 0;
