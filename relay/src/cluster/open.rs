//! Opening the store of a relay on `--store postgres://…` (repeatable): one
//! [`PgStore`] per shard database, behind a [`ShardedStore`] when there are
//! several.
//!
//! Shard `i` is the `i`-th `--store`. The order is part of the data layout
//! (a device's inbox lives on the shard its id maps to), so each database
//! remembers which shard it is and of how many, in a one-row table
//! `hush_shard` written the first time it is opened as a shard. A node
//! given the databases in another order, a database of another cluster, or
//! another number of shards refuses to start: otherwise it would look for
//! devices on the wrong shard, answer "unknown device" for existing ones
//! and let them register a second time elsewhere. Changing the number of
//! shards is an operator's step (docs/OPERATING.md, "Adding a shard").

use super::pg::pg_config;
use super::shard::ShardedStore;
use crate::error::RelayError;
use crate::store::postgres::{PgOptions, PgStore};
use crate::store::{Store, StoreLimits, StoreSpec};
use std::sync::Arc;
use tokio_postgres::NoTls;

/// The table recording a database's place in the shard map.
pub const SHARD_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS hush_shard (\
     one boolean PRIMARY KEY DEFAULT true CHECK (one), \
     number integer NOT NULL, \
     shards integer NOT NULL)";

/// The opened store and what the relay reports about it.
pub struct OpenedStore {
    /// The store (a [`ShardedStore`] over several shards).
    pub store: Arc<dyn Store>,
    /// Whether every shard's commits wait for a synchronous standby.
    pub replicated: bool,
}

impl std::fmt::Debug for OpenedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedStore")
            .field("replicated", &self.replicated)
            .finish_non_exhaustive()
    }
}

/// Check (or, the first time, record) that the database at `url` is shard
/// `number` of `shards`.
pub async fn claim_shard(url: &str, number: u32, shards: u32) -> Result<(), RelayError> {
    let shown = StoreSpec::redact(url);
    let fail = |e: tokio_postgres::Error| {
        RelayError::Config(format!(
            "shard {number} ({shown}): cannot check its place: {e}"
        ))
    };
    let config = pg_config(url)?;
    let (client, connection) = config.connect(NoTls).await.map_err(fail)?;
    let driver = tokio::spawn(connection);
    let result = async {
        client.batch_execute(SHARD_TABLE_SQL).await.map_err(fail)?;
        let (number_i, shards_i) = (i64::from(number), i64::from(shards));
        // Insert when absent; either way read what the database says.
        client
            .execute(
                "INSERT INTO hush_shard (number, shards) VALUES ($1::bigint::integer, \
                 $2::bigint::integer) ON CONFLICT (one) DO NOTHING",
                &[&number_i, &shards_i],
            )
            .await
            .map_err(fail)?;
        let row = client
            .query_one("SELECT number, shards FROM hush_shard", &[])
            .await
            .map_err(fail)?;
        let (was_number, was_shards): (i32, i32) =
            (row.try_get(0).map_err(fail)?, row.try_get(1).map_err(fail)?);
        if i64::from(was_number) != number_i || i64::from(was_shards) != shards_i {
            return Err(RelayError::Config(format!(
                "--store number {} ({shown}) is shard {was_number} of {was_shards} in its \
                 database, but was given as shard {number} of {shards}: give the --store \
                 URLs in the same order on every node; to add a shard follow the procedure \
                 in OPERATING.md (\"Adding a shard\")",
                number + 1
            )));
        }
        Ok(())
    }
    .await;
    drop(client);
    driver.abort();
    result
}

/// Open the PostgreSQL shard databases at `urls` (shard `i` = `urls[i]`),
/// each with `limits` and `options` (so `max_store_bytes` caps each shard),
/// checking their places in the shard map.
pub async fn open_postgres(
    urls: &[String],
    limits: StoreLimits,
    options: PgOptions,
) -> Result<OpenedStore, RelayError> {
    let n = u32::try_from(urls.len()).map_err(|_| RelayError::Config("too many shards".into()))?;
    if n == 0 {
        return Err(RelayError::Config("no PostgreSQL store given".into()));
    }
    let mut stores: Vec<Arc<dyn Store>> = Vec::with_capacity(urls.len());
    let mut replicated = true;
    for (i, url) in (0u32..).zip(urls) {
        let shown = StoreSpec::redact(url);
        let opening = url.clone();
        let store = tokio::task::spawn_blocking(move || PgStore::open(&opening, limits, options))
            .await
            .map_err(|e| RelayError::Internal(format!("opening store: {e}")))?
            .map_err(|e| {
                if n > 1 {
                    RelayError::Config(format!("shard {i} ({shown}): {e}"))
                } else {
                    e.into()
                }
            })?;
        // Also with one store: a database that is one shard of several
        // must not be opened alone.
        claim_shard(url, i, n).await?;
        if store.replicated() {
            tracing::info!(
                store = %shown,
                shard = i,
                standbys = store.replication().sync_standbys,
                "PostgreSQL store: commits wait for a synchronous standby"
            );
        } else {
            replicated = false;
            tracing::warn!(
                store = %shown,
                shard = i,
                "PostgreSQL store WITHOUT a synchronous standby (--allow-unreplicated): \
                 acknowledged envelopes are only on the primary"
            );
        }
        stores.push(Arc::new(store));
    }
    let store: Arc<dyn Store> = if stores.len() == 1 {
        stores.remove(0)
    } else {
        tracing::info!(
            shards = n,
            "devices are spread over the shards by their ids"
        );
        Arc::new(ShardedStore::new(stores)?)
    };
    Ok(OpenedStore { store, replicated })
}
