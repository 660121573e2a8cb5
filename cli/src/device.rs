//! `hush device …`: this user's devices, and removing one.
//!
//! `device list` connects, fetches this user's signed device list with the
//! relay's leases, and prints one line per device: its id, whether it is
//! this device, when the relay last saw it and whether it is stale (stale
//! devices get no new messages). With `--json` one object per device:
//! `{"type": "device", "device", "this_device", "last_seen_ms", "stale"}`.
//! Last-seen and stale are the relay's word, not signed by anyone.
//!
//! `device remove ID` publishes a signed list without that device and waits
//! until the relay stored it. From then on the other devices encrypt
//! nothing to it, and the relay frees its inbox and refuses it.

use crate::commands::{open, reach, settle};
use crate::driver::Outcome;
use crate::error::CliError;
use crate::output::{Printer, Style, out_line};
use hush_client::Command;
use hush_protocol::DeviceId;
use serde_json::json;
use std::time::Duration;
use tokio::time::Instant;

/// How long to wait for the list (and leases) or the removal to be stored.
const DEVICE_BOUND: Duration = Duration::from_secs(10);
/// After the goal, how long to keep flushing other work.
const FLUSH: Duration = Duration::from_secs(2);

/// `hush device …`.
#[derive(Debug, clap::Subcommand)]
pub enum DeviceCmd {
    /// List this user's devices: id, this device, last seen, stale.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Remove another device of this user (by its id from `hush device
    /// list`): it receives nothing sent afterwards and the relay refuses it.
    Remove {
        /// The device id (32 hex digits).
        id: String,
    },
}

/// Run one `hush device` subcommand.
pub async fn run(home: &crate::home::Home, cmd: DeviceCmd) -> Result<(), CliError> {
    match cmd {
        DeviceCmd::List { json } => list(home, if json { Style::Json } else { Style::Human }).await,
        DeviceCmd::Remove { id } => remove(home, &id).await,
    }
}

async fn list(home: &crate::home::Home, style: Style) -> Result<(), CliError> {
    let mut d = open(home)?;
    let mut sink = Printer::new(Style::Human, false);
    reach(&mut d, crate::commands::CONNECT_BUDGET, &mut sink).await?;
    // Wait for this user's list with its leases.
    let mut stop = None;
    d.run_until(Instant::now() + DEVICE_BOUND, &mut stop, &mut sink, |v| {
        let devices = v.engine.own_devices();
        v.engine.removed()
            || (!devices.is_empty() && devices.iter().all(|i| i.last_seen_ms.is_some()))
    })
    .await?;
    if d.engine().removed() {
        d.shutdown().await;
        return Err(CliError::DeviceRemoved);
    }
    for info in d.engine().own_devices() {
        match style {
            Style::Json => out_line(
                &json!({"type": "device", "device": info.device.to_hex(),
                        "this_device": info.this_device, "last_seen_ms": info.last_seen_ms,
                        "stale": info.stale})
                .to_string(),
            ),
            Style::Human => out_line(&format!(
                "{}{}  last seen {}{}",
                info.device.to_hex(),
                if info.this_device {
                    "  (this device)"
                } else {
                    ""
                },
                info.last_seen_ms
                    .map_or("unknown".to_string(), |t| format!("{t} ms")),
                if info.stale { "  STALE" } else { "" }
            )),
        }
    }
    settle(&mut d, FLUSH, &mut sink).await?;
    d.shutdown().await;
    Ok(())
}

async fn remove(home: &crate::home::Home, id: &str) -> Result<(), CliError> {
    let device = DeviceId::from_hex(id.trim()).map_err(|_| CliError::Invalid {
        what: "device id",
        reason: "expected 32 hex digits (see `hush device list`)".into(),
    })?;
    let mut d = open(home)?;
    if device == d.engine().device_id() {
        return Err(CliError::Invalid {
            what: "device id",
            reason: "that is this device: remove it from another of your devices".into(),
        });
    }
    let mut sink = Printer::new(Style::Human, false);
    reach(&mut d, crate::commands::CONNECT_BUDGET, &mut sink).await?;
    // The newest list first, so the removal builds on it.
    let mut stop = None;
    d.run_until(Instant::now() + DEVICE_BOUND, &mut stop, &mut sink, |v| {
        v.engine
            .own_devices()
            .iter()
            .any(|i| i.last_seen_ms.is_some())
    })
    .await?;
    let me = d.engine().user_key();
    if !d.engine().devices_of(&me).contains(&device) {
        d.shutdown().await;
        return Err(CliError::UnknownDevice(id.to_string()));
    }
    d.command(Command::RemoveDevice { device }, &mut sink)
        .await?;
    let outcome = d
        .run_until(Instant::now() + DEVICE_BOUND, &mut stop, &mut sink, |v| {
            !v.engine.devices_of(&v.engine.user_key()).contains(&device) && v.outstanding == 0
        })
        .await?;
    if outcome != Outcome::Done {
        d.shutdown().await;
        return Err(CliError::NotConfirmed(format!(
            "the relay did not confirm the new device list within {} s",
            DEVICE_BOUND.as_secs()
        )));
    }
    out_line(&format!("device {} removed", device.to_hex()));
    // Hand the new list to every contact device and this user's other
    // devices (engine `announce_removal`) before exiting.
    settle(&mut d, DEVICE_BOUND, &mut sink).await?;
    d.shutdown().await;
    Ok(())
}
