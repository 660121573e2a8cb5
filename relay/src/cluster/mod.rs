//! Running several stateless relay nodes as one cluster.
//!
//! The nodes share their store (PostgreSQL, possibly split into shards) and
//! nothing else; what one node must learn from another travels on the
//! cluster bus:
//!
//! - [`bus`]: inbox moves and device claims as events in one total order
//!   ([`bus::ClusterBus`]; [`pg::PgBus`] on PostgreSQL LISTEN/NOTIFY,
//!   [`bus::MemoryBus`] in process), applied to each node's
//!   [`crate::server::hub::DeviceHub`]: live push across nodes, and the
//!   newest connection of a device wins cluster-wide.
//! - [`shard`]: the shard map (rendezvous hashing of device ids and user
//!   keys) and [`shard::ShardedStore`], a [`crate::store::Store`] over
//!   several stores.
//! - [`limits`]: the rate limits that must hold across nodes
//!   ([`limits::RateLimits`]): in memory on a single node
//!   ([`limits::LocalLimits`]), in PostgreSQL in a cluster
//!   ([`pg::PgLimits`]).
//!
//! `docs/OPERATING.md` ("Running a cluster") describes the deployment.

pub mod bus;
pub mod limits;
pub mod open;
pub mod pg;
pub mod shard;

use std::sync::Arc;

/// What a relay needs to run as a node of a cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    /// This node's id on the bus.
    pub node: bus::NodeId,
    /// The bus.
    pub bus: Arc<dyn bus::ClusterBus>,
    /// The shared rate limits (`None`: this node's own, in memory).
    pub limits: Option<Arc<dyn limits::RateLimits>>,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("node", &self.node)
            .field("shared_limits", &self.limits.is_some())
            .finish_non_exhaustive()
    }
}

impl ClusterOptions {
    /// A node of a cluster whose shard databases are at `urls` (shard `i`
    /// = `urls[i]`, each a PostgreSQL URL, several hosts allowed): a fresh
    /// node id, the LISTEN/NOTIFY bus and the rate limits in shard 0's
    /// database. `store_notifies`: the store sends the inbox NOTIFY inside
    /// its commit transactions (otherwise the bus sends it after commits).
    pub fn postgres(
        urls: &[String],
        rates: limits::Rates,
        store_notifies: bool,
    ) -> Result<ClusterOptions, crate::RelayError> {
        let first = urls
            .first()
            .ok_or_else(|| crate::RelayError::Config("a cluster needs a database".into()))?;
        Ok(ClusterOptions {
            node: bus::NodeId::random(),
            bus: Arc::new(pg::PgBus::new(urls, !store_notifies)?),
            limits: Some(Arc::new(pg::PgLimits::new(first, rates)?)),
        })
    }
}
