//! `cargo xtask`: the one entry point for building, testing and running Hush.
//!
//! ```text
//! cargo xtask test [--quick]         every test of the project; installs what is missing
//! cargo xtask build-wasm             the browser package (npm `hush-client`) into web-demo/pkg/,
//!                                    then the demo page with its integrity hashes
//! cargo xtask page                   only the demo page (web-demo/index.html, integrity.json)
//! cargo xtask demo [-- RELAY-ARGS]   the relay with the demo page on http://127.0.0.1:8080
//! cargo xtask cluster                PostgreSQL primary + sync standby, two relays with the demo
//! cargo xtask bench [-- BENCH-ARGS]  the benchmarks that exist
//! cargo xtask bench --peers [-- ARGS] Hush against Redis and NATS JetStream (peers.rs)
//! cargo xtask bench --cluster [-- ARGS] redb, PostgreSQL and two nodes (cluster.rs)
//! cargo xtask fuzz TARGET [SECS]     one fuzz target for SECS seconds (default 60)
//! ```
//!
//! Plain `std::process::Command` and no dependencies, so it builds in seconds on a
//! fresh machine before anything else is installed.

mod cluster;
mod peers;
mod pg;
mod sri;

use std::env;
use std::error::Error;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

type Result<T = (), E = Box<dyn Error>> = std::result::Result<T, E>;

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Crates that must build (and pass clippy) for the browser. Their wasm32-only code
/// (hush-client's `src/wasm/`) is invisible to the native clippy run.
const WASM_CRATES: &[&str] = &["hush-crypto", "hush-protocol", "hush-client"];

/// Where the browser package is written (served by the demo, used by its tests).
const WASM_PKG_DIR: &str = "web-demo/pkg";
/// The cargo profile of the browser build (root Cargo.toml: opt-level 3, fat LTO).
const WASM_PROFILE: &str = "wasm-release";
/// Files copied verbatim from client-wasm/pkg-template/ into the package.
const PKG_TEMPLATE_FILES: &[&str] = &["package.json", "README.md"];

/// Crate folders and their package names, for finding benchmarks.
const CRATES: &[(&str, &str)] = &[
    ("crypto", "hush-crypto"),
    ("protocol", "hush-protocol"),
    ("relay", "hush-relay"),
    ("client-wasm", "hush-client"),
    ("cli", "hush-cli"),
    ("tests", "hush-tests"),
];

const DEMO_URL: &str = "http://127.0.0.1:8080";
const DEMO_RELAY_ARGS: &[&str] = &[
    "--listen",
    "127.0.0.1:4433",
    "--data",
    "./hush-data",
    "--http",
    "127.0.0.1:8080",
    "--dev-cert",
    "--demo",
];

/// Environment variables the deterministic simulator reads; `cargo test` inherits them.
const SIM_ENV: &[&str] = &["HUSH_SIM_SEEDS", "HUSH_SIM_SEED"];

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  test [--quick]        run every test of the project; installs what is missing first
                        (--quick: only `cargo test --workspace`: no setup, fmt, clippy, wasm, fuzz)
  build-wasm            build the browser package `hush-client` into web-demo/pkg/,
                        then the demo page (web-demo/index.html) with its integrity hashes
  page                  write only the demo page and web-demo/integrity.json again
                        (after editing web-demo/index.html.in, app.js or style.css)
  demo [-- ARGS]        build and run the relay with the demo page on http://127.0.0.1:8080
  cluster               a PostgreSQL primary + synchronous standby and two relay nodes
                        with the demo (http://127.0.0.1:8080, :8081); Ctrl-C stops all
  bench [-- ARGS]       run the benchmarks that exist (ARGS go to the bench binaries)
  bench --peers         Hush against Redis and NATS JetStream (installs them)
  bench --e2e-latency   online end-to-end delivery latency at 1,000 msgs/s
  bench --idle-devices  relay RSS and CPU with 10,000 idle devices
  bench --cluster       redb, PostgreSQL (± sync standby) and two nodes (cluster_bench)
  fuzz TARGET [SECS]    run one fuzz target for SECS seconds (default 60; needs nightly)
  help                  show this text";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    match dispatch(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(args: &[String]) -> Result {
    let Some((command, rest)) = args.split_first() else {
        println!("{USAGE}");
        return Err("no command given".into());
    };
    env::set_current_dir(workspace_root()?)?;
    match command.as_str() {
        "test" => test(rest),
        "build-wasm" => {
            if let Some(extra) = rest.first() {
                return Err(format!("`build-wasm` takes no arguments (got `{extra}`)").into());
            }
            build_wasm_package()
        }
        "page" => {
            if let Some(extra) = rest.first() {
                return Err(format!("`page` takes no arguments (got `{extra}`)").into());
            }
            write_page()
        }
        "demo" => demo(rest),
        "cluster" => cluster::cluster(rest),
        "bench" => bench(rest),
        "fuzz" => fuzz(rest),
        "help" | "-h" | "--help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => {
            println!("{USAGE}");
            Err(format!("unknown command `{other}`").into())
        }
    }
}

