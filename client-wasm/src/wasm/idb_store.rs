//! IndexedDB storage: the browser's durable home of a device.
//!
//! One database per storage name (`hush-client/<name>`), so two pages that
//! open different storage names are two independent devices. Two object
//! stores hold the engine's records under their full binary keys (IndexedDB
//! orders binary keys bytewise, exactly the order [`crate::storage::keys`]
//! is designed for):
//!
//! - `state` — the `s/…` namespace, read whole at start-up;
//! - `history` — the `h/…` namespace, paged by the app and never loaded
//!   into the engine.
//!
//! [`IdbStore::begin`] is the driver contract's "durable first": the whole
//! batch (one or several engine steps) goes into ONE readwrite transaction
//! with `durability: "strict"` (the browser flushes to disk before reporting
//! completion), and the returned [`Commit`] settles only when the
//! transaction's `complete` event fired. An aborted or failed transaction
//! applies none of the batch. A message's two history records are written
//! packed with the other messages of the batch (see `pack`): IndexedDB
//! charges per record, so a 200-message page costs a handful of puts, not
//! 400.
//!
//! Every value is sealed ([`crate::storage::seal`]): ChaCha20-Poly1305 in
//! wasm, synchronous, under a random 32-byte data key. The data key is kept
//! in a third store, `keys`, wrapped (AES-256-GCM) by a WebCrypto key made
//! with `extractable: false` and stored beside it as a `CryptoKey`: script
//! can use that key through `crypto.subtle` but cannot read its bytes. At
//! open the data key is unwrapped once. A version-1 database (plaintext
//! values) is upgraded on open: every record is sealed in one transaction
//! together with the new wrapped key.

use super::pack::{self, Write};
use crate::StorageError;
use crate::storage::StorageOp;
use crate::storage::keys;
use crate::storage::seal::{self, StoreKey};
use idb::{CursorDirection, Factory, KeyRange, ObjectStore, Query, Transaction};
use js_sys::{ArrayBuffer, JsString, Uint8Array};
use std::future::IntoFuture;
use std::rc::Rc;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{IdbDatabase, IdbTransactionDurability, IdbTransactionMode, IdbTransactionOptions};

/// A transaction in flight: settles when it committed (or failed).
pub(crate) type Commit =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), StorageError>>>>;

const STATE: &str = "state";
const HISTORY: &str = "history";
/// The wrapping `CryptoKey` (`wrap`) and the wrapped data key (`data`).
const KEYS: &str = "keys";
const WRAP_KEY: &str = "wrap";
const DATA_KEY: &str = "data";
/// AES-GCM IV length for the wrapped data key.
const WRAP_IV_LEN: usize = 12;
/// Version of the database layout (bumped with an upgrade step if the
/// object stores ever change). 2: values sealed, `keys` store added.
const DB_VERSION: u32 = 2;

/// The IndexedDB database name of a storage name.
pub(crate) fn database_name(storage: &str) -> String {
    format!("hush-client/{storage}")
}

fn backend(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Backend(format!("IndexedDB {what}: {e}"))
}

fn js_backend(what: &str, e: &JsValue) -> StorageError {
    let text = e
        .dyn_ref::<js_sys::Error>()
        .map(|err| String::from(err.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| "unknown error".into());
    StorageError::Backend(format!("IndexedDB {what}: {text}"))
}

/// The bytes of a stored key or value (an `ArrayBuffer` or a typed array).
fn bytes_of(key_hint: &[u8], v: &JsValue) -> Result<Vec<u8>, StorageError> {
    if v.is_instance_of::<ArrayBuffer>() || v.is_instance_of::<Uint8Array>() {
        Ok(Uint8Array::new(v).to_vec())
    } else {
        Err(StorageError::Corrupt {
            key: keys::printable(key_hint),
        })
    }
}

fn js_bytes(b: &[u8]) -> JsValue {
    Uint8Array::from(b).into()
}

fn store_for(key: &[u8]) -> &'static str {
    if key.starts_with(keys::HISTORY) {
        HISTORY
    } else {
        STATE
    }
}

