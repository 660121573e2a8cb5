//! The browser demo, embedded in the relay binary and served by `--demo`.
//!
//! The build script walks `web-demo/` (the page, its script and styles, and
//! the wasm package `web-demo/pkg/` that `cargo xtask build-wasm` makes) and
//! embeds every file, so one binary serves everything. The package is not
//! committed, and neither is the page: `cargo xtask build-wasm` generates
//! `index.html` (from `index.html.in`) with the Subresource Integrity hashes
//! of every file it loads, and `integrity.json` listing them and the page's
//! own hash. A relay built before they existed still builds, and its `/`
//! answers `503` with how to build the demo instead of a page that cannot
//! load.
//!
//! The relay operator decides what this serves: the hashes let a user check
//! the page against a published release, they do not make the operator
//! trustworthy (docs/SECURITY.md, "The demo page").

use crate::http::{StaticFile, StaticFiles};
use std::borrow::Cow;
use std::sync::Arc;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));
}

/// What `/` says when the relay was built without the wasm package.
pub const NOT_BUILT_PAGE: &str = "<!doctype html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">\
<title>Hush demo not built</title></head>\n<body>\n<h1>The Hush demo was not built into this relay</h1>\n\
<p>The browser package <code>web-demo/pkg/</code> did not exist when this relay was compiled.</p>\n\
<p>Run <code>cargo xtask build-wasm</code>, then rebuild and restart the relay \
(or run <code>cargo xtask demo</code>, which does all of it).</p>\n</body>\n</html>\n";

/// A set of demo files served by path.
#[derive(Debug, Clone, Copy)]
pub struct DemoFiles {
    files: &'static [(&'static str, &'static [u8])],
    pkg_built: bool,
}

impl DemoFiles {
    /// The demo embedded at build time.
    pub fn embedded() -> DemoFiles {
        DemoFiles {
            files: embedded::FILES,
            pkg_built: embedded::PKG_BUILT,
        }
    }

    /// A demo made of `files` (request path such as `/app.js`, contents);
    /// `pkg_built` says whether the wasm package is among them.
    pub fn from_table(
        files: &'static [(&'static str, &'static [u8])],
        pkg_built: bool,
    ) -> DemoFiles {
        DemoFiles { files, pkg_built }
    }

    /// Whether the wasm package was built in (otherwise `/` explains how).
    pub fn is_built(&self) -> bool {
        self.pkg_built
    }

    /// Request paths of every file, e.g. `/index.html`, `/pkg/hush_client_bg.wasm`.
    pub fn paths(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.files.iter().map(|(path, _)| *path)
    }

    fn lookup(&self, path: &str) -> Option<&'static [u8]> {
        self.files
            .binary_search_by(|(p, _)| (*p).cmp(path))
            .ok()
            .and_then(|i| self.files.get(i))
            .map(|(_, bytes)| *bytes)
    }
}

impl StaticFiles for DemoFiles {
    fn get(&self, path: &str) -> Option<StaticFile> {
        let path = if path == "/" { "/index.html" } else { path };
        if path == "/index.html" && !self.pkg_built {
            return Some(StaticFile {
                status: "503 Service Unavailable",
                content_type: Cow::Borrowed(content_type(path)),
                body: Cow::Borrowed(NOT_BUILT_PAGE.as_bytes()),
            });
        }
        self.lookup(path).map(|bytes| StaticFile {
            status: "200 OK",
            content_type: Cow::Borrowed(content_type(path)),
            body: Cow::Borrowed(bytes),
        })
    }
}

/// The embedded demo as the HTTP listener takes it.
pub fn embedded() -> Arc<dyn StaticFiles> {
    Arc::new(DemoFiles::embedded())
}

