//! The home directory of one device: `client.redb` (the engine's store,
//! secrets included) and `relay.json` (where the relay is and which
//! certificate it must present).
//!
//! The directory is created with mode 0700 and `relay.json` is written
//! atomically (temporary file, then rename).

use crate::error::CliError;
use crate::transport::{CertCheck, RelayTarget};
use hush_client::{FileStorage, Storage};
use std::path::{Path, PathBuf};

/// File name of the client store.
pub const DB_FILE: &str = "client.redb";
/// File name of the relay settings.
pub const RELAY_FILE: &str = "relay.json";

/// A device's home directory.
#[derive(Debug, Clone)]
pub struct Home {
    dir: PathBuf,
}

impl Home {
    /// `explicit` (from `--home` or `$HUSH_HOME`), else `~/.hush`.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Home, CliError> {
        if let Some(dir) = explicit {
            return Ok(Home { dir });
        }
        match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => Ok(Home {
                dir: PathBuf::from(h).join(".hush"),
            }),
            _ => Err(CliError::Invalid {
                what: "home directory",
                reason: "neither --home, $HUSH_HOME nor $HOME is set".into(),
            }),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The client store's path.
    pub fn db_path(&self) -> PathBuf {
        self.dir.join(DB_FILE)
    }

    fn relay_path(&self) -> PathBuf {
        self.dir.join(RELAY_FILE)
    }

    /// Create the directory (private to the user) if missing.
    pub fn create_dir(&self) -> Result<(), CliError> {
        let io = |source| CliError::Io {
            what: "cannot create",
            path: self.dir.clone(),
            source,
        };
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(io)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io)?;
            }
        }
        Ok(())
    }

    /// Open the store, creating it if needed; a store held by another
    /// process is [`CliError::InUse`].
    pub fn open_storage(&self) -> Result<FileStorage, CliError> {
        FileStorage::open(self.db_path()).map_err(|e| {
            let text = e.to_string().to_ascii_lowercase();
            if text.contains("already open") || text.contains("lock") {
                CliError::InUse(self.dir.clone())
            } else {
                CliError::Storage(e)
            }
        })
    }

    /// Open the store of an initialised device.
    pub fn open_existing(&self) -> Result<FileStorage, CliError> {
        if !self.db_path().is_file() {
            return Err(CliError::NotInitialised(self.dir.clone()));
        }
        let storage = self.open_storage()?;
        if !has_device(&storage)? {
            return Err(CliError::NotInitialised(self.dir.clone()));
        }
        Ok(storage)
    }

    /// True if a device exists here.
    pub fn is_initialised(&self) -> Result<bool, CliError> {
        if !self.db_path().is_file() {
            return Ok(false);
        }
        has_device(&self.open_storage()?)
    }

    /// Save the relay settings.
    pub fn save_relay(&self, target: &RelayTarget) -> Result<(), CliError> {
        let cert = match target.cert {
            CertCheck::Pinned(h) => serde_json::Value::String(hex::encode(h)),
            CertCheck::SystemRoots => serde_json::Value::Null,
        };
        let doc = serde_json::json!({ "relay": target.addr, "cert_sha256": cert });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| CliError::Invalid {
            what: "relay settings",
            reason: e.to_string(),
        })?;
        let path = self.relay_path();
        let tmp = self.dir.join(format!("{RELAY_FILE}.tmp"));
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| CliError::Io { what, path, source }
        };
        std::fs::write(&tmp, text + "\n").map_err(io("cannot write", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io("cannot write", &path))?;
        Ok(())
    }

    /// Load the relay settings (`fallback_addr` if the file is missing: the
    /// engine remembers its relay too).
    pub fn load_relay(&self, fallback_addr: &str) -> Result<RelayTarget, CliError> {
        let path = self.relay_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(RelayTarget {
                    addr: fallback_addr.to_string(),
                    cert: CertCheck::SystemRoots,
                });
            }
            Err(source) => {
                return Err(CliError::Io {
                    what: "cannot read",
                    path,
                    source,
                });
            }
        };
        let bad = |reason: String| CliError::Invalid {
            what: "relay settings",
            reason: format!("{}: {reason}", path.display()),
        };
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let addr = doc
            .get("relay")
            .and_then(|v| v.as_str())
            .ok_or_else(|| bad("no \"relay\"".into()))?
            .to_string();
        let cert = match doc.get("cert_sha256") {
            Some(serde_json::Value::String(h)) => CertCheck::Pinned(CertCheck::parse_hash(h)?),
            Some(serde_json::Value::Null) | None => CertCheck::SystemRoots,
            Some(_) => return Err(bad("\"cert_sha256\" must be a hex string or null".into())),
        };
        Ok(RelayTarget { addr, cert })
    }
}

fn has_device(storage: &FileStorage) -> Result<bool, CliError> {
    Ok(storage.get(b"s/device")?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_settings_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("h"))).unwrap();
        home.create_dir().unwrap();
        let pinned = RelayTarget {
            addr: "127.0.0.1:4433".into(),
            cert: CertCheck::Pinned([7; 32]),
        };
        home.save_relay(&pinned).unwrap();
        let back = home.load_relay("x:1").unwrap();
        assert_eq!(back.addr, "127.0.0.1:4433");
        assert_eq!(back.cert, CertCheck::Pinned([7; 32]));
        let roots = RelayTarget {
            addr: "relay.example:443".into(),
            cert: CertCheck::SystemRoots,
        };
        home.save_relay(&roots).unwrap();
        assert_eq!(home.load_relay("x:1").unwrap().cert, CertCheck::SystemRoots);
    }

    #[test]
    fn empty_home_is_not_initialised() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_path_buf())).unwrap();
        assert!(!home.is_initialised().unwrap());
        assert!(matches!(
            home.open_existing(),
            Err(CliError::NotInitialised(_))
        ));
    }
}