/// Keys `[prefix, upper)` where `upper` is the end of the prefix or `before`,
/// whichever is lower.
fn prefix_range(prefix: &[u8], before: Option<&[u8]>) -> Result<KeyRange, StorageError> {
    let upper = match (before, keys::prefix_end(prefix)) {
        (Some(b), Some(end)) => Some(b.min(end.as_slice()).to_vec()),
        (Some(b), None) => Some(b.to_vec()),
        (None, end) => end,
    };
    let lower = js_bytes(prefix);
    match upper {
        Some(u) => KeyRange::bound(&lower, &js_bytes(&u), Some(false), Some(true)),
        None => KeyRange::lower_bound(&lower, Some(false)),
    }
    .map_err(|e| backend("key range", e))
}

/// The batch of several steps committed together, without the engine-state
/// writes a later step of the group overwrites.
///
/// Each step writes the records it changed (cursor, sessions, streams…), so
/// a group of three pages writes most of them three times; IndexedDB charges
/// per `put`, and inside one transaction only the last write of a key
/// counts. Only `s/…` keys are coalesced: history writes come in the pairs
/// the packer looks for and are never written twice.
pub(crate) fn last_writes(batch: Vec<StorageOp>) -> Vec<StorageOp> {
    let key_of = |op: &StorageOp| match op {
        StorageOp::Put { key, .. } | StorageOp::Delete { key } => key.clone(),
    };
    let mut later = std::collections::HashSet::new();
    let mut keep = vec![true; batch.len()];
    for (i, op) in batch.iter().enumerate().rev() {
        let key = key_of(op);
        if key.starts_with(keys::STATE) && !later.insert(key) {
            keep[i] = false;
        }
    }
    batch
        .into_iter()
        .zip(keep)
        .filter_map(|(op, keep)| keep.then_some(op))
        .collect()
}

/// An open client database.
pub(crate) struct IdbStore {
    db: IdbDatabase,
    name: String,
    key: Rc<StoreKey>,
    // Keeps the `versionchange` handler alive as long as the connection.
    _on_version_change: Closure<dyn FnMut(web_sys::Event)>,
}

impl std::fmt::Debug for IdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdbStore")
            .field("name", &self.name)
            .finish()
    }
}

impl IdbStore {
    /// Open (creating on first use) the database of a storage name.
    pub async fn open(storage: &str) -> Result<IdbStore, StorageError> {
        let name = database_name(storage);
        let factory = Factory::new().map_err(|e| backend("is not available", e))?;
        let mut request = factory
            .open(&name, Some(DB_VERSION))
            .map_err(|e| backend("open", e))?;
        request.on_upgrade_needed(|event| {
            use idb::DatabaseEvent;
            // Runs inside the versionchange transaction; a failure here
            // aborts it and the open request below reports the error.
            if let Ok(db) = event.database() {
                let names = db.store_names();
                for store in [STATE, HISTORY, KEYS] {
                    if !names.iter().any(|n| n == store) {
                        let _ = db.create_object_store(store, idb::ObjectStoreParams::new());
                    }
                }
            }
        });
        let database = request.await.map_err(|e| backend("open", e))?;
        let db = IdbDatabase::from(database);
        let names = db.object_store_names();
        for store in [STATE, HISTORY, KEYS] {
            if !names.contains(store) {
                db.close();
                return Err(StorageError::Backend(format!(
                    "IndexedDB database `{name}` has no `{store}` store (not a Hush client database?)"
                )));
            }
        }
        // Another page deleting or upgrading this database must not be
        // blocked forever by this connection: close it. Later writes then
        // fail with a storage error, which the app sees.
        let handle = db.clone();
        let on_version_change =
            Closure::<dyn FnMut(web_sys::Event)>::new(move |_e: web_sys::Event| handle.close());
        db.set_onversionchange(Some(on_version_change.as_ref().unchecked_ref()));
        let key = match unlock(&db).await {
            Ok(k) => k,
            Err(e) => {
                db.set_onversionchange(None);
                db.close();
                return Err(e);
            }
        };
        Ok(IdbStore {
            db,
            name,
            key: Rc::new(key),
            _on_version_change: on_version_change,
        })
    }

