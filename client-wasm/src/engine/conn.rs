//! The connection to the relay: authentication, request bookkeeping,
//! prekey and device-list publication, device-list and prekey fetches.

use super::{Dirty, Engine, Event, Link, Pending};
use crate::error::ClientError;
use crate::sig;
use crate::state::{Contact, KnownDevices};
use hush_crypto::{DevicePublic, PrekeyBundle as CryptoBundle, initiate};
use hush_protocol::{
    AuthOk, ClientFrame, DeviceId, DeviceList, ErrorCode, OneTimePrekey, PrekeyBundle, Request,
    Response, ServerFrame, SignedDeviceList, SignedPrekey, UserKey, WireError,
};

/// Re-fetch device lists on an unknown sender at most this often.
const UNKNOWN_SENDER_REFRESH_MS: u64 = 5_000;
/// Re-fetch device lists this often while envelopes wait for their sender.
const PARKED_REFRESH_MS: u64 = 30_000;

impl Engine {
    pub(crate) fn on_connected(&mut self, now: u64) -> Result<(), ClientError> {
        self.link = Link {
            connected: true,
            next_request: 1,
            connected_at_ms: now,
            ..Link::default()
        };
        let device = self.device.device;
        self.request(Request::Hello { device }, Pending::Hello);
        Ok(())
    }

    pub(crate) fn on_disconnected(&mut self, now: u64) {
        if self.link.ready {
            // A connection that worked restarts the backoff.
            self.reconnect_attempts = 0;
        }
        self.link = Link::default();
        self.history_on_disconnected();
        let delay = self.backoff(
            self.cfg.reconnect_base_ms,
            self.cfg.reconnect_max_ms,
            self.reconnect_attempts,
        );
        self.reconnect_attempts = self.reconnect_attempts.saturating_add(1);
        self.reconnect_at = now.saturating_add(delay);
    }

    /// Queue a request frame and remember what its answer is for.
    pub(crate) fn request(&mut self, request: Request, pending: Pending) -> u32 {
        let frame = self.request_frame(request, pending);
        let id = frame.request_id;
        self.step.frames.push(frame);
        id
    }

    /// Number a request and remember what its answer is for.
    pub(crate) fn request_frame(&mut self, request: Request, pending: Pending) -> ClientFrame {
        let id = self.link.next_request.max(1);
        self.link.next_request = id.wrapping_add(1).max(1);
        self.link.requests.insert(id, pending);
        ClientFrame {
            request_id: id,
            request,
        }
    }

    /// Give up on this connection: the driver closes it and reports
    /// `Disconnected`; we reconnect with backoff.
    pub(crate) fn drop_connection(&mut self, now: u64) {
        self.step.close = true;
        self.on_disconnected(now);
    }

    pub(crate) fn on_frame(&mut self, now: u64, frame: ServerFrame) -> Result<(), ClientError> {
        if !self.link.connected {
            return Ok(());
        }
        match frame {
            ServerFrame::Response {
                request_id,
                response,
            } => match self.link.requests.remove(&request_id) {
                Some(Pending::Pull { after }) => match response {
                    Response::Page(page) => self.on_page(now, request_id, after, page)?,
                    _ => {
                        self.event(Event::Warning(
                            "relay sent an answer of the wrong kind".into(),
                        ));
                        self.drop_connection(now);
                    }
                },
                Some(p @ (Pending::BlobPut | Pending::BlobStatus | Pending::BlobGet)) => {
                    self.on_blob_response(now, p, response)?
                }
                Some(p) => self.on_response(now, p, response)?,
                None => self.event(Event::Warning("relay answered an unknown request".into())),
            },
            ServerFrame::Error { request_id, error } => {
                if request_id == 0 {
                    self.on_unsolicited_error(now, error)?;
                } else if let Some(p) = self.link.requests.remove(&request_id) {
                    self.on_error(now, p, error)?;
                }
            }
            ServerFrame::Push { envelopes } => self.on_push(now, envelopes, false)?,
            ServerFrame::EarlyPush { envelopes } => self.on_push(now, envelopes, true)?,
            ServerFrame::Durable { through } => self.on_durable(now, through),
            ServerFrame::PrekeysLow {
                one_time_prekeys_left,
            } => {
                // Other devices are using up our one-time prekeys: top up
                // (unless a publish is already on its way).
                self.link.one_time_left = one_time_prekeys_left;
                self.publish_prekeys_if_needed(now)?;
            }
            ServerFrame::Retired { last_seen_ms } => self.on_retired(last_seen_ms),
            ServerFrame::Closing { code, .. } => {
                if code == ErrorCode::DeviceRemoved {
                    // Removed while connected: the relay cut this session.
                    self.on_removed();
                } else if code != ErrorCode::ShuttingDown && code != ErrorCode::Replaced {
                    self.event(Event::Warning(format!(
                        "relay closed the connection: {code:?}"
                    )));
                }
                self.drop_connection(now);
            }
        }
        Ok(())
    }

