//! One open client per storage name, across tabs.
//!
//! Two engines on one database would be one device acting twice: the same
//! ratchet keys and sender seqs used for different messages. A client
//! therefore holds an exclusive Web Lock (`navigator.locks`, shared by all
//! pages and workers of the origin) named after its storage for as long as
//! it is open; a second open of the same storage fails at once with code
//! `locked`. Where the Web Locks API is missing, a per-page registry still
//! catches a double open within the page.

use super::convert::Failure;
use futures_channel::oneshot;
use js_sys::{Function, Object, Promise, Reflect};
use std::cell::RefCell;
use std::collections::BTreeSet;
use wasm_bindgen::closure::Closure;
use wasm_bindgen::{JsCast, JsValue};

thread_local! {
    static OPEN_HERE: RefCell<BTreeSet<String>> = const { RefCell::new(BTreeSet::new()) };
}

fn lock_name(storage: &str) -> String {
    format!("hush-client/{storage}")
}

/// `navigator.locks`, if this context has it.
fn lock_manager() -> Option<JsValue> {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).ok()?;
    let locks = Reflect::get(&navigator, &"locks".into()).ok()?;
    (!locks.is_undefined() && !locks.is_null()).then_some(locks)
}

/// Held while a client is open; [`StorageLock::release`] (or dropping it)
/// lets the next open proceed.
#[derive(Debug)]
pub(crate) struct StorageLock {
    storage: String,
    /// Resolving this ends the Web Lock's callback promise, releasing it.
    release: Option<Function>,
}

impl StorageLock {
    /// Take the storage's lock, failing with `locked` if another page,
    /// worker or client of this page holds it.
    pub async fn acquire(storage: &str) -> Result<StorageLock, Failure> {
        let taken = OPEN_HERE.with(|open| !open.borrow_mut().insert(storage.to_owned()));
        if taken {
            return Err(locked(storage));
        }
        // From here on, dropping `lock` undoes the registration.
        let mut lock = StorageLock {
            storage: storage.to_owned(),
            release: None,
        };
        let Some(manager) = lock_manager() else {
            return Ok(lock);
        };
        let request = Reflect::get(&manager, &"request".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok())
            .ok_or_else(|| Failure::new("unsupported", "navigator.locks.request is missing"))?;

        // The promise the lock callback returns: the lock is held until it
        // settles, i.e. until `release` is called.
        let mut resolve_slot: Option<Function> = None;
        let held = Promise::new(&mut |resolve, _reject| resolve_slot = Some(resolve));
        let (granted_tx, granted_rx) = oneshot::channel::<bool>();
        let callback = Closure::once_into_js(move |lock: JsValue| -> JsValue {
            let granted = !lock.is_null() && !lock.is_undefined();
            let _ = granted_tx.send(granted);
            if granted {
                held.into()
            } else {
                JsValue::UNDEFINED
            }
        });
        let options = Object::new();
        let _ = Reflect::set(&options, &"mode".into(), &"exclusive".into());
        let _ = Reflect::set(&options, &"ifAvailable".into(), &true.into());
        let outcome = request
            .call3(
                &manager,
                &JsValue::from_str(&lock_name(storage)),
                &options,
                &callback,
            )
            .map_err(|e| Failure::new("unsupported", super::transport::describe(&e)))?;
        // The request's own promise settles when the lock is released; keep
        // a rejection from surfacing as unhandled.
        if let Ok(p) = outcome.dyn_into::<Promise>() {
            wasm_bindgen_futures::spawn_local(async move {
                let _ = wasm_bindgen_futures::JsFuture::from(p).await;
            });
        }
        match granted_rx.await {
            Ok(true) => {
                lock.release = resolve_slot;
                Ok(lock)
            }
            _ => Err(locked(storage)),
        }
    }

    /// Give the lock up.
    pub fn release(&mut self) {
        if let Some(resolve) = self.release.take() {
            let _ = resolve.call0(&JsValue::UNDEFINED);
        }
        let storage = std::mem::take(&mut self.storage);
        if !storage.is_empty() {
            OPEN_HERE.with(|open| open.borrow_mut().remove(&storage));
        }
    }
}

impl Drop for StorageLock {
    fn drop(&mut self) {
        self.release();
    }
}

fn locked(storage: &str) -> Failure {
    Failure::new(
        "locked",
        format!("storage `{storage}` is open in another client, tab or worker"),
    )
}
