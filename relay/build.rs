//! Embeds the browser demo (`web-demo/`) into the relay binary, so that
//! `hush-relay --demo` serves the whole page from one file.
//!
//! Walks `../web-demo` (skipping `node_modules`, `tests`, `test-output`,
//! hidden entries, npm metadata and file types a page does not load) and
//! writes `$OUT_DIR/demo_files.rs`: a table of (request path, bytes) built
//! with `include_bytes!` — so rustc itself tracks changes to the embedded
//! files — and whether the wasm package (`web-demo/pkg/`, made by
//! `cargo xtask build-wasm`, not committed) was there together with the
//! page generated from it: `index.html`, made from `index.html.in` with the
//! Subresource Integrity hashes of the files it loads, and
//! `integrity.json` (neither committed; the template is not embedded). The
//! relay builds without them; its page then says how to build the demo.
//!
//! Re-runs (to pick up added or removed files): when any embedded file or
//! any embedded sub-directory (recursively, e.g. `pkg/`) changes; while
//! `pkg/` or the generated page is missing, when anything under `web-demo/`
//! changes, so that building the package is noticed. Watching the top-level directory
//! recursively for good would also watch `node_modules` and the browser
//! tests' output and rebuild the relay after every test run; a new
//! top-level file is picked up when the page (`index.html`, `app.js`,
//! watched) changes to use it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Directories of `web-demo/` that are not part of the page.
const SKIP_DIRS: &[&str] = &["node_modules", "tests", "test-output"];
/// Files that are not part of the page.
const SKIP_FILES: &[&str] = &["package.json", "package-lock.json"];
/// Extensions of files a page loads (the relay knows their content types).
const EXTENSIONS: &[&str] = &[
    "html", "js", "mjs", "css", "wasm", "ts", "json", "map", "svg", "png", "ico", "txt",
];

type BuildResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> BuildResult<()> {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let demo = manifest.join("..").join("web-demo");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("demo_files.rs");

    let mut files = Vec::new();
    let mut dirs = Vec::new();
    if demo.is_dir() {
        walk(&demo, "", &mut files, &mut dirs)?;
    }
    files.sort();
    let pkg_built = files
        .iter()
        .any(|(path, _)| path.starts_with("/pkg/") && path.ends_with(".wasm"))
        && files
            .iter()
            .any(|(path, _)| path.starts_with("/pkg/") && path.ends_with(".js"))
        && files.iter().any(|(path, _)| path == "/index.html");

    for (_, file) in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    for dir in &dirs {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    if demo.is_dir() && !pkg_built {
        println!("cargo:rerun-if-changed={}", demo.display());
    }

    let mut code = String::new();
    writeln!(
        code,
        "/// Whether `web-demo/pkg/` (the wasm package) and the page generated with its hashes were present when the relay was built."
    )?;
    writeln!(code, "pub(crate) const PKG_BUILT: bool = {pkg_built};")?;
    writeln!(
        code,
        "/// The embedded files: (request path, contents), sorted by path."
    )?;
    writeln!(code, "pub(crate) static FILES: &[(&str, &[u8])] = &[")?;
    for (path, file) in &files {
        let abs = file.canonicalize()?;
        let abs = abs.to_str().ok_or("non-UTF-8 path under web-demo/")?;
        writeln!(code, "    ({path:?}, include_bytes!({abs:?})),")?;
    }
    writeln!(code, "];")?;
    std::fs::write(out, code)?;
    Ok(())
}

/// Collect embeddable files under `dir` (request paths start at `prefix`)
/// and the sub-directories walked.
fn walk(
    dir: &Path,
    prefix: &str,
    files: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
) -> BuildResult<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if prefix.is_empty() && SKIP_DIRS.contains(&name) {
                continue;
            }
            dirs.push(path.clone());
            walk(&path, &format!("{prefix}/{name}"), files, dirs)?;
        } else if kind.is_file() && embeddable(name) {
            files.push((format!("{prefix}/{name}"), path));
        }
    }
    Ok(())
}

fn embeddable(name: &str) -> bool {
    if SKIP_FILES.contains(&name) {
        return false;
    }
    name.rsplit_once('.')
        .is_some_and(|(_, ext)| EXTENSIONS.contains(&ext))
}
