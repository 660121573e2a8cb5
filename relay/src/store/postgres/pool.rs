//! The blocking bridge and connection pool of the PostgreSQL store.
//!
//! The [`Store`](crate::store::Store) trait is synchronous; `tokio-postgres`
//! is async. The store owns a small private runtime (one worker thread) that
//! drives the connections, and every call blocks its (blocking) caller thread
//! on it. A caller that is itself inside an async context (which the relay
//! avoids, but a stray call must not panic) is served from a scoped helper
//! thread instead.
//!
//! Connections are kept in a small idle list. A connection that failed with
//! anything but a server error (closed socket, primary gone) is dropped
//! together with every idle one — after a failover they all point at the dead
//! primary — and the next call connects afresh; with a multi-host URL and
//! `target_session_attrs=read-write` that finds the new primary.

use super::super::StoreError;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, Config, IsolationLevel, NoTls, Statement, Transaction};

/// Times a transaction is retried after a serialization failure or deadlock.
const CONFLICT_RETRIES: u32 = 5;
/// Connect timeout used when the URL gives none.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a transaction body failed: the database, or a store-level refusal
/// decided inside it (the transaction is rolled back either way).
#[derive(Debug)]
pub(crate) enum TxError {
    /// A query failed.
    Pg(tokio_postgres::Error),
    /// The body refused (e.g. [`StoreError::AlreadyRegistered`]).
    Store(StoreError),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

/// A PostgreSQL error as a [`StoreError`], with its cause.
pub(crate) fn backend(e: &tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(db) => {
            StoreError::Backend(format!("postgres: {} ({})", db.message(), db.code().code()))
        }
        None => StoreError::Backend(format!("postgres: {e}")),
    }
}

/// Whether the error says the connection is unusable (rather than a query
/// the server refused).
fn connection_broken(e: &tokio_postgres::Error) -> bool {
    e.is_closed() || e.as_db_error().is_none_or(|db| is_fatal_code(db.code()))
}

