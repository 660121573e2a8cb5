//! Device lifecycle: the relay's leases (last seen, stale), removing one of
//! this user's devices, and being removed or retired.
//!
//! Leases come with the signed list (`FetchDeviceLeases`) but are the
//! relay's word, unsigned. They are only ever used to *narrow* the signed
//! list: a stale device gets no new envelopes, unless every listed device of
//! its user is stale (then all of them get it: a relay cannot make a message
//! go to nobody). A device the newest signed list drops gets nothing
//! whatever its lease says. Leases live in memory only: every list fetch
//! brings fresh ones, and until one arrives nobody is treated as stale.

use super::{Dirty, Engine, Event};
use crate::error::ClientError;
use crate::payload::Body;
use crate::sig;
use hush_protocol::{DeviceId, DeviceLease, DeviceList, SignedDeviceList, UserKey};
use std::collections::{BTreeMap, BTreeSet};

/// Lifecycle state (in memory).
#[derive(Debug, Clone, Default)]
pub(crate) struct Lifecycle {
    /// Per user: the relay's lease of each device of the list it came with.
    pub leases: BTreeMap<UserKey, BTreeMap<DeviceId, DeviceLease>>,
    /// This device was removed by its user (the relay refused its
    /// authentication with `DeviceRemoved`, or a newer signed list of its
    /// user dropped it): it never adds itself back.
    pub removed: bool,
    /// The relay told this device it had been stale (its last-seen time then).
    pub retired_last_seen_ms: Option<u64>,
}

/// One device of a user's signed list, with the relay's (unsigned) lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device.
    pub device: DeviceId,
    /// Whether it is the device running this engine.
    pub this_device: bool,
    /// When the relay last saw it (ms), if a lease was fetched.
    pub last_seen_ms: Option<u64>,
    /// The relay reports it stale (no new envelopes go to it).
    pub stale: bool,
}

impl Engine {
    /// A fetched list came with leases: keep those of the list's devices
    /// if the list verifies (one lease per device; others are ignored).
    pub(crate) fn note_leases(
        &mut self,
        user: UserKey,
        list: &SignedDeviceList,
        leases: Vec<DeviceLease>,
    ) {
        if sig::verify_device_list(list, &user).is_err() {
            return;
        }
        let listed: BTreeSet<DeviceId> = list.list.devices.iter().map(|e| e.device).collect();
        let mut kept = BTreeMap::new();
        for lease in leases {
            if listed.contains(&lease.device) {
                kept.entry(lease.device).or_insert(lease);
            }
        }
        let was_stale: BTreeSet<DeviceId> = self.stale_targets(&user);
        self.lifecycle.leases.insert(user, kept);
        if was_stale != self.stale_targets(&user) {
            let devices = self.devices_of(&user);
            self.event(Event::DevicesChanged { user, devices });
        }
    }

    /// The listed devices of `user` that get no new envelopes because the
    /// relay reports them stale: empty if every listed device is stale.
    pub(crate) fn stale_targets(&self, user: &UserKey) -> BTreeSet<DeviceId> {
        let Some(leases) = self.lifecycle.leases.get(user) else {
            return BTreeSet::new();
        };
        let listed = self.devices_of(user);
        let stale: BTreeSet<DeviceId> = listed
            .iter()
            .filter(|d| leases.get(d).is_some_and(|l| l.stale))
            .copied()
            .collect();
        if stale.len() == listed.len() {
            BTreeSet::new()
        } else {
            stale
        }
    }

    /// The devices of `user`'s newest verified list (this user's own
    /// included) with the relay's leases, in list order.
    pub fn device_infos(&self, user: &UserKey) -> Vec<DeviceInfo> {
        let leases = self.lifecycle.leases.get(user);
        let excluded = self.stale_targets(user);
        self.devices_of(user)
            .into_iter()
            .map(|device| {
                let lease = leases.and_then(|l| l.get(&device));
                DeviceInfo {
                    device,
                    this_device: device == self.device.device,
                    last_seen_ms: lease.map(|l| l.last_seen_ms),
                    stale: excluded.contains(&device),
                }
            })
            .collect()
    }

    /// This user's devices (see [`Engine::device_infos`]).
    pub fn own_devices(&self) -> Vec<DeviceInfo> {
        self.device_infos(&self.user_key())
    }

    /// Whether this device was removed by its user: the relay refuses it,
    /// and nothing new is encrypted to it.
    pub fn removed(&self) -> bool {
        self.lifecycle.removed
    }

    /// When the relay had last seen this device before telling it that it
    /// had been stale (retired), if it did in this session.
    pub fn retired_last_seen_ms(&self) -> Option<u64> {
        self.lifecycle.retired_last_seen_ms
    }

    /// `Command::RemoveDevice`: sign and publish this user's list without
    /// `device`. Checked first: not this device, and listed.
    pub(crate) fn remove_own_device(
        &mut self,
        now: u64,
        device: DeviceId,
    ) -> Result<(), ClientError> {
        if device == self.device.device {
            return Err(ClientError::NotAllowed(
                "a device cannot remove itself; remove it from another device",
            ));
        }
        // The newest list this device knows or is publishing.
        let base: Option<DeviceList> = match (&self.own.to_publish, &self.own.known.list) {
            (Some(p), Some(k)) if p.list.version >= k.list.version => Some(p.list.clone()),
            (_, Some(k)) => Some(k.list.clone()),
            (Some(p), None) => Some(p.list.clone()),
            (None, None) => None,
        };
        let Some(base) = base else {
            return Err(ClientError::Unknown("device"));
        };
        if !base.devices.iter().any(|e| e.device == device) {
            return Err(ClientError::Unknown("device"));
        }
        let list = DeviceList {
            user: self.user_key(),
            version: base.version.saturating_add(1),
            devices: base
                .devices
                .into_iter()
                .filter(|e| e.device != device)
                .collect(),
        };
        self.own.to_publish = Some(sig::sign_device_list(&self.device.user, list)?);
        self.touch(Dirty::Own);
        let _ = now;
        self.publish_own_list();
        Ok(())
    }

