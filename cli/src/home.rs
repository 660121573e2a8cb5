//! The home directory of one device: `client.redb` (the engine's store,
//! every value sealed) and `client.redb-journal` (its recent batches,
//! sealed too), `store.key` (the store's key, unless a passphrase
//! or a key file elsewhere is used) and `relay.json` (where the relay is
//! and which certificate it must present).
//!
//! The directory is kept at mode 0700 and every file in it at 0600: on
//! every open, so a home that was created or copied with wider permissions
//! is tightened, and again after the store is opened, which covers files
//! redb or an editor created under the user's umask. `relay.json` is written
//! atomically (temporary file, then rename).
//!
//! The store's key comes from, in order: `$HUSH_PASSPHRASE` (Argon2id, the
//! salt and cost in the store's header), else the key file
//! `$HUSH_KEY_FILE`, else `<home>/store.key` (created with a fresh random
//! key for a new store). A key file outside the home must not be readable
//! by others: it is refused, not silently used.

use crate::error::CliError;
use crate::transport::{CertCheck, RelayTarget, Transport};
use hush_client::{FileStorage, Storage, StorageError, StoreKey, Unlock};
use std::path::{Path, PathBuf};

/// File name of the client store.
pub const DB_FILE: &str = "client.redb";
/// File name of the relay settings.
pub const RELAY_FILE: &str = "relay.json";
/// File name of the store's key file in the home.
pub const KEY_FILE: &str = "store.key";
/// Environment variable: a passphrase the store's key is derived from.
pub const PASSPHRASE_ENV: &str = "HUSH_PASSPHRASE";
/// Environment variable: the key file's path (default `<home>/store.key`).
pub const KEY_FILE_ENV: &str = "HUSH_KEY_FILE";

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

    /// Create the directory (private to the user) if missing, and tighten
    /// it and its files.
    pub fn create_dir(&self) -> Result<(), CliError> {
        if !self.dir.exists() {
            std::fs::create_dir_all(&self.dir).map_err(|source| CliError::Io {
                what: "cannot create",
                path: self.dir.clone(),
                source,
            })?;
        }
        self.secure()
    }

    /// Mode 0700 on the directory and 0600 on every file in it (symbolic
    /// links and subdirectories are left alone). Nothing to do if the
    /// directory does not exist.
    pub fn secure(&self) -> Result<(), CliError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let io = |path: &Path| {
                let path = path.to_path_buf();
                move |source| CliError::Io {
                    what: "cannot restrict permissions of",
                    path,
                    source,
                }
            };
            let meta = match std::fs::symlink_metadata(&self.dir) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io(&self.dir)(e)),
            };
            if meta.is_dir() && meta.permissions().mode() & 0o777 != 0o700 {
                std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(&self.dir))?;
            }
            for entry in std::fs::read_dir(&self.dir).map_err(io(&self.dir))? {
                let entry = entry.map_err(io(&self.dir))?;
                let path = entry.path();
                let meta = entry.metadata().map_err(io(&path))?;
                if meta.is_file() && meta.permissions().mode() & 0o777 != 0o600 {
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                        .map_err(io(&path))?;
                }
            }
        }
        Ok(())
    }

    /// The key file's path: `$HUSH_KEY_FILE`, else `<home>/store.key`.
    pub fn key_path(&self) -> PathBuf {
        match std::env::var_os(KEY_FILE_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => self.dir.join(KEY_FILE),
        }
    }

    /// How to unlock the store, and whether a new key file was written for
    /// it (to remove again if the store turns out to be sealed otherwise).
    fn unlock(&self) -> Result<(Unlock, Option<PathBuf>), CliError> {
        if let Ok(p) = std::env::var(PASSPHRASE_ENV)
            && !p.is_empty()
        {
            return Ok((Unlock::passphrase(p), None));
        }
        let path = self.key_path();
        match read_key_file(&path, path.starts_with(&self.dir))? {
            Some(key) => Ok((Unlock::Key(key), None)),
            None => {
                let key = StoreKey::generate()?;
                write_key_file(&path, &key)?;
                Ok((Unlock::Key(key), Some(path)))
            }
        }
    }

    /// Open the store, creating it if needed; a store held by another
    /// process is [`CliError::InUse`], a wrong key or passphrase
    /// [`StorageError::WrongKey`].
    pub fn open_storage(&self) -> Result<FileStorage, CliError> {
        self.secure()?;
        let (unlock, created) = self.unlock()?;
        let opened = FileStorage::open(self.db_path(), &unlock);
        if let (Err(_), Some(path)) = (&opened, &created) {
            // The key file was made for this open: the store it was meant
            // for is sealed otherwise (or did not open), so do not leave a
            // key behind that opens nothing.
            let _ = std::fs::remove_file(path);
        }
        let storage = opened.map_err(|e| match e {
            StorageError::WrongKey(_) if created.is_some() => CliError::Invalid {
                what: "key file",
                reason: format!(
                    "{} is missing, and the store {} is sealed with a key; restore the key file \
                     (or set ${KEY_FILE_ENV} to it), or set ${PASSPHRASE_ENV} if it was sealed \
                     with a passphrase",
                    self.key_path().display(),
                    self.db_path().display()
                ),
            },
            e => {
                let text = e.to_string().to_ascii_lowercase();
                if text.contains("already open") || text.contains("lock") {
                    CliError::InUse(self.dir.clone())
                } else {
                    CliError::Storage(e)
                }
            }
        })?;
        // redb created the file under the umask: tighten it now.
        self.secure()?;
        Ok(storage)
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
        write_private(&tmp, (text + "\n").as_bytes(), false).map_err(io("cannot write", &tmp))?;
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
                    transport: Transport::configured(),
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
        Ok(RelayTarget {
            addr,
            cert,
            transport: Transport::configured(),
        })
    }
}