    fn on_response(&mut self, now: u64, p: Pending, r: Response) -> Result<(), ClientError> {
        match (p, r) {
            (Pending::Hello, Response::Challenge { challenge }) => {
                let device = self.device.device;
                let signature = sig::auth_signature(&self.device.identity, &challenge, &device)?;
                if self.device.registered {
                    self.request(Request::Auth { signature }, Pending::Auth);
                } else {
                    let registration =
                        sig::registration(&self.device.user, &self.device.identity, device)?;
                    self.request(
                        Request::Register {
                            registration,
                            signature,
                        },
                        Pending::Register,
                    );
                }
            }
            (Pending::Auth | Pending::Register, Response::Authenticated(ok)) => {
                self.on_authenticated(now, ok)?
            }
            (Pending::Send(items), Response::Sent { outcomes }) => {
                self.on_sent(now, items, outcomes)?
            }
            (Pending::Ack, Response::Acked { .. }) => {}
            (Pending::EarlyPushes, Response::EarlyPushes) => {}
            (
                Pending::PublishPrekeys { signed, one_time },
                Response::PrekeysPublished {
                    one_time_prekeys_left,
                },
            ) => {
                self.link.publishing_prekeys = false;
                self.link.one_time_left = one_time_prekeys_left;
                self.prekeys.published_signed = Some(signed);
                self.prekeys
                    .unpublished
                    .retain(|(id, _)| !one_time.contains(id));
                self.touch(Dirty::Prekeys);
                self.publish_prekeys_if_needed(now)?;
            }
            (Pending::FetchPrekeys(d), Response::Prekeys(bundle)) => {
                self.link.fetching_prekeys.remove(&d);
                self.on_bundle(now, d, bundle)?;
            }
            (Pending::PublishDeviceList(v), Response::DeviceListPublished { version }) => {
                self.link.publishing_list = false;
                if version >= v
                    && let Some(list) = self.own.to_publish.take()
                {
                    let before: Vec<DeviceId> =
                        self.own.known.devices().map(|e| e.device).collect();
                    self.set_own_list(now, list.clone());
                    // A removal: contacts and this user's other devices get
                    // the list itself, not only the relay's word for it.
                    self.announce_removal(now, &before, &list)?;
                }
            }
            (Pending::FetchDeviceList(user), Response::DeviceLeases { list, leases }) => {
                let again = self.list_fetch_done(&user);
                self.on_device_list(now, user, list.clone())?;
                self.note_leases(user, &list, leases);
                if again {
                    self.fetch_list(now, user);
                }
            }
            (Pending::FetchDeviceList(user), Response::DeviceList(list)) => {
                let again = self.list_fetch_done(&user);
                self.on_device_list(now, user, list)?;
                if again {
                    self.fetch_list(now, user);
                }
            }
            (_, _) => {
                self.event(Event::Warning(
                    "relay sent an answer of the wrong kind".into(),
                ));
                self.drop_connection(now);
            }
        }
        Ok(())
    }