/// The workspace root: the parent of this crate's folder. `cargo run` sets
/// CARGO_MANIFEST_DIR at run time too; prefer that so a moved clone still works.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest_dir
        .parent()
        .ok_or("xtask's folder has no parent")?
        .to_path_buf();
    if !root.join("Cargo.toml").is_file() {
        return Err(format!(
            "no Cargo.toml in {}: is this the Hush workspace?",
            root.display()
        )
        .into());
    }
    Ok(root)
}

/// Everything after a leading `--`, so both `demo -- ARGS` and `demo ARGS` work.
fn passthrough(args: &[String]) -> &[String] {
    match args.split_first() {
        Some((first, rest)) if first == "--" => rest,
        _ => args,
    }
}

// ---------------------------------------------------------------------------
// cargo xtask test
// ---------------------------------------------------------------------------

fn test(args: &[String]) -> Result {
    let mut quick = false;
    for arg in args {
        match arg.as_str() {
            "--quick" => quick = true,
            other => {
                return Err(format!("unknown option `{other}` for `test` (known: --quick)").into());
            }
        }
    }
    for var in SIM_ENV {
        if let Ok(value) = env::var(var) {
            println!("xtask: passing {var}={value} to the tests");
        }
    }

    let mut steps = Steps::default();
    if quick {
        steps.run("cargo test", cargo_test)?;
    } else {
        steps.run("setup", setup)?;
        steps.run("fmt", fmt_check)?;
        steps.run("clippy", clippy)?;
        steps.run("cargo test", cargo_test)?;
        steps.run("wasm32 build", wasm_build)?;
        steps.run("fuzz build", fuzz_build)?;
        steps.run("browser tests", browser_tests)?;
    }
    steps.finish();
    Ok(())
}

/// What a step did, when it did not fail.
enum Outcome {
    Passed,
    Skipped(String),
}

struct Record {
    name: &'static str,
    result: Result<Outcome, String>,
    took: Duration,
    /// The build output's size and the disk's free space after the step, so a
    /// run that fills the disk says which step grew it.
    disk: String,
}

#[derive(Default)]
struct Steps {
    records: Vec<Record>,
}

impl Steps {
    /// Runs one step under a `==> name` header; on failure prints the summary so far
    /// and returns the error, so the caller stops at the first failing step.
    fn run(&mut self, name: &'static str, step: fn() -> Result<Outcome>) -> Result {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = step().map_err(|e| e.to_string());
        let took = start.elapsed();
        match &result {
            Ok(Outcome::Passed) => println!("<== {name}: ok ({})", format_duration(took)),
            Ok(Outcome::Skipped(why)) => {
                println!("<== {name}: skipped: {why} ({})", format_duration(took));
            }
            Err(e) => println!("<== {name}: FAILED after {}: {e}", format_duration(took)),
        }
        let disk = disk_report();
        println!("    disk: {disk}");
        let failed = result.as_ref().err().cloned();
        self.records.push(Record {
            name,
            result,
            took,
            disk,
        });
        match failed {
            None => Ok(()),
            Some(e) => {
                self.print_table();
                Err(format!("step `{name}` failed: {e}").into())
            }
        }
    }

