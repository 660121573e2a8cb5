//! Subresource Integrity for the demo page: SHA-384 digests in the
//! `sha384-<base64>` form browsers check, and the page generated from its
//! template with them.
//!
//! `web-demo/index.html.in` names the files it loads with placeholders
//! `{{sha384:PATH}}` (PATH relative to `web-demo/`); [`fill`] replaces each
//! with the digest of that file's bytes. `cargo xtask build-wasm` (and
//! `cargo xtask page`) write the result to `web-demo/index.html` and the
//! digests of every file the page loads, the page included, to
//! `web-demo/integrity.json`, the list a release publishes.
//!
//! SHA-384 is implemented here (FIPS 180-4) so that xtask keeps building
//! without dependencies; its tests check it against published vectors.

use std::collections::BTreeMap;

/// Start and end of a placeholder.
const OPEN: &str = "{{sha384:";
const CLOSE: &str = "}}";

/// The template with every `{{sha384:PATH}}` replaced by the SRI value of
/// `read(PATH)`, and the digests used (by path).
///
/// # Errors
/// A placeholder that is not closed, names an empty or unsafe path, or whose
/// file `read` cannot provide.
pub fn fill(
    template: &str,
    mut read: impl FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<(String, BTreeMap<String, String>), String> {
    let mut out = String::with_capacity(template.len());
    let mut used = BTreeMap::new();
    let mut rest = template;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        let after = &rest[at + OPEN.len()..];
        let end = after
            .find(CLOSE)
            .ok_or_else(|| format!("unclosed `{OPEN}` placeholder"))?;
        let path = after[..end].trim();
        if path.is_empty()
            || path.starts_with('/')
            || path.split('/').any(|part| part == "..")
            || path.contains(char::is_whitespace)
        {
            return Err(format!("bad path `{path}` in a `{OPEN}` placeholder"));
        }
        let value = sri(&read(path)?);
        out.push_str(&value);
        used.insert(path.to_string(), value);
        rest = &after[end + CLOSE.len()..];
    }
    out.push_str(rest);
    Ok((out, used))
}

/// `integrity.json`: the algorithm and `"/path": "sha384-…"` for each file,
/// sorted by path.
pub fn manifest(files: &BTreeMap<String, String>) -> String {
    let mut out = String::from("{\n  \"algorithm\": \"sha384\",\n  \"files\": {\n");
    let mut first = true;
    for (path, value) in files {
        if !first {
            out.push_str(",\n");
        }
        first = false;
        out.push_str(&format!("    \"/{}\": \"{}\"", json_escape(path), value));
    }
    out.push_str("\n  }\n}\n");
    out
}

fn json_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '"' | '\\' => vec!['\\', c],
            c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32).chars().collect(),
            c => vec![c],
        })
        .collect()
}

/// The `integrity` attribute value of `bytes`: `sha384-<base64>`.
pub fn sri(bytes: &[u8]) -> String {
    format!("sha384-{}", base64(&sha384(bytes)))
}

/// Standard base64 with padding (RFC 4648 §4), as SRI uses.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

const K: [u64; 80] = [
    0x428a2f98d728ae22,
    0x7137449123ef65cd,
    0xb5c0fbcfec4d3b2f,
    0xe9b5dba58189dbbc,
    0x3956c25bf348b538,
    0x59f111f1b605d019,
    0x923f82a4af194f9b,
    0xab1c5ed5da6d8118,
    0xd807aa98a3030242,
    0x12835b0145706fbe,
    0x243185be4ee4b28c,
    0x550c7dc3d5ffb4e2,
    0x72be5d74f27b896f,
    0x80deb1fe3b1696b1,
    0x9bdc06a725c71235,
    0xc19bf174cf692694,
    0xe49b69c19ef14ad2,
    0xefbe4786384f25e3,
    0x0fc19dc68b8cd5b5,
    0x240ca1cc77ac9c65,
    0x2de92c6f592b0275,
    0x4a7484aa6ea6e483,
    0x5cb0a9dcbd41fbd4,
    0x76f988da831153b5,
    0x983e5152ee66dfab,
    0xa831c66d2db43210,
    0xb00327c898fb213f,
    0xbf597fc7beef0ee4,
    0xc6e00bf33da88fc2,
    0xd5a79147930aa725,
    0x06ca6351e003826f,
    0x142929670a0e6e70,
    0x27b70a8546d22ffc,
    0x2e1b21385c26c926,
    0x4d2c6dfc5ac42aed,
    0x53380d139d95b3df,
    0x650a73548baf63de,
    0x766a0abb3c77b2a8,
    0x81c2c92e47edaee6,
    0x92722c851482353b,
    0xa2bfe8a14cf10364,
    0xa81a664bbc423001,
    0xc24b8b70d0f89791,
    0xc76c51a30654be30,
    0xd192e819d6ef5218,
    0xd69906245565a910,
    0xf40e35855771202a,
    0x106aa07032bbd1b8,
    0x19a4c116b8d2d0c8,
    0x1e376c085141ab53,
    0x2748774cdf8eeb99,
    0x34b0bcb5e19b48a8,
    0x391c0cb3c5c95a63,
    0x4ed8aa4ae3418acb,
    0x5b9cca4f7763e373,
    0x682e6ff3d6b2b8a3,
    0x748f82ee5defb2fc,
    0x78a5636f43172f60,
    0x84c87814a1f0ab72,
    0x8cc702081a6439ec,
    0x90befffa23631e28,
    0xa4506cebde82bde9,
    0xbef9a3f7b2c67915,
    0xc67178f2e372532b,
    0xca273eceea26619c,
    0xd186b8c721c0c207,
    0xeada7dd6cde0eb1e,
    0xf57d4f7fee6ed178,
    0x06f067aa72176fba,
    0x0a637dc5a2c898a6,
    0x113f9804bef90dae,
    0x1b710b35131c471b,
    0x28db77f523047d84,
    0x32caab7b40c72493,
    0x3c9ebe0a15c9bebc,
    0x431d67c49c100d4c,
    0x4cc5d4becb3e42b6,
    0x597f299cfc657e2a,
    0x5fcb6fab3ad6faec,
    0x6c44198c4a475817,
];