    fn on_error(&mut self, now: u64, p: Pending, e: WireError) -> Result<(), ClientError> {
        match p {
            Pending::BlobPut | Pending::BlobStatus | Pending::BlobGet => {
                self.on_blob_error(now, p, e)?;
            }
            Pending::Hello | Pending::Auth | Pending::Register => {
                match e.code {
                    // The relay lost our registration (or never committed it):
                    // register again with the same keys on the next connection.
                    ErrorCode::UnknownDevice => {
                        self.device.registered = false;
                        self.touch(Dirty::Device);
                    }
                    // Removed by its user: the relay will never take it back.
                    ErrorCode::DeviceRemoved => self.on_removed(),
                    code => self.event(Event::Warning(format!("authentication refused: {code:?}"))),
                }
                self.drop_connection(now);
            }
            Pending::Send(items) => {
                let wait = e.retry_after_ms.map(u64::from);
                self.on_send_refused(now, &items, wait);
            }
            Pending::Pull { .. } => {
                // Resynchronise from scratch on a fresh connection.
                self.drop_connection(now);
            }
            // A relay without early pushes: plain pushes work as before.
            Pending::Ack | Pending::EarlyPushes => {}
            Pending::PublishPrekeys { .. } => {
                self.link.publishing_prekeys = false;
            }
            Pending::FetchPrekeys(d) => {
                self.link.fetching_prekeys.remove(&d);
                self.note_prekey_failure(now, d);
            }
            Pending::PublishDeviceList(_) => {
                self.link.publishing_list = false;
                // Someone published a newer list first: merge ourselves into it.
                let me = self.user_key();
                self.fetch_list(now, me);
            }
            Pending::FetchDeviceList(user) => {
                let again = self.list_fetch_done(&user);
                if user == self.user_key() {
                    self.own.known.fetched_ms = Some(now);
                    self.ensure_listed(now)?;
                } else if let Some(c) = self.contacts.get_mut(&user) {
                    // No news: a list we hold stays valid. A contact we know
                    // no device of is asked again with backoff (it may not
                    // have registered yet), never cached as empty.
                    c.known.fetched_ms = Some(now);
                    self.schedule_list_retry(now, user);
                }
                if again {
                    self.fetch_list(now, user);
                }
            }
        }
        Ok(())
    }

    fn on_unsolicited_error(&mut self, now: u64, e: WireError) -> Result<(), ClientError> {
        match e.code {
            // Envelopes expired before they could be pushed: pull to get the
            // truncation (with the tombstones naming what was dropped).
            ErrorCode::ExpiredCursor => {
                self.link.live = false;
                if self.link.pulls.is_empty() {
                    self.send_pull();
                }
            }
            code => {
                self.event(Event::Warning(format!("relay error: {code:?}")));
                if matches!(code, ErrorCode::Internal | ErrorCode::BadFrame) {
                    self.drop_connection(now);
                }
            }
        }
        Ok(())
    }

    fn on_authenticated(&mut self, now: u64, ok: AuthOk) -> Result<(), ClientError> {
        if ok.device != self.device.device {
            self.drop_connection(now);
            return Ok(());
        }
        self.link.ready = true;
        self.reconnect_attempts = 0;
        if !self.device.registered {
            self.device.registered = true;
            self.touch(Dirty::Device);
        }
        if ok.acked > self.cursor.through {
            // The relay deleted envelopes we never stored (only possible if
            // local storage was lost): sender seqs will reveal and repair them.
            self.cursor.through = ok.acked;
            self.touch(Dirty::Cursor);
        }
        self.link.acked_sent = ok.acked;
        self.link.one_time_left = ok.one_time_prekeys_left;
        self.publish_prekeys_if_needed(now)?;
        self.publish_own_list();
        // Always on (re)connect: devices may have been linked meanwhile.
        self.refresh_lists(now, false);
        if self.cfg.early_pushes {
            self.request(Request::EarlyPushes, Pending::EarlyPushes);
        }
        self.send_pull();
        self.reset_transmissions(now);
        Ok(())
    }

    /// Rotate the signed prekey when due and top up one-time prekeys; publish
    /// whatever the relay has not confirmed.
    pub(crate) fn publish_prekeys_if_needed(&mut self, now: u64) -> Result<(), ClientError> {
        if !self.link.ready || self.link.publishing_prekeys {
            return Ok(());
        }
        if self.prekeys.secrets.needs_rotation(now) {
            self.prekeys
                .secrets
                .rotate_signed_prekey(&self.device.identity, &mut self.rng, now)?;
            self.prekeys.published_signed = None;
            self.touch(Dirty::Prekeys);
        }
        if self.link.one_time_left < self.cfg.one_time_prekeys_low
            && self.prekeys.unpublished.is_empty()
        {
            // A full local pool (the relay lost keys) is not an error: the
            // signed prekey alone still lets peers start sessions.
            if let Ok(fresh) = self
                .prekeys
                .secrets
                .generate_one_time_prekeys(&mut self.rng, self.cfg.one_time_prekeys_batch)
            {
                self.prekeys.unpublished.extend(fresh);
                self.touch(Dirty::Prekeys);
            }
        }
        let (id, public, signature) = self.prekeys.secrets.signed_prekey();
        if self.prekeys.published_signed == Some(id) && self.prekeys.unpublished.is_empty() {
            return Ok(());
        }
        let batch: Vec<(u32, [u8; 32])> = self
            .prekeys
            .unpublished
            .iter()
            .take(hush_protocol::limits::MAX_ONE_TIME_PREKEYS)
            .copied()
            .collect();
        self.link.publishing_prekeys = true;
        self.request(
            Request::PublishPrekeys {
                signed_prekey: SignedPrekey {
                    id,
                    public,
                    signature,
                },
                one_time_prekeys: batch
                    .iter()
                    .map(|&(id, public)| OneTimePrekey { id, public })
                    .collect(),
            },
            Pending::PublishPrekeys {
                signed: id,
                one_time: batch.iter().map(|(id, _)| *id).collect(),
            },
        );
        Ok(())
    }

