//! Finding workspace binaries from a test.
//!
//! Cargo only hands a test the paths of binaries of its own package, and the
//! relay lives in another one. So the harness asks Cargo itself, once per test
//! process: `cargo build --workspace --profile test --bin <name>
//! --message-format=json` builds the binary if it is missing or stale (a no-op
//! taking a fraction of a second when it is fresh) and reports where it put
//! it. This keeps plain
//! `cargo test` working on a fresh checkout and never runs a stale relay.
//! Cargo does not hold its build lock while tests run, so the nested build
//! cannot deadlock with the `cargo test` that started us.
//!
//! `HUSH_BIN_<NAME>` (name upper-cased, `-` as `_`, e.g. `HUSH_BIN_HUSH_RELAY`)
//! overrides the lookup with an explicit path.

use crate::{HarnessError, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// Paths resolved so far in this process; the lock also serialises builds.
fn cache() -> &'static Mutex<HashMap<String, PathBuf>> {
    static CACHE: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    CACHE.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The path of workspace binary `name`, whose package has the same name
/// (true of `hush-relay`). See [`bin_path_in`].
pub fn bin_path(name: &str) -> Result<PathBuf> {
    bin_path_in(name, name)
}

/// The path of binary `name` of workspace package `package`, built first if
/// missing or out of date (once per test process).
pub fn bin_path_in(package: &str, name: &str) -> Result<PathBuf> {
    let env_key = format!("HUSH_BIN_{}", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&env_key) {
        return Ok(PathBuf::from(p));
    }
    let mut cache = cache()
        .lock()
        .map_err(|_| HarnessError::Build("binary cache lock poisoned".into()))?;
    if let Some(p) = cache.get(name) {
        return Ok(p.clone());
    }
    let path = build(package, name)?;
    cache.insert(name.to_string(), path.clone());
    Ok(path)
}

/// The Cargo profile directory the running test executable lives in
/// (`…/target/<profile>/deps/<test>` → `…/target/<profile>`).
fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let dir = if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()?
    } else {
        dir
    };
    Some(dir.to_path_buf())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Variables Cargo sets for a running test that must not leak into a build.
const CARGO_TEST_VARS: &[&str] = &[
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
    "OUT_DIR",
];

fn build(package: &str, name: &str) -> Result<PathBuf> {
    let profile_dir = profile_dir();
    let sibling = profile_dir.as_ref().map(|d| d.join(name));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--message-format=json-render-diagnostics"])
        .args(["--workspace", "--bin", name]);
    match profile_dir
        .as_ref()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
    {
        // Test executables in `debug` come from the `test` profile: building
        // the binary with it (and with workspace-wide feature unification,
        // as `cargo test --workspace` does) reuses every dependency the test
        // build already compiled.
        Some("debug") | None => {
            cmd.args(["--profile", "test"]);
        }
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    // Cargo sets package variables for the test process; build scripts that
    // watch them (ring watches CARGO_MANIFEST_DIR) would otherwise see a
    // change and rebuild half the dependency tree on every run.
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if CARGO_TEST_VARS.contains(&key_str.as_ref())
            || key_str.starts_with("CARGO_PKG_")
            || key_str.starts_with("CARGO_BIN_EXE_")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null()).stderr(Stdio::inherit());
    let output = match cmd.output() {
        Ok(o) => o,
        // No cargo at hand (test binary run directly): use what is there.
        Err(e) => {
            return match sibling {
                Some(p) if p.is_file() => Ok(p),
                _ => Err(HarnessError::Build(format!(
                    "cannot run cargo to build {name}: {e}"
                ))),
            };
        }
    };
    if !output.status.success() {
        return Err(HarnessError::Build(format!(
            "cargo build --bin {name} (package {package}) failed ({})",
            output.status
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    if let Some(p) = stdout.lines().find_map(|l| executable_of(l, name)) {
        return Ok(p);
    }
    match sibling {
        Some(p) if p.is_file() => Ok(p),
        _ => Err(HarnessError::Build(format!(
            "cargo built {name} but did not report its executable"
        ))),
    }
}

/// The `executable` of a Cargo `compiler-artifact` message for bin `name`.
/// A small string scan instead of a JSON parser: Cargo writes these lines
/// itself and escapes nothing in ordinary paths.
fn executable_of(line: &str, name: &str) -> Option<PathBuf> {
    if !line.contains("\"reason\":\"compiler-artifact\"")
        || !line.contains("\"kind\":[\"bin\"]")
        || !line.contains(&format!("\"name\":\"{name}\""))
    {
        return None;
    }
    let key = "\"executable\":\"";
    let start = line.find(key)? + key.len();
    let end = start + line[start..].find('"')?;
    let path = PathBuf::from(&line[start..end]);
    path.is_file().then_some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cargo_artifact_line() {
        let exe = std::env::current_exe().unwrap();
        let line = format!(
            "{{\"reason\":\"compiler-artifact\",\"target\":{{\"kind\":[\"bin\"],\"name\":\"x\"}},\"executable\":\"{}\",\"fresh\":true}}",
            exe.display()
        );
        assert_eq!(executable_of(&line, "x"), Some(exe.clone()));
        assert_eq!(executable_of(&line, "y"), None);
        assert_eq!(executable_of("{\"reason\":\"build-finished\"}", "x"), None);
    }
}
