//! Devices, prekeys and device lists.
//!
//! Registering locks the user's `hush_users` row (creating it if needed), so
//! two nodes registering devices of one user at once count each other's
//! devices against the cap. Publishing prekeys locks the device's row, so the
//! one-time pool cap holds across nodes. Handing out a one-time prekey
//! deletes it with `FOR UPDATE SKIP LOCKED`: two nodes racing for a bundle
//! take different keys, and each key is handed out exactly once.

use super::super::tables::encode_signed_prekey;
use super::super::tables::{decode_device_list, decode_signed_prekey, encode_device_list};
use super::super::{DeviceRecord, StoreError};
use super::pool::TxError;
use super::{PgStore, db_u64, from_db};
use hush_protocol::{
    DeviceId, DeviceRegistration, OneTimePrekey, PrekeyBundle, SignedDeviceList, SignedPrekey,
    UserKey,
};
use tokio_postgres::{GenericClient, IsolationLevel, Row};

const DEVICE_QUERY: &str = "SELECT user_key, signing_key, agreement_key, user_signature, \
                            registered_at_ms FROM hush_devices WHERE device = $1";

fn record_of(device: DeviceId, row: &Row) -> Result<DeviceRecord, StoreError> {
    Ok(DeviceRecord {
        registration: DeviceRegistration {
            device,
            user: UserKey(super::array(row.get(0), "device user")?),
            signing_key: super::array(row.get(1), "device signing key")?,
            agreement_key: super::array(row.get(2), "device agreement key")?,
            user_signature: super::array(row.get(3), "device user signature")?,
        },
        registered_at_ms: from_db(row.get(4)),
    })
}

async fn load_device<C: GenericClient>(
    c: &C,
    device: &DeviceId,
) -> Result<Option<DeviceRecord>, TxError> {
    match c
        .query_opt(DEVICE_QUERY, &[&device.as_bytes().as_slice()])
        .await?
    {
        Some(row) => Ok(Some(record_of(*device, &row)?)),
        None => Ok(None),
    }
}