/// SHA-384 (FIPS 180-4 §6.5: SHA-512 with its own initial value, truncated).
pub fn sha384(data: &[u8]) -> [u8; 48] {
    let mut h: [u64; 8] = [
        0xcbbb9d5dc1059ed8,
        0x629a292a367cd507,
        0x9159015a3070dd17,
        0x152fecd8f70e5939,
        0x67332667ffc00b31,
        0x8eb44a8768581511,
        0xdb0c2e0d64f98fa7,
        0x47b5481dbefa4fa4,
    ];
    let mut msg = data.to_vec();
    let bits = (data.len() as u128).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 128 != 112 {
        msg.push(0);
    }
    msg.extend_from_slice(&bits.to_be_bytes());
    for block in msg.chunks_exact(128) {
        let mut w = [0u64; 80];
        for (i, word) in block.chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(word);
            w[i] = u64::from_be_bytes(b);
        }
        for i in 16..80 {
            let s0 = w[i - 15].rotate_right(1) ^ w[i - 15].rotate_right(8) ^ (w[i - 15] >> 7);
            let s1 = w[i - 2].rotate_right(19) ^ w[i - 2].rotate_right(61) ^ (w[i - 2] >> 6);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..80 {
            let s1 = e.rotate_right(14) ^ e.rotate_right(18) ^ e.rotate_right(41);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(28) ^ a.rotate_right(34) ^ a.rotate_right(39);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 48];
    for (chunk, word) in out.chunks_exact_mut(8).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FIPS 180-4 examples and a multi-block message, as `openssl dgst
    /// -sha384 -binary | base64` prints them.
    #[test]
    fn sha384_known_answers() {
        assert_eq!(
            sri(b""),
            "sha384-OLBgp1GsljhM2TJ+sbHjaiH9txEUvgdDTAzHv2P24donTt6/529l+9Ua0vFImLlb"
        );
        assert_eq!(
            sri(b"abc"),
            "sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP/W+2AhgcroefMI1i67KE0yCWn"
        );
        assert_eq!(
            sri(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "sha384-M5H93fyNxzk3B6ZbG0cJOXz4sdFirwWr/o9FDeXza8awRVqFILxOb1/pWx/jyEUr"
        );
        assert_eq!(
            sri(&[b'a'; 1000]),
            "sha384-9USAaJxrCxHQMDKF2agbIak7ymulobRHJ2XcpNpF7jKAgtRpxlDNO2GxbTJmq4zt"
        );
    }

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    #[test]
    fn fill_replaces_every_placeholder_with_its_file_digest() {
        let template = "<link href=\"a.css\" integrity=\"{{sha384:a.css}}\">\n\
                        <script src=\"pkg/b.js\" integrity=\"{{sha384:pkg/b.js}}\"></script>";
        let (page, used) = fill(template, |path| match path {
            "a.css" => Ok(b"abc".to_vec()),
            "pkg/b.js" => Ok(Vec::new()),
            other => Err(format!("no {other}")),
        })
        .unwrap();
        assert_eq!(
            page,
            "<link href=\"a.css\" integrity=\"sha384-ywB1P0WjXou1oD1pmsZQBycsMqsO3tFjGotgWkP/W+2AhgcroefMI1i67KE0yCWn\">\n\
             <script src=\"pkg/b.js\" integrity=\"sha384-OLBgp1GsljhM2TJ+sbHjaiH9txEUvgdDTAzHv2P24donTt6/529l+9Ua0vFImLlb\"></script>"
        );
        assert_eq!(used.len(), 2);
        assert_eq!(used["a.css"], sri(b"abc"));
        let json = manifest(&used);
        assert!(
            json.contains(&format!("\"/a.css\": \"{}\"", sri(b"abc"))),
            "{json}"
        );
        assert!(json.contains("\"algorithm\": \"sha384\""), "{json}");
    }

    #[test]
    fn fill_rejects_bad_placeholders() {
        let read = |_: &str| Ok(Vec::new());
        for bad in [
            "x {{sha384:a.js",
            "{{sha384:}}",
            "{{sha384:../secret}}",
            "{{sha384:/etc/passwd}}",
        ] {
            assert!(fill(bad, read).is_err(), "{bad}");
        }
        let missing = fill("{{sha384:gone.js}}", |p| Err(format!("cannot read {p}")));
        assert_eq!(missing.unwrap_err(), "cannot read gone.js");
        assert_eq!(fill("no placeholders", read).unwrap().0, "no placeholders");
    }
}