    /// Close the connection (pending transactions still finish).
    pub fn close(&self) {
        self.db.set_onversionchange(None);
        self.db.close();
    }

    fn transaction(&self, mode: IdbTransactionMode) -> Result<Transaction, StorageError> {
        let stores = [JsString::from(STATE), JsString::from(HISTORY)];
        let options = IdbTransactionOptions::new();
        // Durable before "complete": what the driver contract needs. Read
        // transactions ignore the hint.
        options.set_durability(IdbTransactionDurability::Strict);
        let txn = self
            .db
            .transaction_with_str_sequence_and_mode_and_options(&stores, mode, &options)
            .map_err(|e| js_backend("transaction", &e))?;
        Ok(Transaction::from(txn))
    }

    fn stores(txn: &Transaction) -> Result<(ObjectStore, ObjectStore), StorageError> {
        let state = txn
            .object_store(STATE)
            .map_err(|e| backend("object store", e))?;
        let history = txn
            .object_store(HISTORY)
            .map_err(|e| backend("object store", e))?;
        Ok((state, history))
    }

    /// Apply a batch atomically and durably: one readwrite transaction,
    /// awaited until the browser reports it committed.
    pub async fn apply(&self, batch: &[StorageOp]) -> Result<(), StorageError> {
        match self.begin(batch)? {
            Some(commit) => commit.await,
            None => Ok(()),
        }
    }

    /// Queue a batch in a new readwrite transaction and return at once; the
    /// returned future settles when the browser reports the transaction
    /// committed (durably) or failed. `None` for an empty batch.
    ///
    /// IndexedDB runs readwrite transactions over the same stores one after
    /// the other in the order they were created, so a later `begin` never
    /// commits before an earlier one. (The driver still only begins a
    /// transaction once the previous one committed: a later transaction
    /// must not commit after an earlier one failed.)
    pub fn begin(&self, batch: &[StorageOp]) -> Result<Option<Commit>, StorageError> {
        if batch.is_empty() {
            return Ok(None);
        }
        let txn = self.transaction(IdbTransactionMode::Readwrite)?;
        let (state, history) = Self::stores(&txn)?;
        let store = |key: &[u8]| {
            if store_for(key) == HISTORY {
                &history
            } else {
                &state
            }
        };
        // Requests are queued in order; a failing one aborts the whole
        // transaction, which the completion below reports. The values are
        // plain `Uint8Array`s (the cheapest thing to structured-clone), and
        // a message's two history records travel packed (see `pack`).
        let mut rng = seal::rng()?;
        for write in pack::pack_batch(batch) {
            match write {
                Write::Put(key, value) => {
                    let sealed = seal::seal(&self.key, &mut rng, key, value)?;
                    store(key)
                        .put(&js_bytes(&sealed), Some(&js_bytes(key)))
                        .map_err(|e| backend("put", e))?;
                }
                Write::PutOwned(key, value) => {
                    let sealed = seal::seal(&self.key, &mut rng, &key, &value)?;
                    store(&key)
                        .put(&js_bytes(&sealed), Some(&js_bytes(&key)))
                        .map_err(|e| backend("put", e))?;
                }
                Write::Delete(key) => {
                    store(key)
                        .delete(Query::Key(js_bytes(key)))
                        .map_err(|e| backend("delete", e))?;
                }
            }
        }
        let done = txn
            .commit()
            .map_err(|e| backend("commit", e))?
            .into_future();
        Ok(Some(Box::pin(async move {
            let outcome = done.await.map_err(|e| backend("transaction", e))?;
            if outcome.is_committed() {
                Ok(())
            } else {
                Err(StorageError::Backend(
                    "IndexedDB transaction was aborted (quota exceeded or database closed?)".into(),
                ))
            }
        })))
    }