    pub(crate) fn publish_own_list(&mut self) {
        if !self.link.ready || self.link.publishing_list {
            return;
        }
        if let Some(list) = self.own.to_publish.clone() {
            let v = list.list.version;
            self.link.publishing_list = true;
            self.request(
                Request::PublishDeviceList { list },
                Pending::PublishDeviceList(v),
            );
        }
    }

    fn set_own_list(&mut self, now: u64, list: SignedDeviceList) {
        let changed = self.own.known.list.as_ref() != Some(&list);
        self.own.known.list = Some(list);
        self.own.known.fetched_ms = Some(now);
        self.touch(Dirty::Own);
        if changed {
            let user = self.user_key();
            let devices = self.devices_of(&user);
            self.event(Event::DevicesChanged { user, devices });
        }
    }

    /// A device always keeps itself in its user's list: if the latest list
    /// lacks us (a new device, or a concurrent publication), sign one that
    /// adds us and publish it.
    fn ensure_listed(&mut self, now: u64) -> Result<(), ClientError> {
        let me = self.device.device;
        if self.own.known.contains(&me) || self.lifecycle.removed {
            return Ok(());
        }
        let base_version = self
            .own
            .known
            .version()
            .max(self.own.to_publish.as_ref().map_or(0, |l| l.list.version));
        let mut devices: Vec<_> = self.own.known.devices().cloned().collect();
        if devices.len() >= hush_protocol::limits::MAX_DEVICES_PER_USER {
            self.event(Event::Warning(
                "this user already has the maximum number of devices".into(),
            ));
            return Ok(());
        }
        devices.push(self.own_entry());
        let list = DeviceList {
            user: self.user_key(),
            version: base_version.saturating_add(1),
            devices,
        };
        self.own.to_publish = Some(sig::sign_device_list(&self.device.user, list)?);
        self.touch(Dirty::Own);
        let _ = now;
        self.publish_own_list();
        Ok(())
    }

    /// Ask the relay for a user's device list unless a fetch is running.
    pub(crate) fn fetch_list(&mut self, now: u64, user: UserKey) {
        if self.link.ready && self.link.fetching_lists.insert(user) {
            self.link.list_fetch_sent.insert(user, now);
            // The list with the relay's leases (see `lifecycle`).
            self.request(
                Request::FetchDeviceLeases { user },
                Pending::FetchDeviceList(user),
            );
        }
    }

    /// A list fetch answered: forget it, and say whether it must be sent
    /// again (something asked for a fresher answer while it ran).
    fn list_fetch_done(&mut self, user: &UserKey) -> bool {
        self.link.fetching_lists.remove(user);
        self.link.list_fetch_sent.remove(user);
        self.link.refetch_lists.remove(user)
    }

    /// Fetch the device lists of this user and of every contact. With
    /// `force`, a fetch already running is repeated once it answers, since
    /// its answer may predate what prompted this refresh.
    pub(crate) fn refresh_lists(&mut self, now: u64, force: bool) {
        if !self.link.ready {
            return;
        }
        self.lists_refreshed_at = Some(now);
        let mut users: Vec<UserKey> = vec![self.user_key()];
        users.extend(self.contacts.keys().copied());
        for u in users {
            if force && self.link.fetching_lists.contains(&u) {
                self.link.refetch_lists.insert(u);
            } else {
                self.fetch_list(now, u);
            }
        }
    }