    /// A newer verified list of this user dropped this device, which it
    /// was on before: its user removed it.
    pub(crate) fn check_dropped(&mut self, list: &SignedDeviceList) {
        let me = self.device.device;
        if self.own.known.contains(&me)
            && list.list.version > self.own.known.version()
            && !list.list.devices.iter().any(|e| e.device == me)
        {
            self.on_removed();
        }
    }

    /// This device was removed by its user.
    pub(crate) fn on_removed(&mut self) {
        if !self.lifecycle.removed {
            self.lifecycle.removed = true;
            self.counters.removed = self.counters.removed.saturating_add(1);
            self.touch(Dirty::Counters);
            self.event(Event::Removed);
        }
    }

    /// `ServerFrame::Retired`: this device had been stale.
    pub(crate) fn on_retired(&mut self, last_seen_ms: u64) {
        self.lifecycle.retired_last_seen_ms = Some(last_seen_ms);
        self.counters.retired = self.counters.retired.saturating_add(1);
        self.touch(Dirty::Counters);
        self.event(Event::Retired { last_seen_ms });
    }

    /// The relay accepted `list`, this user's list that replaced one naming
    /// `before`. If it drops a device, every device of every contact and
    /// this user's other remaining devices get the signed list in their
    /// control stream (`Body::DeviceListChanged`): they stop encrypting to
    /// the removed device as soon as it arrives, whatever list the relay
    /// serves them afterwards.
    pub(crate) fn announce_removal(
        &mut self,
        now: u64,
        before: &[DeviceId],
        list: &SignedDeviceList,
    ) -> Result<(), ClientError> {
        if before
            .iter()
            .all(|d| list.list.devices.iter().any(|e| e.device == *d))
        {
            return Ok(());
        }
        self.send_list_notice(now, list)
    }

    /// A newer list of this user arrived (from the relay or in a notice)
    /// replacing the held one of version `held`, which named `before`. If
    /// it may hide a removal — it drops a device, or skips versions that
    /// could have added and removed one this device never saw — this
    /// device passes the notice on as well: a relay must then withhold the
    /// streams of every device of this user to a contact, with their
    /// receipts, to keep a removal from it (SECURITY.md).
    pub(crate) fn forward_list(
        &mut self,
        now: u64,
        held: u64,
        before: &[DeviceId],
        list: &SignedDeviceList,
    ) -> Result<(), ClientError> {
        if self.lifecycle.removed || held == 0 || list.list.version <= held {
            return Ok(());
        }
        if list.list.version == held.saturating_add(1) {
            return self.announce_removal(now, before, list);
        }
        self.send_list_notice(now, list)
    }

    /// `list` in a `DeviceListChanged` notice to every device of every
    /// contact and this user's other listed devices.
    fn send_list_notice(&mut self, now: u64, list: &SignedDeviceList) -> Result<(), ClientError> {
        let me = self.device.device;
        let mut to: BTreeSet<DeviceId> = list
            .list
            .devices
            .iter()
            .map(|e| e.device)
            .filter(|d| *d != me)
            .collect();
        for c in self.contacts.values() {
            to.extend(c.known.devices().map(|e| e.device));
        }
        for d in to {
            self.queue_control(now, d, Body::DeviceListChanged { list: list.clone() })?;
        }
        Ok(())
    }

    /// `Body::DeviceListChanged` from a device of `from`: a list of that
    /// user (never of another), verified like a fetched one, kept if newer
    /// than the one held. The relay is asked too (for fresh leases); an
    /// older list it serves afterwards is ignored and counted.
    pub(crate) fn on_list_notice(
        &mut self,
        now: u64,
        from: UserKey,
        list: SignedDeviceList,
    ) -> Result<(), ClientError> {
        if list.list.user != from || sig::verify_device_list(&list, &from).is_err() {
            self.reject();
            return Ok(());
        }
        let held = if from == self.user_key() {
            self.own.known.version()
        } else if let Some(c) = self.contacts.get(&from) {
            c.known.version()
        } else {
            return Ok(());
        };
        if list.list.version > held {
            self.counters.list_notices = self.counters.list_notices.saturating_add(1);
            self.touch(Dirty::Counters);
            self.on_device_list(now, from, list)?;
        }
        if self.link.fetching_lists.contains(&from) {
            self.link.refetch_lists.insert(from);
        } else {
            self.fetch_list(now, from);
        }
        Ok(())
    }

    /// The relay served a list of `user` older than the one held (`held`):
    /// it is ignored; counted and reported, since an honest relay only
    /// does so while it lags behind a publication.
    pub(crate) fn note_old_list(&mut self, user: &UserKey, served: u64) {
        let held = self.devices_version(user);
        if served >= held {
            return;
        }
        self.counters.old_lists_ignored = self.counters.old_lists_ignored.saturating_add(1);
        self.touch(Dirty::Counters);
        self.event(Event::Warning(format!(
            "the relay served an older device list (version {served}) than the \
             one held (version {held}); it is ignored"
        )));
    }

    /// The version of `user`'s newest verified list held (0: none).
    pub(crate) fn devices_version(&self, user: &UserKey) -> u64 {
        if *user == self.user_key() {
            self.own.known.version()
        } else {
            self.contacts.get(user).map_or(0, |c| c.known.version())
        }
    }
}
