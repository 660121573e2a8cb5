//! Known-answer tests: RFC vectors run through the exact wrappers the protocol
//! uses (X25519 `dh`, HKDF, ChaCha20-Poly1305) and through ed25519-dalek with the
//! same calls `identity` makes, proving the primitives are wired correctly.

use crate::aead::{decrypt, encrypt};
use crate::identity::{dh, x25519_public};
use crate::kdf::hkdf;
use crate::secret::Secret32;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

fn h<const N: usize>(s: &str) -> [u8; N] {
    hex::decode(s).unwrap().try_into().unwrap()
}

fn hv(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

#[test]
fn rfc7748_section_5_2_x25519() {
    let cases = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ];
    for (k, u, out) in cases {
        assert_eq!(dh(&Secret32(h(k)), &h(u)).unwrap().0, h::<32>(out));
    }
}

#[test]
fn rfc7748_section_5_2_iterated_1_and_1000() {
    let mut k = h::<32>("0900000000000000000000000000000000000000000000000000000000000000");
    let mut u = k;
    for i in 1..=1000 {
        let r = x25519_dalek::x25519(k, u);
        u = k;
        k = r;
        if i == 1 {
            assert_eq!(
                k,
                h::<32>("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079")
            );
        }
    }
    assert_eq!(
        k,
        h::<32>("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51")
    );
}

#[test]
fn rfc7748_section_6_1_diffie_hellman() {
    let a = Secret32(h(
        "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
    ));
    let b = Secret32(h(
        "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
    ));
    let a_pub = x25519_public(&a);
    let b_pub = x25519_public(&b);
    assert_eq!(
        a_pub,
        h::<32>("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    );
    assert_eq!(
        b_pub,
        h::<32>("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    );
    let shared = h::<32>("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
    assert_eq!(dh(&a, &b_pub).unwrap().0, shared);
    assert_eq!(dh(&b, &a_pub).unwrap().0, shared);
}

#[test]
fn x25519_low_order_point_is_rejected() {
    let a = Secret32([7u8; 32]);
    assert_eq!(dh(&a, &[0u8; 32]).unwrap_err(), crate::CryptoError::BadKey);
    let mut one = [0u8; 32];
    one[0] = 1;
    assert_eq!(dh(&a, &one).unwrap_err(), crate::CryptoError::BadKey);
}

/// (IKM, salt, info, expected OKM hex)
type HkdfCase = (Vec<u8>, Vec<u8>, Vec<u8>, &'static str);

#[test]
fn rfc5869_hkdf_sha256_cases_1_to_3() {
    let salt2: Vec<u8> = (0x60..=0xafu8).collect();
    let ikm2: Vec<u8> = (0x00..=0x4fu8).collect();
    let info2: Vec<u8> = (0xb0..=0xffu8).collect();
    let cases: [HkdfCase; 3] = [
        (
            vec![0x0b; 22],
            hv("000102030405060708090a0b0c"),
            hv("f0f1f2f3f4f5f6f7f8f9"),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            ikm2,
            salt2,
            info2,
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            vec![0x0b; 22],
            vec![],
            vec![],
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (ikm, salt, info, okm) in cases {
        let expected = hv(okm);
        let mut out = vec![0u8; expected.len()];
        hkdf(&salt, &ikm, &[&info], &mut out).unwrap();
        assert_eq!(out, expected);
        // Multi-part info must equal the concatenation.
        let (i1, i2) = info.split_at(info.len() / 2);
        let mut out2 = vec![0u8; expected.len()];
        hkdf(&salt, &ikm, &[i1, i2], &mut out2).unwrap();
        assert_eq!(out2, expected);
    }
}

#[test]
fn rfc8439_section_2_8_2_chacha20_poly1305() {
    let pt = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
    let aad = hv("50515253c0c1c2c3c4c5c6c7");
    let key = h::<32>("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f");
    let nonce = h::<12>("070000004041424344454647");
    let expected = hv(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6\
         3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36\
         92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc\
         3ff4def08e4b7a9de576d26586cec64b6116\
         1ae10b594f09e26a7e902ecbd0600691",
    );
    let ct = encrypt(&key, &nonce, pt, &aad).unwrap();
    assert_eq!(ct, expected);
    assert_eq!(decrypt(&key, &nonce, &ct, &aad).unwrap(), pt.to_vec());
    let mut bad = ct.clone();
    bad[0] ^= 1;
    assert_eq!(
        decrypt(&key, &nonce, &bad, &aad),
        Err(crate::CryptoError::DecryptFailed)
    );
}

#[test]
fn rfc8032_ed25519_tests_1_to_3() {
    let cases = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155\
             5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da\
             085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
        (
            "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
            "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
            "af82",
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac\
             18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
        ),
    ];
    for (sk, pk, msg, sig) in cases {
        let key = SigningKey::from_bytes(&h(sk));
        assert_eq!(key.verifying_key().to_bytes(), h::<32>(pk));
        let msg = hv(msg);
        let s = key.sign(&msg);
        assert_eq!(s.to_bytes(), h::<64>(sig));
        let vk = VerifyingKey::from_bytes(&h(pk)).unwrap();
        vk.verify_strict(&msg, &Signature::from_bytes(&h(sig)))
            .unwrap();
    }
}