    pub(crate) fn maybe_refresh_lists(&mut self, now: u64) {
        let stale = self
            .lists_refreshed_at
            .is_none_or(|t| now >= t.saturating_add(self.cfg.device_list_max_age_ms));
        if stale {
            self.refresh_lists(now, false);
        }
        let due: Vec<UserKey> = self
            .list_retry
            .iter()
            .filter(|(_, (at, _))| now >= *at)
            .map(|(u, _)| *u)
            .collect();
        for u in due {
            if !self.link.fetching_lists.contains(&u) {
                self.fetch_list(now, u);
            }
        }
    }

    /// A contact's fetch found no device (refused, or an empty list): ask
    /// again later with exponential backoff. A contact with devices needs
    /// no retry.
    pub(crate) fn schedule_list_retry(&mut self, now: u64, user: UserKey) {
        let has_devices = self
            .contacts
            .get(&user)
            .is_some_and(|c| c.known.devices().next().is_some());
        if has_devices || !self.contacts.contains_key(&user) {
            self.list_retry.remove(&user);
            return;
        }
        let n = self.list_retry.get(&user).map_or(0, |r| r.1);
        let delay = self.backoff(self.cfg.retry_base_ms, self.cfg.device_list_retry_max_ms, n);
        self.list_retry
            .insert(user, (now.saturating_add(delay), n.saturating_add(1)));
    }

    /// A prekey fetch failed (the device may not have published yet): ask
    /// again after a backoff that doubles per failure in a row.
    fn note_prekey_failure(&mut self, now: u64, d: DeviceId) {
        let n = self.link.prekey_failures.get(&d).map_or(0, |f| f.1);
        let delay = self.backoff(self.cfg.retry_base_ms, self.cfg.retry_max_ms, n);
        self.link
            .prekey_failures
            .insert(d, (now.saturating_add(delay), n.saturating_add(1)));
    }

    /// An envelope came from a device no verified list names yet (a new
    /// device of a contact or of this user): re-fetch every list, at once if
    /// none ran lately, and again while envelopes stay parked — first after
    /// a few seconds, then backing off to every half minute. The schedule
    /// depends only on the refreshes made since parking began, never on how
    /// many envelopes unknown devices send: a stranger cannot make this
    /// device fetch lists more often.
    pub(crate) fn refresh_for_unknown_sender(&mut self, now: u64) {
        let due = self.parked_refresh_at().is_none_or(|t| now >= t);
        if due && self.link.ready {
            self.unknown_refreshed_at = Some(now);
            self.parked_refreshes = self.parked_refreshes.saturating_add(1);
            // The writer may be a contact's first device: contacts with none
            // known start their retry backoff over.
            for r in self.list_retry.values_mut() {
                r.1 = 0;
            }
            self.refresh_lists(now, true);
        }
    }

    /// When to re-fetch lists for parked envelopes: a few seconds after the
    /// last refresh (the relay's answer may have raced the sender's list
    /// publication), then backing off to now and then.
    pub(crate) fn parked_refresh_at(&self) -> Option<u64> {
        if self.parked.is_empty() {
            return None;
        }
        let Some(last) = self.unknown_refreshed_at else {
            return Some(0);
        };
        let n = self.parked_refreshes.saturating_sub(1).min(3);
        let delay = (UNKNOWN_SENDER_REFRESH_MS << n).min(PARKED_REFRESH_MS);
        Some(last.saturating_add(delay))
    }