impl PgStore {
    pub(super) async fn register_device_async(
        &self,
        registration: &DeviceRegistration,
        now_ms: u64,
    ) -> Result<DeviceRecord, StoreError> {
        let max = self.limits.max_devices_per_user;
        let user = registration.user.as_bytes().as_slice();
        let device = registration.device.as_bytes().as_slice();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                // The user's row serialises registrations of one user.
                tx.execute(
                    "INSERT INTO hush_users (user_key) VALUES ($1) \
                     ON CONFLICT (user_key) DO UPDATE SET user_key = EXCLUDED.user_key",
                    &[&user],
                )
                .await?;
                if tx
                    .query_opt(
                        "SELECT 1 FROM hush_removed_devices WHERE device = $1",
                        &[&device],
                    )
                    .await?
                    .is_some()
                {
                    return Err(StoreError::DeviceRemoved.into());
                }
                if let Some(record) = load_device(tx, &registration.device).await? {
                    if record.registration == *registration {
                        return Ok(record);
                    }
                    return Err(StoreError::AlreadyRegistered.into());
                }
                let count: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM hush_devices WHERE user_key = $1",
                        &[&user],
                    )
                    .await?
                    .get(0);
                if from_db(count) >= u64::from(max) {
                    return Err(StoreError::DeviceLimit { max }.into());
                }
                let inserted = tx
                    .execute(
                        "INSERT INTO hush_devices (device, user_key, signing_key, agreement_key, \
                         user_signature, registered_at_ms, last_seen_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $6) \
                         ON CONFLICT (device) DO NOTHING",
                        &[
                            &device,
                            &user,
                            &registration.signing_key.as_slice(),
                            &registration.agreement_key.as_slice(),
                            &registration.user_signature.as_slice(),
                            &db_u64(now_ms),
                        ],
                    )
                    .await?;
                if inserted == 0 {
                    // Registered meanwhile under another user's lock.
                    return match load_device(tx, &registration.device).await? {
                        Some(record) if record.registration == *registration => Ok(record),
                        _ => Err(StoreError::AlreadyRegistered.into()),
                    };
                }
                tx.execute(
                    "INSERT INTO hush_inboxes (device) VALUES ($1) ON CONFLICT (device) DO NOTHING",
                    &[&device],
                )
                .await?;
                Ok(DeviceRecord {
                    registration: registration.clone(),
                    registered_at_ms: from_db(db_u64(now_ms)),
                })
            })
            .await
    }

    pub(super) async fn touch_device_async(
        &self,
        device: &DeviceId,
        now_ms: u64,
        granularity_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        // A read first: most connects find a recent value and write nothing.
        let Some(previous) = self.device_last_seen_async(device).await? else {
            return Ok(None);
        };
        if now_ms < previous.saturating_add(granularity_ms) {
            return Ok(Some(previous));
        }
        let d = device.as_bytes().as_slice();
        let (now, threshold) = (
            db_u64(now_ms),
            db_u64(now_ms.saturating_sub(granularity_ms)),
        );
        self.pool
            .with_client(async |c| {
                c.execute(
                    "UPDATE hush_devices SET last_seen_ms = $2 \
                     WHERE device = $1 AND last_seen_ms <= $3",
                    &[&d, &now, &threshold],
                )
                .await?;
                Ok::<_, TxError>(Some(previous))
            })
            .await
    }

    pub(super) async fn device_last_seen_async(
        &self,
        device: &DeviceId,
    ) -> Result<Option<u64>, StoreError> {
        let d = device.as_bytes().as_slice();
        self.pool
            .with_client(async |c| {
                Ok::<_, TxError>(
                    c.query_opt(
                        "SELECT last_seen_ms FROM hush_devices WHERE device = $1",
                        &[&d],
                    )
                    .await?
                    .map(|row| from_db(row.get(0))),
                )
            })
            .await
    }

    pub(super) async fn remove_device_async(
        &self,
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let stripe = self.next_stripe();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                remove_in_tx(tx, device, None, now_ms, stripe).await
            })
            .await
    }

    /// `Store::publish_device_list_removing`: the list and the removals in
    /// one transaction. The user's list row is locked first (as
    /// `publish_device_list_async` does), then each dropped device's row.
    pub(super) async fn publish_device_list_removing_async(
        &self,
        list: &SignedDeviceList,
        now_ms: u64,
    ) -> Result<(u64, Vec<DeviceId>), StoreError> {
        let user = list.list.user.as_bytes().as_slice();
        let encoded = encode_device_list(list)?;
        let version = list.list.version;
        let stripe = self.next_stripe();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                // A first publication of the user inserts the row; a
                // concurrent one is serialised by the primary key.
                tx.execute(
                    "INSERT INTO hush_device_lists (user_key, version, list) \
                     VALUES ($1, 0, $2) ON CONFLICT (user_key) DO NOTHING",
                    &[&user, &Vec::<u8>::new()],
                )
                .await?;
                let row = tx
                    .query_one(
                        "SELECT version, list FROM hush_device_lists WHERE user_key = $1 \
                         FOR UPDATE",
                        &[&user],
                    )
                    .await?;
                let raw: Vec<u8> = row.get(1);
                let previous = if raw.is_empty() {
                    None
                } else {
                    Some(decode_device_list(list.list.user, &raw)?)
                };
                if let Some(old) = &previous
                    && old.list.version >= version
                {
                    return Err(StoreError::StaleDeviceList {
                        stored: old.list.version,
                    }
                    .into());
                }
                tx.execute(
                    "UPDATE hush_device_lists SET version = $2, list = $3 WHERE user_key = $1",
                    &[&user, &db_u64(version), &encoded],
                )
                .await?;
                let mut removed = Vec::new();
                for d in super::super::dropped_devices(previous.as_ref(), list) {
                    if remove_in_tx(tx, &d, Some(&list.list.user), now_ms, stripe).await? {
                        removed.push(d);
                    }
                }
                Ok::<_, TxError>((version, removed))
            })
            .await
    }

    pub(super) async fn device_removed_async(
        &self,
        device: &DeviceId,
    ) -> Result<Option<u64>, StoreError> {
        let d = device.as_bytes().as_slice();
        self.pool
            .with_client(async |c| {
                Ok::<_, TxError>(
                    c.query_opt(
                        "SELECT removed_at_ms FROM hush_removed_devices WHERE device = $1",
                        &[&d],
                    )
                    .await?
                    .map(|row| from_db(row.get(0))),
                )
            })
            .await
    }

    pub(super) async fn lease_counts_async(
        &self,
        stale_before_ms: u64,
        owns: &(dyn Fn(&DeviceId) -> bool + Sync),
    ) -> Result<super::super::LeaseCounts, StoreError> {
        let before = db_u64(stale_before_ms);
        self.pool
            .with_client(async |c| {
                // The index on last_seen_ms finds the stale rows; only those
                // are read.
                let mut counts = super::super::LeaseCounts::default();
                for row in c
                    .query(
                        "SELECT device FROM hush_devices WHERE last_seen_ms < $1",
                        &[&before],
                    )
                    .await?
                {
                    if owns(&DeviceId(super::array(row.get(0), "device id")?)) {
                        counts.stale += 1;
                    }
                }
                for row in c
                    .query("SELECT device FROM hush_removed_devices", &[])
                    .await?
                {
                    if owns(&DeviceId(super::array(row.get(0), "device id")?)) {
                        counts.removed += 1;
                    }
                }
                Ok::<_, TxError>(counts)
            })
            .await
    }

    pub(super) async fn device_async(
        &self,
        device: &DeviceId,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        self.pool
            .with_client(async |c| load_device(c, device).await)
            .await
    }

    pub(super) async fn publish_prekeys_async(
        &self,
        device: &DeviceId,
        signed_prekey: &SignedPrekey,
        one_time: &[OneTimePrekey],
    ) -> Result<u32, StoreError> {
        let d = device.as_bytes().as_slice();
        let spk = encode_signed_prekey(signed_prekey);
        let cap = u64::from(self.limits.max_one_time_prekeys);
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                // The device row serialises publishers of one device.
                if tx
                    .query_opt(
                        "SELECT 1 FROM hush_devices WHERE device = $1 FOR UPDATE",
                        &[&d],
                    )
                    .await?
                    .is_none()
                {
                    return Err(StoreError::UnknownDevice.into());
                }
                tx.execute(
                    "INSERT INTO hush_signed_prekeys (device, prekey) VALUES ($1, $2) \
                     ON CONFLICT (device) DO UPDATE SET prekey = EXCLUDED.prekey",
                    &[&d, &spk.as_slice()],
                )
                .await?;
                let mut present: std::collections::BTreeSet<u32> = tx
                    .query(
                        "SELECT id FROM hush_one_time_prekeys WHERE device = $1",
                        &[&d],
                    )
                    .await?
                    .iter()
                    .filter_map(|r| u32::try_from(r.get::<_, i64>(0)).ok())
                    .collect();
                let mut count = present.len() as u64;
                let mut ids: Vec<i64> = Vec::new();
                let mut publics: Vec<&[u8]> = Vec::new();
                for otk in one_time {
                    if count >= cap {
                        break;
                    }
                    if present.insert(otk.id) {
                        ids.push(i64::from(otk.id));
                        publics.push(&otk.public);
                        count += 1;
                    }
                }
                if !ids.is_empty() {
                    tx.execute(
                        "INSERT INTO hush_one_time_prekeys (device, id, public) \
                         SELECT $1, * FROM unnest($2::bigint[], $3::bytea[]) \
                         ON CONFLICT DO NOTHING",
                        &[&d, &ids, &publics],
                    )
                    .await?;
                }
                Ok(u32::try_from(count).unwrap_or(u32::MAX))
            })
            .await
    }

    pub(super) async fn take_prekey_bundle_async(
        &self,
        device: &DeviceId,
    ) -> Result<Option<PrekeyBundle>, StoreError> {
        let d = device.as_bytes().as_slice();
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let record = load_device(tx, device)
                    .await?
                    .ok_or(StoreError::UnknownDevice)?;
                let Some(row) = tx
                    .query_opt(
                        "SELECT prekey FROM hush_signed_prekeys WHERE device = $1",
                        &[&d],
                    )
                    .await?
                else {
                    return Ok(None);
                };
                let signed_prekey = decode_signed_prekey(row.get(0))?;
                // Lowest id first; a key another transaction is taking is
                // skipped rather than waited for, and never handed out twice.
                let one_time_prekey = match tx
                    .query_opt(
                        "DELETE FROM hush_one_time_prekeys WHERE (device, id) = ( \
                         SELECT device, id FROM hush_one_time_prekeys WHERE device = $1 \
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, public",
                        &[&d],
                    )
                    .await?
                {
                    Some(row) => Some(OneTimePrekey {
                        id: u32::try_from(row.get::<_, i64>(0)).map_err(|_| {
                            StoreError::Backend("postgres store: corrupt one-time prekey id".into())
                        })?,
                        public: super::array(row.get(1), "one-time prekey")?,
                    }),
                    None => None,
                };
                let reg = record.registration;
                Ok(Some(PrekeyBundle {
                    device: *device,
                    user: reg.user,
                    signing_key: reg.signing_key,
                    agreement_key: reg.agreement_key,
                    signed_prekey,
                    one_time_prekey,
                }))
            })
            .await
    }

    pub(super) async fn one_time_prekeys_left_async(
        &self,
        device: &DeviceId,
    ) -> Result<u32, StoreError> {
        let d = device.as_bytes().as_slice();
        self.pool
            .with_client(async |c| {
                let n: i64 = c
                    .query_one(
                        "SELECT count(*) FROM hush_one_time_prekeys WHERE device = $1",
                        &[&d],
                    )
                    .await?
                    .get(0);
                Ok(u32::try_from(n).unwrap_or(u32::MAX))
            })
            .await
    }

    pub(super) async fn publish_device_list_async(
        &self,
        list: &SignedDeviceList,
    ) -> Result<u64, StoreError> {
        let user = list.list.user.as_bytes().as_slice();
        let encoded = encode_device_list(list)?;
        let version = list.list.version;
        self.pool
            .transaction(IsolationLevel::ReadCommitted, false, async |tx| {
                let stored = tx
                    .query_opt(
                        "SELECT list FROM hush_device_lists WHERE user_key = $1 FOR UPDATE",
                        &[&user],
                    )
                    .await?;
                if let Some(row) = stored {
                    let old = decode_device_list(list.list.user, row.get(0))?;
                    if old.list.version >= version {
                        return Err(StoreError::StaleDeviceList {
                            stored: old.list.version,
                        }
                        .into());
                    }
                }
                // A concurrent first publication of the same user may insert
                // meanwhile: the upsert then only replaces an older version.
                let written = tx
                    .execute(
                        "INSERT INTO hush_device_lists (user_key, version, list) \
                         VALUES ($1, $2, $3) ON CONFLICT (user_key) DO UPDATE \
                         SET version = EXCLUDED.version, list = EXCLUDED.list \
                         WHERE hush_device_lists.version < EXCLUDED.version",
                        &[&user, &db_u64(version), &encoded],
                    )
                    .await?;
                if written == 0 {
                    let row = tx
                        .query_one(
                            "SELECT list FROM hush_device_lists WHERE user_key = $1",
                            &[&user],
                        )
                        .await?;
                    let old = decode_device_list(list.list.user, row.get(0))?;
                    return Err(StoreError::StaleDeviceList {
                        stored: old.list.version,
                    }
                    .into());
                }
                Ok(version)
            })
            .await
    }

    pub(super) async fn device_list_async(
        &self,
        user: &UserKey,
    ) -> Result<Option<SignedDeviceList>, StoreError> {
        let u = user.as_bytes().as_slice();
        self.pool
            .with_client(async |c| {
                match c
                    .query_opt(
                        "SELECT list FROM hush_device_lists WHERE user_key = $1",
                        &[&u],
                    )
                    .await?
                {
                    Some(row) => Ok(Some(decode_device_list(*user, row.get(0))?)),
                    None => Ok(None),
                }
            })
            .await
    }
}