/// The `Content-Type` of a demo file, by extension. `application/wasm` is
/// what lets browsers compile a module while it streams in.
pub fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    match ext.to_ascii_lowercase().as_str() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "wasm" => "application/wasm",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        // Type declarations (`.d.ts`) and text: readable, never executed.
        _ => "text/plain; charset=utf-8",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TABLE: &[(&str, &[u8])] = &[
        ("/app.js", b"js"),
        ("/index.html", b"<html>"),
        ("/pkg/hush_client.d.ts", b"ts"),
        ("/pkg/hush_client.js", b"glue"),
        ("/pkg/hush_client_bg.wasm", b"\0asm"),
        ("/style.css", b"css"),
    ];

    #[test]
    fn serves_files_by_path_with_their_types() {
        let demo = DemoFiles::from_table(TABLE, true);
        let index = demo.get("/").unwrap();
        assert_eq!(index.status, "200 OK");
        assert_eq!(&*index.body, b"<html>");
        assert_eq!(index.content_type, "text/html; charset=utf-8");
        let wasm = demo.get("/pkg/hush_client_bg.wasm").unwrap();
        assert_eq!(wasm.content_type, "application/wasm");
        assert_eq!(&*wasm.body, b"\0asm");
        assert_eq!(
            demo.get("/pkg/hush_client.js").unwrap().content_type,
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            demo.get("/style.css").unwrap().content_type,
            "text/css; charset=utf-8"
        );
        assert_eq!(
            demo.get("/pkg/hush_client.d.ts").unwrap().content_type,
            "text/plain; charset=utf-8"
        );
        for missing in ["/pkg/", "/nope.js", "/../Cargo.toml", "index.html", ""] {
            assert!(demo.get(missing).is_none(), "{missing}");
        }
    }

    #[test]
    fn an_unbuilt_demo_says_how_to_build_it() {
        let demo = DemoFiles::from_table(TABLE, false);
        for path in ["/", "/index.html"] {
            let page = demo.get(path).unwrap();
            assert_eq!(page.status, "503 Service Unavailable");
            let text = String::from_utf8(page.body.to_vec()).unwrap();
            assert!(text.contains("cargo xtask build-wasm"), "{text}");
        }
        // The other files are still there.
        assert!(demo.get("/app.js").is_some());
    }

    #[test]
    fn content_types() {
        assert_eq!(content_type("/a.mjs"), "text/javascript; charset=utf-8");
        assert_eq!(content_type("/a.WASM"), "application/wasm");
        assert_eq!(content_type("/a.json"), "application/json");
        assert_eq!(content_type("/noext"), "text/plain; charset=utf-8");
    }

    /// `sha384-<base64>`, as Subresource Integrity writes a digest.
    fn sri(bytes: &[u8]) -> String {
        use sha2::Digest;
        const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let digest = sha2::Sha384::digest(bytes);
        let mut out = String::from("sha384-");
        // 48 bytes: whole 3-byte groups, no padding.
        for c in digest.chunks(3) {
            let n = u32::from(c[0]) << 16 | u32::from(c[1]) << 8 | u32::from(c[2]);
            for i in 0..4 {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            }
        }
        out
    }

    /// Every `(path, integrity)` a page pins: `integrity="…"` next to a
    /// `src`/`href` in one tag, and `"./path": "sha384-…"` in its import map.
    fn pins(html: &str) -> Vec<(String, String)> {
        let attr = |tag: &str, name: &str| {
            let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
            let len = tag[start..].find('"')?;
            Some(tag[start..start + len].to_string())
        };
        let mut out = Vec::new();
        for tag in html.split('<').skip(1) {
            let tag = tag.split('>').next().unwrap();
            if let (Some(url), Some(integrity)) = (
                attr(tag, "src").or_else(|| attr(tag, "href")),
                attr(tag, "integrity"),
            ) {
                out.push((format!("/{url}"), integrity));
            }
        }
        for line in html.lines() {
            let line = line.trim().trim_end_matches(',');
            if let Some((url, value)) = line.split_once(": ")
                && let Some(url) = url.strip_prefix("\"./").and_then(|u| u.strip_suffix('"'))
                && let Some(value) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"'))
                && value.starts_with("sha384-")
            {
                out.push((format!("/{url}"), value.to_string()));
            }
        }
        out
    }

    /// The embedded page pins every file it loads with the hash of the
    /// embedded bytes, so the relay never serves a page the browser refuses,
    /// and `integrity.json` carries the page's own hash.
    #[test]
    fn embedded_page_pins_match_embedded_files() {
        let sample = format!(
            "<script type=\"module\" src=\"app.js\" integrity=\"{}\"></script>\n\"./pkg/b.js\": \"{}\"",
            sri(b"js"),
            sri(b"glue")
        );
        let found = pins(&sample);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0], ("/app.js".to_string(), sri(b"js")));
        assert_eq!(found[1], ("/pkg/b.js".to_string(), sri(b"glue")));

        let demo = DemoFiles::embedded();
        let Some(page) = demo.lookup("/index.html") else {
            assert!(!demo.is_built(), "a built demo has its page");
            return;
        };
        let page = std::str::from_utf8(page).unwrap();
        let pinned = pins(page);
        for path in [
            "/app.js",
            "/style.css",
            "/pkg/hush_client.js",
            "/pkg/hush_client_bg.wasm",
        ] {
            assert!(
                pinned.iter().any(|(p, _)| p == path),
                "the page pins {path}: {pinned:?}"
            );
        }
        for (path, integrity) in &pinned {
            let bytes = demo
                .lookup(path)
                .unwrap_or_else(|| panic!("{path} is embedded"));
            assert_eq!(&sri(bytes), integrity, "{path}: run `cargo xtask page`");
        }
        let published = std::str::from_utf8(demo.lookup("/integrity.json").unwrap()).unwrap();
        assert!(
            published.contains(&format!("\"/index.html\": \"{}\"", sri(page.as_bytes()))),
            "integrity.json has the page's hash: {published}"
        );
    }

    /// The embedded table is exactly what is on disk, and "built" means the
    /// wasm package is there.
    #[test]
    fn embedded_demo_matches_web_demo_on_disk() {
        let demo = DemoFiles::embedded();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web-demo");
        let mut count = 0;
        for path in demo.paths() {
            let disk = std::fs::read(root.join(path.trim_start_matches('/'))).unwrap();
            assert_eq!(demo.lookup(path), Some(disk.as_slice()), "{path}");
            assert!(
                !path.starts_with("/node_modules/")
                    && !path.starts_with("/tests/")
                    && !path.starts_with("/test-output/"),
                "{path} must not be embedded"
            );
            count += 1;
        }
        let sorted: Vec<_> = demo.paths().collect();
        assert!(sorted.windows(2).all(|w| w[0] < w[1]), "table is sorted");
        let pkg_on_disk = std::fs::read_dir(root.join("pkg"))
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".wasm")))
            })
            .unwrap_or(false);
        // Built: the package and the page generated with its hashes.
        assert_eq!(
            demo.is_built(),
            pkg_on_disk && root.join("index.html").exists()
        );
        if root.join("index.html").exists() {
            assert!(demo.lookup("/index.html").is_some());
            assert!(count >= 3, "page, script and styles at least");
        }
    }
}