    fn print_table(&self) {
        let width = self
            .records
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!("\n==> summary");
        println!(
            "  {:<width$}  {:<7}  {:>8}  {:<34}",
            "step", "result", "time", "disk after"
        );
        for record in &self.records {
            let (result, note) = match &record.result {
                Ok(Outcome::Passed) => ("ok", String::new()),
                Ok(Outcome::Skipped(why)) => ("skipped", why.clone()),
                Err(_) => ("FAILED", String::new()),
            };
            let time = format_duration(record.took);
            let disk = &record.disk;
            let row = format!(
                "  {:<width$}  {result:<7}  {time:>8}  {disk:<34}  {note}",
                record.name
            );
            println!("{}", row.trim_end());
        }
    }

    fn finish(&self) {
        self.print_table();
        let skipped = self
            .records
            .iter()
            .filter(|r| matches!(r.result, Ok(Outcome::Skipped(_))))
            .count();
        let passed = self.records.len() - skipped;
        let noun = if passed == 1 { "step" } else { "steps" };
        if skipped == 0 {
            println!("xtask: all {passed} {noun} passed");
        } else {
            println!("xtask: all {passed} {noun} passed, {skipped} skipped");
        }
    }
}

/// "target 3.2 GiB, 41.0 GiB free": the build output (Cargo's target directory
/// and the fuzz crate's) and the free space on the clone's disk.
fn disk_report() -> String {
    let built = dir_bytes(&target_dir()) + dir_bytes(Path::new("fuzz/target"));
    let free = match free_bytes() {
        Some(bytes) => format!("{} free", format_gib(bytes)),
        None => "free space unknown".to_string(),
    };
    format!("target {}, {free}", format_gib(built))
}

/// Bytes in the files under `dir` (0 if it does not exist); symlinks are not followed.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    total
}

/// Free bytes on the disk holding the current directory, from POSIX `df -Pk`.
fn free_bytes() -> Option<u64> {
    let out = capture(Command::new("df").args(["-Pk", "."])).ok()?;
    let line = out.lines().nth(1)?;
    let kib: u64 = line.split_whitespace().nth(3)?.parse().ok()?;
    Some(kib * 1024)
}