    pub(crate) fn on_device_list(
        &mut self,
        now: u64,
        user: UserKey,
        list: SignedDeviceList,
    ) -> Result<(), ClientError> {
        if let Err(e) = sig::verify_device_list(&list, &user) {
            // A bad user signature, or an entry its device never signed for
            // this user (someone listing another user's device): the whole
            // list is ignored.
            self.event(Event::Warning(format!(
                "the relay served a device list that does not verify \
                 (user signature or a device's membership proof): {e}"
            )));
            // No news, like a refusal: keep what we hold, retry if empty.
            if user == self.user_key() {
                self.own.known.fetched_ms = Some(now);
            } else if let Some(c) = self.contacts.get_mut(&user) {
                c.known.fetched_ms = Some(now);
                self.schedule_list_retry(now, user);
            }
            return Ok(());
        }
        if user == self.user_key() {
            self.check_dropped(&list);
            let held = self.own.known.version();
            if list.list.version >= held {
                let changed = self.own.known.list.as_ref() != Some(&list);
                let before: Vec<DeviceId> = self.own.known.devices().map(|e| e.device).collect();
                self.set_own_list(now, list.clone());
                if changed {
                    self.warn_contested(&user);
                }
                // Whoever removed a device, every remaining one passes
                // the notice on.
                self.forward_list(now, held, &before, &list)?;
            } else {
                self.own.known.fetched_ms = Some(now);
                self.touch(Dirty::Own);
                self.note_old_list(&user, list.list.version);
            }
            self.ensure_listed(now)?;
        } else {
            let Some(c) = self.contacts.get_mut(&user) else {
                return Ok(());
            };
            c.known.fetched_ms = Some(now);
            let newer = list.list.version >= c.known.version();
            let changed = newer && c.known.list.as_ref() != Some(&list);
            let served = list.list.version;
            if newer {
                c.known.list = Some(list);
            }
            self.touch(Dirty::Contact(user));
            if !newer {
                self.note_old_list(&user, served);
            }
            self.schedule_list_retry(now, user);
            if changed {
                let devices = self.devices_of(&user);
                self.event(Event::DevicesChanged { user, devices });
                self.warn_contested(&user);
            }
        }
        self.on_lists_changed(now)?;
        Ok(())
    }

    /// Report devices of `user`'s verified list that another verified list
    /// names too. [`Engine::peer`] attributes them to nobody, so nothing is
    /// accepted from or encrypted to them; with membership proofs only a
    /// device that signed for two users can cause this.
    fn warn_contested(&mut self, user: &UserKey) {
        let listed: Vec<DeviceId> = if *user == self.user_key() {
            self.own.known.devices().map(|e| e.device).collect()
        } else {
            self.contacts
                .get(user)
                .map(|c| c.known.devices().map(|e| e.device).collect())
                .unwrap_or_default()
        };
        let contested = listed
            .iter()
            .filter(|d| self.claimants(d).len() > 1)
            .count();
        if contested > 0 {
            self.event(Event::Warning(format!(
                "{contested} device(s) of a device list are listed by another user too; \
                 nothing is accepted from or sent to them"
            )));
        }
    }

    /// After any device-list update: targets of removed devices are dropped,
    /// unresolved fan-outs resolve, parked envelopes are retried.
    pub(crate) fn on_lists_changed(&mut self, now: u64) -> Result<(), ClientError> {
        self.drop_unlisted_targets();
        self.retry_parked(now)?;
        Ok(())
    }

    fn on_bundle(
        &mut self,
        now: u64,
        d: DeviceId,
        bundle: PrekeyBundle,
    ) -> Result<(), ClientError> {
        // A session repair (recv.rs `session_unanswerable`) wants a fresh
        // session even though others exist.
        let fresh = self.session_repair.fresh.contains(&d);
        if !fresh && self.sessions.get(&d).is_some_and(|s| !s.entries.is_empty()) {
            return Ok(());
        }
        let Some((user, entry)) = self.peer(&d) else {
            return Ok(());
        };
        let matches = bundle.device == d
            && bundle.user == user
            && bundle.signing_key == entry.signing_key
            && bundle.agreement_key == entry.agreement_key;
        if !matches {
            self.event(Event::Warning(
                "the relay served a prekey bundle that does not match the device list".into(),
            ));
            self.note_prekey_failure(now, d);
            return Ok(());
        }
        let cb = CryptoBundle {
            identity: DevicePublic {
                signing: entry.signing_key,
                agreement: entry.agreement_key,
            },
            signed_prekey_id: bundle.signed_prekey.id,
            signed_prekey: bundle.signed_prekey.public,
            signed_prekey_sig: bundle.signed_prekey.signature,
            one_time_prekey: bundle.one_time_prekey.map(|k| (k.id, k.public)),
        };
        match initiate(&self.device.identity, &cb, &mut self.rng) {
            Ok((session, init)) => {
                self.link.prekey_failures.remove(&d);
                let me = self.device.device;
                let slot = self.sessions.entry(d).or_default();
                // A fresh session goes first: everything from now on is
                // sealed on it; the older ones stay for opening.
                slot.entries.insert(
                    0,
                    crate::state::SessionEntry {
                        session,
                        initiator: me,
                        ephemeral: init.ephemeral,
                    },
                );
                slot.entries.truncate(4);
                self.session_repair.fresh.remove(&d);
                self.touch(Dirty::Session(d));
            }
            Err(_) => {
                self.event(Event::Warning("a prekey bundle failed verification".into()));
                self.note_prekey_failure(now, d);
            }
        }
        Ok(())
    }

