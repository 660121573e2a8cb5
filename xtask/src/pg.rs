//! Setup of PostgreSQL for the tests of the PostgreSQL store: the server
//! binaries (`initdb`, `pg_ctl`, `pg_basebackup`, `postgres`, `psql`) must be
//! installed; the tests start their own throwaway servers and never touch a
//! system-wide instance.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Install Debian's `postgresql` (with sudo when not root) if `initdb` is
/// not found where the test harness looks (`pg_config --bindir`, then
/// `/usr/lib/postgresql/*/bin`).
pub fn ensure_postgres() -> super::Result {
    if let Some(bin) = find_initdb() {
        println!("postgres: found {}", bin.display());
        return Ok(());
    }
    println!("postgres: initdb not found; installing Debian's postgresql");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut c = Command::new("sudo");
            c.arg("apt-get");
            c
        };
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        super::run(&mut cmd)
    };
    apt(&["update", "-q"])?;
    apt(&[
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "postgresql",
    ])?;
    // The package may start a cluster of its own on port 5432; the tests
    // leave it alone and run their servers on free ports.
    match find_initdb() {
        Some(bin) => {
            println!("postgres: installed {}", bin.display());
            Ok(())
        }
        None => Err("postgresql installed but initdb is still not found".into()),
    }
}

fn find_initdb() -> Option<PathBuf> {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join("initdb"));
    if let Some(p) = from_pg_config.filter(|p| p.is_file()) {
        return Some(p);
    }
    std::fs::read_dir(Path::new("/usr/lib/postgresql"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin").join("initdb"))
        .find(|p| p.is_file())
}