fn format_gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn format_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        format!("{secs:.1}s")
    } else {
        let whole = d.as_secs();
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// Step 1: install whatever the later steps need and this machine lacks.
fn setup() -> Result<Outcome> {
    pg::ensure_postgres()?;
    ensure_rust_components()?;
    ensure_wasm_target()?;
    if has_nightly()? {
        ensure_cargo_fuzz()?;
    } else {
        println!("fuzz build will be skipped: no nightly toolchain is installed");
    }
    if client_uses_wasm_bindgen()? {
        ensure_wasm_bindgen()?;
    }
    let web_demo = Path::new("web-demo");
    if web_demo.join("package.json").is_file() {
        ensure_chromium()?;
        ensure_npm_packages(web_demo)?;
    }
    Ok(Outcome::Passed)
}

fn fmt_check() -> Result<Outcome> {
    let hint = "run `cargo fmt --all` (and `cargo fmt --manifest-path fuzz/Cargo.toml`) to fix";
    run(cargo().args(["fmt", "--all", "--", "--check"])).map_err(|e| format!("{e}; {hint}"))?;
    if Path::new("fuzz/Cargo.toml").is_file() {
        run(cargo().args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"]))
            .map_err(|e| format!("{e}; {hint}"))?;
    }
    Ok(Outcome::Passed)
}

fn clippy() -> Result<Outcome> {
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(Outcome::Passed)
}

/// `--no-fail-fast`: one run reports every failing test, not only the first binary's.
fn cargo_test() -> Result<Outcome> {
    run(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    Ok(Outcome::Passed)
}

/// Clippy for wasm32 (the browser-only code paths), then the browser package.
fn wasm_build() -> Result<Outcome> {
    let mut cmd = cargo();
    cmd.args(["clippy", "--target", WASM_TARGET]);
    for krate in WASM_CRATES {
        cmd.args(["-p", krate]);
    }
    cmd.args(["--", "-D", "warnings"]);
    run(&mut cmd)?;
    build_wasm_package()?;
    Ok(Outcome::Passed)
}

/// `cargo xtask build-wasm`: hush-client for wasm32 in the `wasm-release` profile,
/// then wasm-bindgen (ES module for browsers without a bundler, TypeScript
/// declarations), the npm package files from client-wasm/pkg-template/, and
/// wasm-opt when the npm `binaryen` package provides it.
fn build_wasm_package() -> Result {
    ensure_wasm_target()?;
    ensure_wasm_bindgen()?;
    run(cargo().args([
        "build",
        "-p",
        "hush-client",
        "--lib",
        "--target",
        WASM_TARGET,
        "--profile",
        WASM_PROFILE,
    ]))?;
    let wasm = target_dir()
        .join(WASM_TARGET)
        .join(WASM_PROFILE)
        .join("hush_client.wasm");
    if !wasm.is_file() {
        return Err(format!("the build did not produce {}", wasm.display()).into());
    }
    let out = Path::new(WASM_PKG_DIR);
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    run(Command::new("wasm-bindgen")
        .args([
            "--target",
            "web",
            "--typescript",
            "--remove-name-section",
            "--out-dir",
        ])
        .arg(out)
        .arg(&wasm))?;
    let template = Path::new("client-wasm/pkg-template");
    for file in PKG_TEMPLATE_FILES {
        let from = template.join(file);
        fs::copy(&from, out.join(file))
            .map_err(|e| format!("cannot copy {}: {e}", from.display()))?;
    }
    let bg = out.join("hush_client_bg.wasm");
    match npm_wasm_opt() {
        Some(wasm_opt) => {
            let before = file_size(&bg)?;
            let optimised = out.join("hush_client_bg.opt.wasm");
            run(Command::new(&wasm_opt)
                .args(WASM_OPT_ARGS)
                .arg(&bg)
                .arg("-o")
                .arg(&optimised))?;
            fs::rename(&optimised, &bg)?;
            println!("wasm-opt: {} -> {} bytes", before, file_size(&bg)?);
        }
        None => println!(
            "wasm-opt skipped: no npm `binaryen` in web-demo/node_modules (Debian's wasm-opt breaks wasm-bindgen output, so it is never used)"
        ),
    }
    let mut listing = Vec::new();
    for entry in fs::read_dir(out)? {
        let path = entry?.path();
        if path.is_file() {
            listing.push(path);
        }
    }
    listing.sort();
    println!("browser package in {}:", out.display());
    for path in listing {
        println!("  {:>9} bytes  {}", file_size(&path)?, path.display());
    }
    write_page()
}

/// The demo page's template; every file it loads is named in it as
/// `{{sha384:PATH}}` (see `sri.rs`).
const PAGE_TEMPLATE: &str = "web-demo/index.html.in";
/// The page generated from it (not committed: the package's hashes change
/// with every client build).
const PAGE: &str = "web-demo/index.html";
/// The SHA-384 of every file the page loads, the page included: what a
/// release publishes and the relay serves at `/integrity.json`.
const PAGE_INTEGRITY: &str = "web-demo/integrity.json";

/// `web-demo/index.html` from its template with the Subresource Integrity
/// hashes of the files it loads (its styles, `app.js`, the package's JS
/// glue and `.wasm`), and `web-demo/integrity.json`. The browser refuses any
/// of those files whose bytes differ from what the page names.
fn write_page() -> Result {
    let template = fs::read_to_string(PAGE_TEMPLATE)
        .map_err(|e| format!("cannot read {PAGE_TEMPLATE}: {e}"))?;
    let demo = Path::new("web-demo");
    let (page, mut files) = sri::fill(&template, |path| {
        let file = demo.join(path);
        fs::read(&file).map_err(|e| {
            format!(
                "{PAGE_TEMPLATE} loads {}, which cannot be read ({e}); run `cargo xtask build-wasm`",
                file.display()
            )
        })
    })?;
    fs::write(PAGE, &page).map_err(|e| format!("cannot write {PAGE}: {e}"))?;
    files.insert("index.html".to_string(), sri::sri(page.as_bytes()));
    fs::write(PAGE_INTEGRITY, sri::manifest(&files))
        .map_err(|e| format!("cannot write {PAGE_INTEGRITY}: {e}"))?;
    println!("demo page {PAGE} and {PAGE_INTEGRITY}:");
    for (path, value) in &files {
        println!("  {value}  /{path}");
    }
    Ok(())
}

/// wasm-opt passes for the package: size first, keeping the features the Rust
/// wasm32 target emits (and wasm-bindgen relies on) enabled.
const WASM_OPT_ARGS: &[&str] = &[
    "-Os",
    "--enable-bulk-memory",
    "--enable-mutable-globals",
    "--enable-nontrapping-float-to-int",
    "--enable-sign-ext",
    "--enable-reference-types",
    "--enable-multivalue",
];

/// wasm-opt from the npm `binaryen` package, if installed for the web demo.
fn npm_wasm_opt() -> Option<PathBuf> {
    let bin = Path::new("web-demo/node_modules/.bin/wasm-opt");
    bin.is_file().then(|| bin.to_path_buf())
}

/// Cargo's target directory (CARGO_TARGET_DIR when set, relative to the root).
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn file_size(path: &Path) -> Result<u64> {
    Ok(fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len())
}

fn fuzz_build() -> Result<Outcome> {
    if !Path::new("fuzz/Cargo.toml").is_file() {
        return Ok(Outcome::Skipped("no fuzz/Cargo.toml".into()));
    }
    if !has_nightly()? {
        return Ok(Outcome::Skipped("no nightly toolchain installed".into()));
    }
    if !cargo_fuzz_available() {
        return Err("cargo-fuzz is missing although setup should have installed it".into());
    }
    run(cargo()
        .args(["+nightly", "fuzz", "build"])
        .current_dir("fuzz"))?;
    Ok(Outcome::Passed)
}

/// Step 7: the web demo's own tests (Chromium). Needs `npm test` in web-demo/.
fn browser_tests() -> Result<Outcome> {
    let dir = Path::new("web-demo");
    if !dir.join("package.json").is_file() {
        return Ok(Outcome::Skipped("no web-demo/package.json yet".into()));
    }
    let has_test_script = succeeds(Command::new("node").current_dir(dir).args([
        "-e",
        "process.exit(require('./package.json').scripts?.test ? 0 : 1)",
    ]));
    if !has_test_script {
        return Ok(Outcome::Skipped(
            "web-demo/package.json has no test script".into(),
        ));
    }
    let mut cmd = Command::new("npm");
    cmd.arg("test").current_dir(dir);
    // Playwright must be given the browser binary (it cannot download its own here).
    if let Some(chromium) = find_on_path("chromium") {
        cmd.env("HUSH_CHROMIUM", chromium);
    }
    run(&mut cmd)?;
    Ok(Outcome::Passed)
}

// ---------------------------------------------------------------------------
// Installing what is missing
// ---------------------------------------------------------------------------

fn ensure_rust_components() -> Result {
    if succeeds(cargo().args(["fmt", "--version"]))
        && succeeds(cargo().args(["clippy", "--version"]))
    {
        println!("ok: rustfmt and clippy are installed");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]))
}

/// rustup's automatic install from rust-toolchain.toml is off on the project's
/// machines, so the wasm32 target is added explicitly.
fn ensure_wasm_target() -> Result {
    let installed = capture(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|line| line.trim() == WASM_TARGET) {
        println!("ok: target {WASM_TARGET} is installed");
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", WASM_TARGET]))
}

fn has_nightly() -> Result<bool> {
    let list = capture(Command::new("rustup").args(["toolchain", "list"]))?;
    Ok(list
        .lines()
        .any(|line| line.trim_start().starts_with("nightly")))
}

fn cargo_fuzz_available() -> bool {
    succeeds(cargo().args(["fuzz", "--version"]))
}

fn ensure_cargo_fuzz() -> Result {
    if cargo_fuzz_available() {
        println!("ok: cargo-fuzz is installed");
        return Ok(());
    }
    run(cargo().args(["install", "cargo-fuzz"]))
}

/// The wasm-bindgen CLI is needed once hush-client has browser bindings. It must
/// match the wasm-bindgen crate in Cargo.lock exactly. (wasm-bindgen is in Cargo.lock
/// earlier than that, through getrandom's `wasm_js`, which needs no CLI.)
fn client_uses_wasm_bindgen() -> Result<bool> {
    let manifest = Path::new("client-wasm/Cargo.toml");
    if !manifest.is_file() {
        return Ok(false);
    }
    Ok(declares_dependency(
        &fs::read_to_string(manifest)?,
        "wasm-bindgen",
    ))
}

fn ensure_wasm_bindgen() -> Result {
    let lock =
        fs::read_to_string("Cargo.lock").map_err(|e| format!("cannot read Cargo.lock: {e}"))?;
    let version = lock_version(&lock, "wasm-bindgen").ok_or("wasm-bindgen is not in Cargo.lock")?;
    let installed = capture(Command::new("wasm-bindgen").arg("--version")).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(version.as_str()) {
        println!("ok: wasm-bindgen {version} is installed");
        return Ok(());
    }
    // Without --locked: the CLI's own lock file names crates the registry mirror lacks.
    run(cargo().args(["install", "wasm-bindgen-cli", "--version", &version]))
}

fn ensure_chromium() -> Result {
    if let Some(path) = find_on_path("chromium") {
        println!("ok: chromium is installed ({})", path.display());
        return Ok(());
    }
    let uid = capture(Command::new("id").arg("-u")).unwrap_or_default();
    if uid.trim() != "0" {
        return Err("chromium is not installed; run `sudo apt-get install -y chromium`".into());
    }
    run(Command::new("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "chromium"])
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn ensure_npm_packages(dir: &Path) -> Result {
    if find_on_path("npm").is_none() {
        return Err("npm is not installed; install node 20 and npm".into());
    }
    let install = if dir.join("package-lock.json").is_file() {
        "ci"
    } else {
        "install"
    };
    run(Command::new("npm")
        .args([install, "--no-audit", "--no-fund"])
        .current_dir(dir))
}

// ---------------------------------------------------------------------------
// cargo xtask demo / bench / fuzz
// ---------------------------------------------------------------------------

fn demo(args: &[String]) -> Result {
    println!("==> demo: building the browser package");
    build_wasm_package()?;
    println!("==> demo: building the relay (release; the first build takes a few minutes)");
    println!("    then open {DEMO_URL} (QUIC/WebTransport on 127.0.0.1:4433, data in ./hush-data)");
    println!("    Ctrl-C stops the relay");
    run(cargo()
        .args([
            "run",
            "--release",
            "-p",
            "hush-relay",
            "--bin",
            "hush-relay",
            "--",
        ])
        .args(DEMO_RELAY_ARGS)
        .args(passthrough(args)))
}

fn bench(args: &[String]) -> Result {
    if let Some(rest) = args.strip_prefix(&["--peers".to_string()]) {
        return peers::bench_peers(passthrough(rest));
    }
    if let Some(rest) = args.strip_prefix(&["--cluster".to_string()]) {
        return cluster::bench_cluster(passthrough(rest));
    }
    if let Some((first, rest)) = args.split_first()
        && let Some(bin) = peers::named_bench(first)
    {
        return peers::run_named(bin, passthrough(rest));
    }
    let packages: Vec<&str> = CRATES
        .iter()
        .filter(|(dir, _)| has_benches(Path::new(dir)))
        .map(|(_, package)| *package)
        .collect();
    if packages.is_empty() {
        println!("xtask: no benchmarks yet (no crate has a benches/ folder or [[bench]] target)");
        return Ok(());
    }
    for package in &packages {
        println!("\n==> bench {package}");
        run(cargo()
            .args(["bench", "-p", package, "--"])
            .args(passthrough(args)))?;
    }
    println!("\nxtask: raw results are in target/criterion/ (HTML reports under */report/).");
    println!("xtask: record the numbers, with the machine and the command, in BENCHMARKS.md.");
    Ok(())
}

fn has_benches(crate_dir: &Path) -> bool {
    crate_dir.join("benches").is_dir()
        || fs::read_to_string(crate_dir.join("Cargo.toml")).is_ok_and(|m| m.contains("[[bench]]"))
}

fn fuzz(args: &[String]) -> Result {
    let targets = fuzz_targets()?;
    let Some(target) = args.first() else {
        return Err(format!(
            "usage: cargo xtask fuzz TARGET [SECS]; targets: {}",
            targets.join(", ")
        )
        .into());
    };
    if !targets.contains(target) {
        return Err(format!("no fuzz target `{target}`; targets: {}", targets.join(", ")).into());
    }
    let secs: u64 = match args.get(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("SECS must be a whole number, got `{s}`"))?,
        None => 60,
    };
    if args.len() > 2 {
        return Err("usage: cargo xtask fuzz TARGET [SECS]".into());
    }
    if !has_nightly()? {
        return Err(
            "fuzzing needs the nightly toolchain: `rustup toolchain install nightly`".into(),
        );
    }
    ensure_cargo_fuzz()?;
    run(cargo()
        .args(["+nightly", "fuzz", "run", target, "--"])
        .arg(format!("-max_total_time={secs}"))
        .current_dir("fuzz"))?;
    println!(
        "xtask: corpus in fuzz/corpus/{target}/, crashes (if any) in fuzz/artifacts/{target}/"
    );
    Ok(())
}

fn fuzz_targets() -> Result<Vec<String>> {
    let dir = Path::new("fuzz/fuzz_targets");
    let mut targets = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            targets.push(stem.to_owned());
        }
    }
    targets.sort();
    Ok(targets)
}

// ---------------------------------------------------------------------------
// Processes and small parsers
// ---------------------------------------------------------------------------

/// `cargo` through the rustup proxy (not $CARGO), so `+nightly` works.
fn cargo() -> Command {
    Command::new("cargo")
}

fn show(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        line.push_str(&format!("  (in {})", dir.display()));
    }
    line
}

/// Variables `cargo run` sets for xtask itself (its own manifest, package
/// name and version, ...). They must not reach a nested build: ring's build
/// script declares `rerun-if-env-changed` for them, so a build started from
/// here with them and one started from a shell (or by the test harness)
/// without them would each rebuild ring and everything above it (rustls,
/// quinn, the relay), two to three minutes on two cores, every time they
/// alternate.
fn is_package_var(key: &str) -> bool {
    const SET_BY_CARGO_RUN: &[&str] = &[
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
    ];
    SET_BY_CARGO_RUN.contains(&key) || key.starts_with("CARGO_PKG_")
}

/// Every child is started through this: see [`is_package_var`].
fn without_package_vars(cmd: &mut Command) -> &mut Command {
    for (key, _) in env::vars_os() {
        if is_package_var(&key.to_string_lossy()) {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Runs a command with inherited output; an error names the command and its status.
fn run(cmd: &mut Command) -> Result {
    let cmd = without_package_vars(cmd);
    let shown = show(cmd);
    println!("$ {shown}");
    let status = cmd
        .status()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed ({status})").into())
    }
}

/// Whether a command runs and exits 0, its output discarded.
fn succeeds(cmd: &mut Command) -> bool {
    without_package_vars(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A command's standard output; an error if it cannot run or exits non-zero.
fn capture(cmd: &mut Command) -> Result<String> {
    let cmd = without_package_vars(cmd);
    let shown = show(cmd);
    let out = cmd
        .output()
        .map_err(|e| format!("could not start `{shown}`: {e}"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("`{shown}` failed ({}): {}", out.status, stderr.trim()).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|path| path.is_file())
}

/// The version of `name` in a Cargo.lock (the first, if several are locked).
fn lock_version(lock: &str, name: &str) -> Option<String> {
    let wanted = format!("name = \"{name}\"");
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == wanted {
            let version = lines.next()?.trim().strip_prefix("version = \"")?;
            return Some(version.trim_end_matches('"').to_owned());
        }
    }
    None
}

/// Whether a Cargo.toml lists `dep` as a dependency key (`dep = …` or `dep.workspace = …`),
/// not counting crates that merely start with that name (`dep-futures`).
fn declares_dependency(manifest: &str, dep: &str) -> bool {
    manifest.lines().any(|line| {
        line.trim_start()
            .strip_prefix(dep)
            .and_then(|rest| rest.chars().next())
            .is_some_and(|next| next == ' ' || next == '=' || next == '.')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_version_finds_the_exact_package() {
        let lock = "[[package]]\nname = \"wasm-bindgen-shared\"\nversion = \"0.2.1\"\n\n\
                    [[package]]\nname = \"wasm-bindgen\"\nversion = \"0.2.130\"\nsource = \"x\"\n";
        assert_eq!(
            lock_version(lock, "wasm-bindgen").as_deref(),
            Some("0.2.130")
        );
        assert_eq!(lock_version(lock, "js-sys"), None);
    }

    #[test]
    fn declares_dependency_ignores_longer_names() {
        assert!(declares_dependency(
            "[dependencies]\nwasm-bindgen = \"0.2\"\n",
            "wasm-bindgen"
        ));
        assert!(declares_dependency(
            "wasm-bindgen.workspace = true",
            "wasm-bindgen"
        ));
        assert!(!declares_dependency(
            "wasm-bindgen-futures = \"0.4\"",
            "wasm-bindgen"
        ));
        assert!(!declares_dependency(
            "getrandom = { features = [\"wasm_js\"] }",
            "wasm-bindgen"
        ));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(format_duration(Duration::from_millis(1234)), "1.2s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }

    #[test]
    fn passthrough_drops_a_leading_double_dash() {
        let args = vec!["--".to_owned(), "--flag".to_owned()];
        assert_eq!(passthrough(&args), ["--flag".to_owned()]);
        assert_eq!(passthrough(&args[1..]), ["--flag".to_owned()]);
    }

    #[test]
    fn crate_table_matches_the_manifests() {
        let root = workspace_root().unwrap();
        for (dir, package) in CRATES {
            let manifest = fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap();
            assert!(
                manifest.contains(&format!("name = \"{package}\"")),
                "{dir}/Cargo.toml is not package {package}"
            );
        }
    }

    #[test]
    fn only_the_package_variables_are_kept_from_children() {
        for key in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_MANIFEST_DIR",
        ] {
            assert!(is_package_var(key), "{key}");
        }
        // Cargo's own configuration must still reach nested builds.
        for key in [
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "CARGO",
        ] {
            assert!(!is_package_var(key), "{key}");
        }
        let mut cmd = Command::new("true");
        without_package_vars(&mut cmd);
        // Run by `cargo test`, this process has some (CARGO_MANIFEST_DIR
        // at least): each is removed, and nothing else is touched.
        let ours = env::vars_os()
            .filter(|(key, _)| is_package_var(&key.to_string_lossy()))
            .count();
        assert!(ours > 0);
        assert_eq!(cmd.get_envs().count(), ours);
        for (key, value) in cmd.get_envs() {
            assert!(value.is_none() && is_package_var(&key.to_string_lossy()));
        }
    }

    #[test]
    fn show_includes_the_folder() {
        let mut cmd = Command::new("cargo");
        cmd.args(["fuzz", "build"]).current_dir("fuzz");
        assert_eq!(show(&cmd), "cargo fuzz build  (in fuzz)");
    }
}