    /// Ask the relay for a device's prekeys, unless a fetch is running or
    /// failed recently.
    pub(crate) fn want_session(&mut self, now: u64, d: DeviceId) {
        if !self.link.ready || self.link.fetching_prekeys.contains(&d) {
            return;
        }
        if let Some(&(at, _)) = self.link.prekey_failures.get(&d)
            && now < at
        {
            return;
        }
        self.link.fetching_prekeys.insert(d);
        self.request(
            Request::FetchPrekeys { device: d },
            Pending::FetchPrekeys(d),
        );
    }

    pub(crate) fn send_ack(&mut self) {
        let through = self.cursor.through;
        self.link.ack_due = None;
        if through > self.link.acked_sent {
            self.link.acked_sent = through;
            self.request(Request::Ack { up_to: through }, Pending::Ack);
        }
    }

    /// Add (or update) a contact and fetch their devices.
    pub(crate) fn add_contact(
        &mut self,
        now: u64,
        user: UserKey,
        relay: String,
        name: String,
    ) -> hush_protocol::ConversationId {
        let conversation = self.conversation_with(&user);
        let is_new = !self.contacts.contains_key(&user);
        let c = self.contacts.entry(user).or_insert_with(|| Contact {
            user,
            relay: relay.clone(),
            name: name.clone(),
            conversation,
            known: KnownDevices::default(),
        });
        c.relay = relay;
        c.name = name.clone();
        self.conversations.insert(conversation, user);
        self.touch(Dirty::Contact(user));
        if is_new {
            self.event(Event::ContactAdded {
                user,
                name,
                conversation,
            });
            self.fetch_list(now, user);
        }
        let _ = now;
        conversation
    }
}

#[cfg(test)]
mod prekeys_low_tests {
    use crate::engine::{Engine, EngineConfig, Input, Step};
    use hush_protocol::{AuthOk, Request, Response, ServerFrame};

    const T0: u64 = 1_700_000_000_000;

    fn answer(e: &mut Engine, s: &Step, response: Response) -> Step {
        e.handle(
            T0,
            Input::Frame(ServerFrame::Response {
                request_id: s.frames[0].request_id,
                response,
            }),
        )
        .unwrap()
    }

    /// The relay says the pool ran low: the engine publishes fresh one-time
    /// prekeys at once, on the same connection.
    #[test]
    fn prekeys_low_notice_triggers_a_refill() {
        let (mut e, _) =
            Engine::create(T0, [3; 32], "relay", "a", EngineConfig::default()).unwrap();
        let s = e.handle(T0, Input::Connected).unwrap();
        let s = answer(&mut e, &s, Response::Challenge { challenge: [5; 32] });
        let device = e.device_id();
        let s = answer(
            &mut e,
            &s,
            Response::Authenticated(AuthOk {
                device,
                inbox_head: 0,
                acked: 0,
                one_time_prekeys_left: 0,
                relay_time_ms: 0,
            }),
        );
        // Confirm the first publication with a well-stocked pool.
        let publish = s
            .frames
            .iter()
            .find(|f| matches!(f.request, Request::PublishPrekeys { .. }))
            .expect("first publication");
        let s = e
            .handle(
                T0,
                Input::Frame(ServerFrame::Response {
                    request_id: publish.request_id,
                    response: Response::PrekeysPublished {
                        one_time_prekeys_left: 100,
                    },
                }),
            )
            .unwrap();
        assert!(
            !s.frames
                .iter()
                .any(|f| matches!(f.request, Request::PublishPrekeys { .. })),
            "nothing more to publish while the pool is full"
        );
        let s = e
            .handle(
                T0,
                Input::Frame(ServerFrame::PrekeysLow {
                    one_time_prekeys_left: 2,
                }),
            )
            .unwrap();
        assert!(
            s.frames.iter().any(|f| matches!(
                &f.request,
                Request::PublishPrekeys { one_time_prekeys, .. } if !one_time_prekeys.is_empty()
            )),
            "a PrekeysLow notice makes the engine publish fresh one-time prekeys: {:?}",
            s.frames
        );
    }
}