/// Remove `device` for good inside `tx` (see `Store::remove_device`): only
/// if registered and (with `user`) registered to that user.
async fn remove_in_tx(
    tx: &tokio_postgres::Transaction<'_>,
    device: &DeviceId,
    user: Option<&UserKey>,
    now_ms: u64,
    stripe: i16,
) -> Result<bool, TxError> {
    let d = device.as_bytes().as_slice();
    // The device row serialises this with registration and sends (which
    // lock the inbox row below).
    let Some(row) = tx
        .query_opt(
            "SELECT user_key FROM hush_devices WHERE device = $1 FOR UPDATE",
            &[&d],
        )
        .await?
    else {
        return Ok(false);
    };
    let owner: Vec<u8> = row.get(0);
    if user.is_some_and(|u| u.as_bytes().as_slice() != owner.as_slice()) {
        return Ok(false);
    }
    tx.query_opt(
        "SELECT 1 FROM hush_inboxes WHERE device = $1 FOR UPDATE",
        &[&d],
    )
    .await?;
    let gone = tx
        .query_one(
            "WITH d AS (DELETE FROM hush_envelopes WHERE device = $1 \
             RETURNING octet_length(body) AS len) \
             SELECT count(*), coalesce(sum(len), 0)::bigint FROM d",
            &[&d],
        )
        .await?;
    let (count, bytes) = (from_db(gone.get(0)), from_db(gone.get(1)));
    if count > 0 {
        let cost = bytes.saturating_add(count.saturating_mul(super::super::stored_cost(0)));
        tx.execute(
            "UPDATE hush_totals SET depth = depth - $2, stored = stored - $3 \
             WHERE stripe = $1",
            &[&stripe, &db_u64(count), &db_u64(cost)],
        )
        .await?;
    }
    for sql in [
        "DELETE FROM hush_tombstones WHERE device = $1",
        "DELETE FROM hush_inboxes WHERE device = $1",
        "DELETE FROM hush_signed_prekeys WHERE device = $1",
        "DELETE FROM hush_one_time_prekeys WHERE device = $1",
        "DELETE FROM hush_devices WHERE device = $1",
    ] {
        tx.execute(sql, &[&d]).await?;
    }
    tx.execute(
        "INSERT INTO hush_removed_devices (device, removed_at_ms) VALUES ($1, $2) \
         ON CONFLICT (device) DO NOTHING",
        &[&d, &db_u64(now_ms)],
    )
    .await?;
    Ok(true)
}
