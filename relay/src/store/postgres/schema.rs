//! The schema of the PostgreSQL store, its version check and the
//! replication check made at start-up. `docs/STORAGE.md` ("PostgreSQL store")
//! describes every table.

use super::super::StoreError;
use super::pool::{Pool, TxError};
use tokio_postgres::IsolationLevel;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i64 = 1;

/// Number of rows of `hush_totals` (see [`super::PgStore::stored_bytes`]).
pub(crate) const TOTAL_STRIPES: i16 = 16;

/// Version 1 of the schema. Every statement is idempotent, so two relays
/// starting at once against an empty database both succeed (the version row
/// is written under an advisory lock, see [`migrate`]).
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS hush_devices (
    device           bytea  PRIMARY KEY,
    user_key         bytea  NOT NULL,
    signing_key      bytea  NOT NULL,
    agreement_key    bytea  NOT NULL,
    user_signature   bytea  NOT NULL,
    registered_at_ms bigint NOT NULL,
    last_seen_ms     bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS hush_devices_user ON hush_devices (user_key);
CREATE INDEX IF NOT EXISTS hush_devices_seen ON hush_devices (last_seen_ms);
CREATE TABLE IF NOT EXISTS hush_removed_devices (
    device        bytea  PRIMARY KEY,
    removed_at_ms bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS hush_users (
    user_key bytea PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS hush_inboxes (
    device   bytea  PRIMARY KEY,
    head     bigint NOT NULL DEFAULT 0,
    acked    bigint NOT NULL DEFAULT 0,
    depth    bigint NOT NULL DEFAULT 0,
    bytes    bigint NOT NULL DEFAULT 0,
    purge_at bigint
);
CREATE INDEX IF NOT EXISTS hush_inboxes_purge ON hush_inboxes (purge_at, device)
    WHERE purge_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS hush_envelopes (
    device        bytea  NOT NULL,
    seq           bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    sender        bytea  NOT NULL,
    conversation  bytea  NOT NULL,
    sender_seq    bigint NOT NULL,
    body          bytea  NOT NULL,
    PRIMARY KEY (device, seq)
);
ALTER TABLE hush_envelopes ALTER COLUMN body SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS hush_dedup (
    recipient     bytea  NOT NULL,
    sender        bytea  NOT NULL,
    message_id    bytea  NOT NULL,
    seq           bigint NOT NULL,
    expires_at_ms bigint NOT NULL,
    PRIMARY KEY (recipient, sender, message_id)
);
CREATE INDEX IF NOT EXISTS hush_dedup_expiry ON hush_dedup (expires_at_ms);
CREATE TABLE IF NOT EXISTS hush_tombstones (
    device       bytea  NOT NULL,
    seq          bigint NOT NULL,
    sender       bytea  NOT NULL,
    conversation bytea  NOT NULL,
    sender_seq   bigint NOT NULL,
    PRIMARY KEY (device, seq)
);
CREATE TABLE IF NOT EXISTS hush_signed_prekeys (
    device bytea PRIMARY KEY,
    prekey bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS hush_one_time_prekeys (
    device bytea  NOT NULL,
    id     bigint NOT NULL,
    public bytea  NOT NULL,
    PRIMARY KEY (device, id)
);
CREATE TABLE IF NOT EXISTS hush_device_lists (
    user_key bytea  PRIMARY KEY,
    version  bigint NOT NULL,
    list     bytea  NOT NULL
);
CREATE TABLE IF NOT EXISTS hush_totals (
    stripe smallint PRIMARY KEY,
    depth  bigint NOT NULL DEFAULT 0,
    stored bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS hush_blobs (
    blob          bytea  PRIMARY KEY,
    owner         bytea  NOT NULL,
    total_len     bigint NOT NULL,
    committed     bigint NOT NULL,
    created_at_ms bigint NOT NULL,
    expires_at_ms bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS hush_blobs_owner ON hush_blobs (owner);
CREATE INDEX IF NOT EXISTS hush_blobs_expiry ON hush_blobs (expires_at_ms);
CREATE TABLE IF NOT EXISTS hush_blob_chunks (
    blob     bytea  NOT NULL,
    \"offset\" bigint NOT NULL,
    bytes    bytea  NOT NULL,
    PRIMARY KEY (blob, \"offset\")
);
ALTER TABLE hush_blob_chunks ALTER COLUMN bytes SET STORAGE EXTERNAL;
INSERT INTO hush_totals (stripe) SELECT generate_series(0, 15)::smallint
    ON CONFLICT (stripe) DO NOTHING;
";

/// Key of the advisory lock taken while creating or checking the schema
/// (`hush` in ASCII).
const MIGRATION_LOCK: i64 = 0x6875_7368;

/// Create the schema on first start, or check that the stored version is one
/// this build understands. A newer version is refused: an older relay must
/// not write a schema it does not know.
pub(crate) async fn migrate(pool: &Pool) -> Result<(), StoreError> {
    pool.transaction(IsolationLevel::ReadCommitted, false, async |tx| {
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS hush_meta (key text PRIMARY KEY, value bigint NOT NULL)",
        )
        .await?;
        let stored: Option<i64> = tx
            .query_opt(
                "SELECT value FROM hush_meta WHERE key = 'schema_version'",
                &[],
            )
            .await?
            .map(|row| row.get(0));
        match stored {
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            Some(v) if v > SCHEMA_VERSION => Err(TxError::Store(StoreError::Backend(format!(
                "the database has schema version {v}, newer than this relay's \
                 {SCHEMA_VERSION}: upgrade the relay"
            )))),
            Some(v) => Err(TxError::Store(StoreError::Backend(format!(
                "the database has unknown schema version {v}"
            )))),
            None => {
                tx.batch_execute(SCHEMA_V1).await?;
                tx.execute(
                    "INSERT INTO hush_meta (key, value) VALUES ('schema_version', $1)",
                    &[&SCHEMA_VERSION],
                )
                .await?;
                Ok(())
            }
        }
    })
    .await
}

/// What the start-up replication check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replication {
    /// `synchronous_standby_names` of the primary.
    pub standby_names: String,
    /// Standbys the primary reports in state `sync` or `quorum`.
    pub sync_standbys: i64,
}

impl Replication {
    /// Whether a commit acknowledged by this primary is also on a standby.
    pub fn is_synchronous(&self) -> bool {
        !self.standby_names.trim().is_empty() && self.sync_standbys > 0
    }
}

/// Ask the primary whether commits wait for a synchronous standby.
pub(crate) async fn replication(pool: &Pool) -> Result<Replication, StoreError> {
    pool.with_client(async |c| {
        let names: String = c
            .query_one("SELECT current_setting('synchronous_standby_names')", &[])
            .await?
            .get(0);
        let sync_standbys: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE sync_state IN ('sync', 'quorum')",
                &[],
            )
            .await?
            .get(0);
        Ok(Replication {
            standby_names: names,
            sync_standbys,
        })
    })
    .await
}