    /// Every engine record (`s/…`), ascending by key.
    pub async fn load_state(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let txn = self.transaction(IdbTransactionMode::Readonly)?;
        let (state, _) = Self::stores(&txn)?;
        let range = prefix_range(keys::STATE, None)?;
        // Both requests get their handlers now (`into_future`), before the
        // first answer can arrive.
        let keys_req = state
            .get_all_keys(Some(Query::KeyRange(range.clone())), None)
            .map_err(|e| backend("read", e))?
            .into_future();
        let values_req = state
            .get_all(Some(Query::KeyRange(range)), None)
            .map_err(|e| backend("read", e))?
            .into_future();
        let ks = keys_req.await.map_err(|e| backend("read", e))?;
        let vs = values_req.await.map_err(|e| backend("read", e))?;
        if ks.len() != vs.len() {
            return Err(StorageError::Backend(
                "IndexedDB returned different numbers of keys and values".into(),
            ));
        }
        let mut out = Vec::with_capacity(ks.len());
        for (k, v) in ks.iter().zip(vs.iter()) {
            let key = bytes_of(b"s/?", k)?;
            let value = seal::open(&self.key, &key, &bytes_of(&key, v)?)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// A read-only view for several reads that see one consistent snapshot.
    pub fn reader(&self) -> Result<Reader, StorageError> {
        let txn = self.transaction(IdbTransactionMode::Readonly)?;
        let (state, history) = Self::stores(&txn)?;
        Ok(Reader {
            _txn: txn,
            state,
            history,
            key: Rc::clone(&self.key),
        })
    }
}

/// Reads inside one read-only transaction.
///
/// IndexedDB ends a transaction once no request is pending when control
/// returns to the event loop, so a reader must only await its own requests
/// (never timers or the network) and be dropped after its last read.
pub(crate) struct Reader {
    _txn: Transaction,
    state: ObjectStore,
    history: ObjectStore,
    key: Rc<StoreKey>,
}

impl Reader {
    fn store(&self, key: &[u8]) -> &ObjectStore {
        if store_for(key) == HISTORY {
            &self.history
        } else {
            &self.state
        }
    }

    /// Start reading one record; await the result with [`PendingGet::value`].
    /// Starting several reads before awaiting any lets IndexedDB serve them
    /// in one go (each gets its handlers at once, so none can be missed).
    pub fn start_get(&self, key: &[u8]) -> Result<PendingGet, StorageError> {
        let req = self
            .store(key)
            .get(Query::Key(js_bytes(key)))
            .map_err(|e| backend("read", e))?
            .into_future();
        Ok(PendingGet {
            key: key.to_vec(),
            store_key: Rc::clone(&self.key),
            req,
        })
    }

    /// Up to `limit` records under `prefix` strictly below `before`, in
    /// descending key order (the same contract as `Storage::scan_back`).
    pub async fn scan_back(
        &self,
        prefix: &[u8],
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        let range = prefix_range(prefix, before)?;
        let cursor = self
            .store(prefix)
            .open_cursor(Some(Query::KeyRange(range)), Some(CursorDirection::Prev))
            .map_err(|e| backend("cursor", e))?
            .await
            .map_err(|e| backend("cursor", e))?;
        let Some(cursor) = cursor else {
            return Ok(out);
        };
        let mut cursor = cursor.into_managed();
        while out.len() < limit {
            let (Some(k), Some(v)) = (
                cursor.key().map_err(|e| backend("cursor", e))?,
                cursor.value().map_err(|e| backend("cursor", e))?,
            ) else {
                break;
            };
            let key = bytes_of(prefix, &k)?;
            let value = seal::open(&self.key, &key, &bytes_of(&key, &v)?)?;
            out.push((key, value));
            if out.len() < limit {
                cursor.next(None).await.map_err(|e| backend("cursor", e))?;
            }
        }
        Ok(out)
    }
}

/// A read in flight.
pub(crate) struct PendingGet {
    key: Vec<u8>,
    store_key: Rc<StoreKey>,
    req: idb::request::futures::GetStoreRequestFuture,
}

impl PendingGet {
    /// The record, once IndexedDB answered.
    pub async fn value(self) -> Result<Option<Vec<u8>>, StorageError> {
        let v = self.req.await.map_err(|e| backend("read", e))?;
        match v {
            Some(v) if !v.is_undefined() => Ok(Some(seal::open(
                &self.store_key,
                &self.key,
                &bytes_of(&self.key, &v)?,
            )?)),
            _ => Ok(None),
        }
    }
}

/// `crypto.subtle` of the page or worker.
fn subtle() -> Result<web_sys::SubtleCrypto, StorageError> {
    let crypto = js_sys::Reflect::get(&js_sys::global(), &JsValue::from_str("crypto"))
        .ok()
        .filter(|c| !c.is_undefined() && !c.is_null())
        .ok_or_else(|| StorageError::Backend("WebCrypto is not available".into()))?;
    Ok(crypto.unchecked_into::<web_sys::Crypto>().subtle())
}

/// `{ name: "AES-GCM", ...extra }`.
fn aes_gcm(extra: &[(&str, JsValue)]) -> Result<js_sys::Object, StorageError> {
    let o = js_sys::Object::new();
    let set = |k: &str, v: &JsValue| {
        js_sys::Reflect::set(&o, &JsValue::from_str(k), v).map_err(|e| js_backend("WebCrypto", &e))
    };
    set("name", &JsValue::from_str("AES-GCM"))?;
    for (k, v) in extra {
        set(k, v)?;
    }
    Ok(o)
}

async fn promise(p: Result<js_sys::Promise, JsValue>) -> Result<JsValue, StorageError> {
    let p = p.map_err(|e| js_backend("WebCrypto", &e))?;
    wasm_bindgen_futures::JsFuture::from(p)
        .await
        .map_err(|e| js_backend("WebCrypto", &e))
}

/// The database's data key: unwrapped with its non-extractable WebCrypto
/// key, or, on first use (or for a version-1 database), made, wrapped and
/// stored together with every existing record sealed under it, in one
/// transaction.
async fn unlock(db: &IdbDatabase) -> Result<StoreKey, StorageError> {
    let subtle = subtle()?;
    let (wrap, data) = {
        let txn = db
            .transaction_with_str_and_mode(KEYS, IdbTransactionMode::Readonly)
            .map_err(|e| js_backend("transaction", &e))?;
        let txn = Transaction::from(txn);
        let keys = txn
            .object_store(KEYS)
            .map_err(|e| backend("object store", e))?;
        let wrap = keys
            .get(Query::Key(JsValue::from_str(WRAP_KEY)))
            .map_err(|e| backend("read", e))?
            .into_future();
        let data = keys
            .get(Query::Key(JsValue::from_str(DATA_KEY)))
            .map_err(|e| backend("read", e))?
            .into_future();
        let wrap = wrap.await.map_err(|e| backend("read", e))?;
        let data = data.await.map_err(|e| backend("read", e))?;
        (wrap, data)
    };
    if let (Some(wrap), Some(data)) = (wrap, data) {
        let wrap: web_sys::CryptoKey = wrap.dyn_into().map_err(|_| StorageError::Corrupt {
            key: "keys/wrap".into(),
        })?;
        let data = bytes_of(b"keys/data", &data)?;
        let (iv, ct) = data
            .split_at_checked(WRAP_IV_LEN)
            .ok_or_else(|| StorageError::Corrupt {
                key: "keys/data".into(),
            })?;
        let params = aes_gcm(&[("iv", Uint8Array::from(iv).into())])?;
        let plain = promise(subtle.decrypt_with_object_and_u8_array(&params, &wrap, ct))
            .await
            .map_err(|_| {
                StorageError::WrongKey(
                    "the browser's key does not unwrap this database's key".into(),
                )
            })?;
        let mut raw = zeroize::Zeroizing::new(Uint8Array::new(&plain).to_vec());
        let bytes: [u8; seal::KEY_LEN] =
            raw.as_slice()
                .try_into()
                .map_err(|_| StorageError::Corrupt {
                    key: "keys/data".into(),
                })?;
        zeroize::Zeroize::zeroize(&mut *raw);
        return Ok(StoreKey::from_bytes(bytes));
    }
    // First use: a non-extractable AES-GCM key and a random data key.
    let usages = js_sys::Array::of2(&"encrypt".into(), &"decrypt".into());
    let gen_params = aes_gcm(&[("length", JsValue::from_f64(256.0))])?;
    let wrap: web_sys::CryptoKey =
        promise(subtle.generate_key_with_object(&gen_params, false, &usages))
            .await?
            .dyn_into()
            .map_err(|_| StorageError::Backend("WebCrypto generated no CryptoKey".into()))?;
    let key = StoreKey::generate()?;
    let mut iv = [0u8; WRAP_IV_LEN];
    getrandom::fill(&mut iv).map_err(|e| StorageError::Backend(format!("no randomness: {e}")))?;
    let params = aes_gcm(&[("iv", Uint8Array::from(&iv[..]).into())])?;
    let ct =
        promise(subtle.encrypt_with_object_and_u8_array(&params, &wrap, key.as_bytes())).await?;
    let mut wrapped = iv.to_vec();
    wrapped.extend(Uint8Array::new(&ct).to_vec());

    let stores = [
        JsString::from(STATE),
        JsString::from(HISTORY),
        JsString::from(KEYS),
    ];
    let options = IdbTransactionOptions::new();
    options.set_durability(IdbTransactionDurability::Strict);
    let txn = db
        .transaction_with_str_sequence_and_mode_and_options(
            &stores,
            IdbTransactionMode::Readwrite,
            &options,
        )
        .map_err(|e| js_backend("transaction", &e))?;
    let txn = Transaction::from(txn);
    let mut rng = seal::rng()?;
    for name in [STATE, HISTORY] {
        // Records of a version-1 database are plaintext: seal them.
        let store = txn
            .object_store(name)
            .map_err(|e| backend("object store", e))?;
        let ks = store
            .get_all_keys(None, None)
            .map_err(|e| backend("read", e))?
            .into_future();
        let vs = store
            .get_all(None, None)
            .map_err(|e| backend("read", e))?
            .into_future();
        let ks = ks.await.map_err(|e| backend("read", e))?;
        let vs = vs.await.map_err(|e| backend("read", e))?;
        if ks.len() != vs.len() {
            return Err(StorageError::Backend(
                "IndexedDB returned different numbers of keys and values".into(),
            ));
        }
        for (k, v) in ks.iter().zip(vs.iter()) {
            let k = bytes_of(b"?", k)?;
            let v = zeroize::Zeroizing::new(bytes_of(&k, v)?);
            let sealed = seal::seal(&key, &mut rng, &k, &v)?;
            store
                .put(&js_bytes(&sealed), Some(&js_bytes(&k)))
                .map_err(|e| backend("put", e))?;
        }
    }
    let keys = txn
        .object_store(KEYS)
        .map_err(|e| backend("object store", e))?;
    keys.put(&wrap, Some(&JsValue::from_str(WRAP_KEY)))
        .map_err(|e| backend("put", e))?;
    keys.put(&js_bytes(&wrapped), Some(&JsValue::from_str(DATA_KEY)))
        .map_err(|e| backend("put", e))?;
    let outcome = txn
        .commit()
        .map_err(|e| backend("commit", e))?
        .await
        .map_err(|e| backend("transaction", e))?;
    if !outcome.is_committed() {
        return Err(StorageError::Backend(
            "IndexedDB transaction sealing the database was aborted".into(),
        ));
    }
    Ok(key)
}

/// Delete a storage name's database (every record of that device).
pub(crate) async fn delete_database(storage: &str) -> Result<(), StorageError> {
    let factory = Factory::new().map_err(|e| backend("is not available", e))?;
    factory
        .delete(&database_name(storage))
        .map_err(|e| backend("delete database", e))?
        .await
        .map_err(|e| backend("delete database", e))
}
