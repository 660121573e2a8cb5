//! Which connection currently speaks for each device, and how it learns
//! that its inbox changed.
//!
//! Per device there is a `watch` channel carrying the inbox's highest
//! committed seq: the group-commit writer bumps it after every durable
//! commit, and a live connection wakes up, marks the value seen, then reads
//! the store. Marking before reading means a commit can never slip between
//! the two unnoticed. Presence is one owner per device: a newer connection
//! claims the device and the previous owner is told to close (`Replaced`).

use hush_protocol::DeviceId;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::{oneshot, watch};

struct Entry {
    inbox: watch::Sender<u64>,
    /// The one-time prekeys left after the last fetch that took the pool
    /// to or below the low-water mark (see [`DeviceHub::prekeys_low`]).
    prekeys_low: watch::Sender<Option<u32>>,
    owner: Option<(u64, oneshot::Sender<()>)>,
}

/// The per-device registry shared by all connections and the writer.
#[derive(Default)]
pub struct DeviceHub {
    devices: Mutex<HashMap<DeviceId, Entry>>,
}

impl std::fmt::Debug for DeviceHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHub")
            .field("devices", &self.len())
            .finish()
    }
}

/// What a connection gets when it claims a device.
#[derive(Debug)]
pub struct Claim {
    /// Changes whenever the device's inbox gains envelopes.
    pub inbox: watch::Receiver<u64>,
    /// Fires when a newer connection claims the same device.
    pub replaced: oneshot::Receiver<()>,
    /// Changes when other devices' fetches ran the device's one-time
    /// prekey pool low; holds how many are left.
    pub prekeys_low: watch::Receiver<Option<u32>>,
}

impl DeviceHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Entry>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert/remove), so poisoning is ignored.
        self.devices.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make connection `conn_id` the device's owner; the previous owner, if
    /// any, is signalled to close.
    pub fn claim(&self, device: DeviceId, conn_id: u64) -> Claim {
        let (tx, rx) = oneshot::channel();
        let mut map = self.lock();
        let entry = map.entry(device).or_insert_with(|| Entry {
            inbox: watch::Sender::new(0),
            prekeys_low: watch::Sender::new(None),
            owner: None,
        });
        if let Some((_, old)) = entry.owner.replace((conn_id, tx)) {
            let _ = old.send(());
        }
        Claim {
            inbox: entry.inbox.subscribe(),
            replaced: rx,
            prekeys_low: entry.prekeys_low.subscribe(),
        }
    }

    /// Connection `conn_id` is gone (and has dropped its [`Claim`]): end its
    /// ownership if it still owns the device, and forget the device once
    /// nobody watches it.
    pub fn release(&self, device: DeviceId, conn_id: u64) {
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&device) {
            if entry.owner.as_ref().is_some_and(|(id, _)| *id == conn_id) {
                entry.owner = None;
            }
            if entry.owner.is_none() && entry.inbox.receiver_count() == 0 {
                map.remove(&device);
            }
        }
    }

    /// The device's inbox now holds envelopes up to `seq`.
    pub fn notify(&self, device: &DeviceId, seq: u64) {
        if let Some(entry) = self.lock().get(device) {
            entry.inbox.send_if_modified(|v| {
                if seq > *v {
                    *v = seq;
                    true
                } else {
                    false
                }
            });
        }
    }

    /// The device's one-time prekey pool is down to `left`: tell its
    /// connection, if it has one (a device that is offline learns the count
    /// from `AuthOk` when it next connects). Returns whether a connection
    /// was told.
    pub fn prekeys_low(&self, device: &DeviceId, left: u32) -> bool {
        match self.lock().get(device) {
            Some(entry) if entry.owner.is_some() => {
                entry.prekeys_low.send_replace(Some(left));
                true
            }
            _ => false,
        }
    }

    /// Devices with a connection or a watcher.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// No device is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_claim_replaces_older_and_notifications_reach_the_owner() {
        let hub = DeviceHub::default();
        let d = DeviceId([1; 16]);
        let mut a = hub.claim(d, 1);
        let mut b = hub.claim(d, 2);
        assert!(
            a.replaced.try_recv().is_ok(),
            "older connection is told to close"
        );
        assert!(b.replaced.try_recv().is_err());
        hub.notify(&d, 5);
        assert!(b.inbox.has_changed().unwrap());
        assert_eq!(*b.inbox.borrow_and_update(), 5);
        hub.notify(&d, 4);
        assert!(!b.inbox.has_changed().unwrap(), "seqs never move backwards");
        assert!(!b.prekeys_low.has_changed().unwrap());
        assert!(hub.prekeys_low(&d, 3), "the owner is told");
        assert!(b.prekeys_low.has_changed().unwrap());
        assert_eq!(*b.prekeys_low.borrow_and_update(), Some(3));
        assert!(
            !hub.prekeys_low(&DeviceId([9; 16]), 0),
            "nobody to tell for an offline device"
        );
        drop(a);
        hub.release(d, 1);
        assert_eq!(hub.len(), 1, "releasing the replaced claim keeps the owner");
        drop(b);
        hub.release(d, 2);
        assert!(hub.is_empty());
    }
}