/// Write a file readable by the user only (mode 0600 from its creation;
/// `new`: fail if it exists).
fn write_private(path: &Path, bytes: &[u8], new: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if new {
        options.create_new(true);
    } else {
        options.create(true).truncate(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // An existing file keeps its mode through `open`: set it.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)?;
    file.sync_all()
}

/// A new key file holding `key` in hex (it must not exist yet).
fn write_key_file(path: &Path, key: &StoreKey) -> Result<(), CliError> {
    let text = zeroize::Zeroizing::new(format!("{}\n", hex::encode(key.as_bytes())));
    write_private(path, text.as_bytes(), true).map_err(|source| CliError::Io {
        what: "cannot write key file",
        path: path.to_path_buf(),
        source,
    })
}

/// The key in a key file (`None` if there is none). A file in the home is
/// tightened to 0600 by [`Home::secure`]; one elsewhere must already be
/// private to the user.
fn read_key_file(path: &Path, in_home: bool) -> Result<Option<StoreKey>, CliError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => zeroize::Zeroizing::new(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CliError::Io {
                what: "cannot read key file",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let bad = |reason: &str| CliError::Invalid {
        what: "key file",
        reason: format!("{}: {reason}", path.display()),
    };
    #[cfg(unix)]
    if !in_home {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)
            .map_err(|source| CliError::Io {
                what: "cannot read key file",
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(bad(&format!(
                "readable by others (mode {:o}); make it private with chmod 600",
                mode & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = in_home;
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("not hex text"))?;
    let mut key = zeroize::Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(text.trim(), &mut *key)
        .map_err(|_| bad("must hold 64 hex digits (a 32-byte key)"))?;
    Ok(Some(StoreKey::from_bytes(*key)))
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
            transport: Transport::Auto,
        };
        home.save_relay(&pinned).unwrap();
        let back = home.load_relay("x:1").unwrap();
        assert_eq!(back.addr, "127.0.0.1:4433");
        assert_eq!(back.cert, CertCheck::Pinned([7; 32]));
        let roots = RelayTarget {
            addr: "relay.example:443".into(),
            cert: CertCheck::SystemRoots,
            transport: Transport::Auto,
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