/// Server errors after which the session is gone or read-only (shutdown,
/// terminated backend, a standby that was a primary).
fn is_fatal_code(code: &SqlState) -> bool {
    *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::READ_ONLY_SQL_TRANSACTION
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// The private runtime plus the idle connections.
pub(crate) struct Pool {
    runtime: Option<tokio::runtime::Runtime>,
    config: Config,
    idle: Mutex<Vec<Conn>>,
    max_idle: usize,
    prepare: &'static [Prepare],
}

/// A statement every connection prepares when it opens: its text and its
/// parameter types.
pub(crate) type Prepare = (&'static str, &'static [Type]);

/// A pooled connection and the statements prepared on it.
///
/// Why prepare: an unnamed statement is parsed and planned again on every
/// execution. The commit path runs the same six statements for every group
/// it commits, so planning them once per connection takes that work off
/// every acknowledged send (the plans do not depend on the values: every
/// key is reached through its primary key, see `commit.rs`).
pub(crate) struct Conn {
    client: Client,
    prepared: Vec<(&'static str, Statement)>,
}

impl Conn {
    /// The statement prepared for `sql`, if `sql` is in the pool's list.
    pub(crate) fn prepared(&self, sql: &str) -> Option<&Statement> {
        self.prepared
            .iter()
            .find(|(text, _)| *text == sql)
            .map(|(_, statement)| statement)
    }
}

impl std::ops::Deref for Conn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config holds the password: never print it.
        f.debug_struct("Pool")
            .field("max_idle", &self.max_idle)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool for `url` (a libpq-style URL or key=value string, possibly
    /// multi-host) keeping at most `max_idle` idle connections, each with
    /// the statements of `prepare` prepared.
    pub(crate) fn new(
        url: &str,
        max_idle: usize,
        prepare: &'static [Prepare],
    ) -> Result<Pool, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::Backend(format!("bad postgres url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("hush-relay");
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("hush-postgres")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("postgres runtime: {e}")))?;
        Ok(Pool {
            runtime: Some(runtime),
            config,
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
            prepare,
        })
    }

    /// Run the future `make` returns to completion on the private runtime,
    /// blocking this thread.
    pub(crate) fn block<F, Fut>(&self, make: F) -> Result<Fut::Output, StoreError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future,
        Fut::Output: Send,
    {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| StoreError::Backend("postgres store closed".into()))?;
        if tokio::runtime::Handle::try_current().is_ok() {
            // `block_on` may not nest in another runtime's context.
            std::thread::scope(|s| s.spawn(|| rt.block_on(make())).join())
                .map_err(|_| StoreError::Backend("postgres call panicked".into()))
        } else {
            Ok(rt.block_on(make()))
        }
    }

    /// An idle connection, or a new one.
    async fn get(&self) -> Result<Conn, StoreError> {
        loop {
            let next = match self.idle.lock() {
                Ok(mut idle) => idle.pop(),
                Err(_) => None,
            };
            match next {
                Some(c) if !c.is_closed() => return Ok(c),
                Some(_) => continue,
                None => break,
            }
        }
        let (client, connection) = self.config.connect(NoTls).await.map_err(|e| backend(&e))?;
        tokio::spawn(async move {
            // Ends when the connection closes; its error surfaces on the
            // client's next call.
            let _ = connection.await;
        });
        // Acknowledge nothing before the synchronous standby has it, whatever
        // the server's default.
        client
            .batch_execute("SET synchronous_commit = on")
            .await
            .map_err(|e| backend(&e))?;
        Ok(Conn {
            client,
            prepared: Vec::new(),
        })
    }

    /// Prepare the pool's statements on `conn` unless it has them (the
    /// first time it runs a [`Pool::pipelined`] body: the schema exists
    /// by then, which it may not when the first connection opens).
    async fn prepare(&self, conn: &mut Conn) -> Result<(), tokio_postgres::Error> {
        if conn.prepared.len() == self.prepare.len() {
            return Ok(());
        }
        conn.prepared.clear();
        for &(sql, types) in self.prepare {
            let statement = conn.client.prepare_typed(sql, types).await?;
            conn.prepared.push((sql, statement));
        }
        Ok(())
    }

    fn put(&self, client: Conn) {
        if client.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.max_idle
        {
            idle.push(client);
        }
    }

    /// Forget every idle connection (after one broke: they likely all did).
    fn clear(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    /// Run `body` in one transaction at `level` and commit it. Serialization
    /// failures and deadlocks are retried; other errors roll back and return.
    pub(crate) async fn transaction<T>(
        &self,
        level: IsolationLevel,
        read_only: bool,
        mut body: impl AsyncFnMut(&Transaction<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.get().await?;
            let result = async {
                let tx = client
                    .build_transaction()
                    .isolation_level(level)
                    .read_only(read_only)
                    .start()
                    .await?;
                let value = body(&tx).await?;
                tx.commit().await?;
                Ok::<T, TxError>(value)
            }
            .await;
            match result {
                Ok(v) => {
                    self.put(client);
                    return Ok(v);
                }
                Err(TxError::Store(e)) => {
                    self.put(client);
                    return Err(e);
                }
                Err(TxError::Pg(e)) => {
                    if connection_broken(&e) {
                        drop(client);
                        self.clear();
                        return Err(backend(&e));
                    }
                    self.put(client);
                    if retryable(&e) && attempt <= CONFLICT_RETRIES {
                        continue;
                    }
                    return Err(backend(&e));
                }
            }
        }
    }

    /// Run `body` on one connection that it drives itself: the body sends
    /// its own `BEGIN` and `COMMIT`, pipelined with its statements (see
    /// `commit.rs`). After any error the connection is rolled back before it
    /// is reused (a `ROLLBACK` outside a transaction is harmless), or dropped
    /// when it is broken or the rollback fails. Serialization failures and
    /// deadlocks are retried like in [`Pool::transaction`].
    pub(crate) async fn pipelined<T>(
        &self,
        mut body: impl AsyncFnMut(&Conn) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut client = self.get().await?;
            let ran = match self.prepare(&mut client).await {
                Ok(()) => body(&client).await,
                Err(e) => Err(TxError::Pg(e)),
            };
            let error = match ran {
                Ok(v) => {
                    self.put(client);
                    return Ok(v);
                }
                Err(e) => e,
            };
            let broken = matches!(&error, TxError::Pg(e) if connection_broken(e));
            if broken || client.batch_execute("ROLLBACK").await.is_err() {
                drop(client);
                self.clear();
            } else {
                self.put(client);
            }
            match error {
                TxError::Store(e) => return Err(e),
                TxError::Pg(e) if !broken && retryable(&e) && attempt <= CONFLICT_RETRIES => {}
                TxError::Pg(e) => return Err(backend(&e)),
            }
        }
    }

    /// Run a query outside a transaction (schema checks, settings).
    pub(crate) async fn with_client<T>(
        &self,
        body: impl AsyncFnOnce(&Client) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let client = self.get().await?;
        match body(&client).await {
            Ok(v) => {
                self.put(client);
                Ok(v)
            }
            Err(TxError::Store(e)) => {
                self.put(client);
                Err(e)
            }
            Err(TxError::Pg(e)) => {
                if connection_broken(&e) {
                    self.clear();
                } else {
                    self.put(client);
                }
                Err(backend(&e))
            }
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.clear();
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime inside another one's context panics;
            // shutting it down in the background never does.
            rt.shutdown_background();
        }
    }
}
