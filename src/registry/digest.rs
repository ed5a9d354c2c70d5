//! Content digests: `sha256:<64 hex>` and `sha512:<128 hex>`.
//!
//! A digest names content by its hash, and regcache stores content by digest,
//! so a digest string decides which file is read or written. Parsing is
//! therefore strict: a known algorithm, then exactly the right number of
//! lower-case hex digits, nothing else. Upper-case hex, other lengths and
//! other algorithms are refused; the OCI specification allows registries to
//! accept more, but regcache could not verify them.
//!
//! [`DigestHasher`] computes a digest incrementally, as bytes stream past.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256, Sha512};
use thiserror::Error;

use super::error::quoted;

/// A hash algorithm regcache can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the algorithm nearly every registry uses.
    Sha256,
    /// SHA-512.
    Sha512,
}

impl Algorithm {
    /// The algorithm's name as written in a digest, e.g. `"sha256"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    /// How many hex digits an encoded hash of this algorithm has.
    pub fn hex_len(&self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha256" => Some(Algorithm::Sha256),
            "sha512" => Some(Algorithm::Sha512),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a digest regcache accepts; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct DigestError(String);

/// A validated content digest such as `sha256:e3b0c442…`.
///
/// Two digests are equal exactly when their text is equal: the hex is always
/// lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    /// The whole digest, `algorithm:hex`.
    text: String,
}

impl Digest {
    /// The hash algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The lower-case hex of the hash, without the algorithm prefix.
    pub fn hex(&self) -> &str {
        // The text always starts with "<algorithm>:", so this cannot fail.
        self.text
            .get(self.algorithm.as_str().len() + 1..)
            .unwrap_or_default()
    }

    /// The whole digest, `algorithm:hex`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The SHA-256 digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        let mut hasher = DigestHasher::new(Algorithm::Sha256);
        hasher.update(bytes);
        hasher.finish()
    }

    /// A fresh hasher for this digest's algorithm, to check content against it.
    pub fn hasher(&self) -> DigestHasher {
        DigestHasher::new(self.algorithm)
    }

    /// Whether `bytes` hash to this digest.
    pub fn matches(&self, bytes: &[u8]) -> bool {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        hasher.finish() == *self
    }

    fn from_hash(algorithm: Algorithm, hash: &[u8]) -> Digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(algorithm.as_str().len() + 1 + hash.len() * 2);
        text.push_str(algorithm.as_str());
        text.push(':');
        for b in hash {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        Digest { algorithm, text }
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, DigestError> {
        let Some((name, hex)) = s.split_once(':') else {
            return Err(DigestError(format!(
                "digest {} has no \"algorithm:\" prefix (expected sha256:<64 hex digits>)",
                quoted(s)
            )));
        };
        let Some(algorithm) = Algorithm::from_name(name) else {
            return Err(DigestError(format!(
                "digest {}: unsupported algorithm {} (regcache verifies sha256 and sha512)",
                quoted(s),
                quoted(name)
            )));
        };
        if hex.len() != algorithm.hex_len() {
            return Err(DigestError(format!(
                "digest {}: a {algorithm} digest has {} hex digits, not {}",
                quoted(s),
                algorithm.hex_len(),
                hex.len()
            )));
        }
        if !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(DigestError(format!(
                "digest {}: the hash must be lower-case hex (0-9, a-f)",
                quoted(s)
            )));
        }
        Ok(Digest {
            algorithm,
            text: s.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Computes a [`Digest`] over bytes fed to it piece by piece.
#[derive(Debug, Clone)]
pub enum DigestHasher {
    /// Hashing with SHA-256.
    Sha256(Sha256),
    /// Hashing with SHA-512.
    Sha512(Sha512),
}

impl DigestHasher {
    /// A hasher for `alg` that has seen no bytes yet.
    pub fn new(alg: Algorithm) -> Self {
        match alg {
            Algorithm::Sha256 => DigestHasher::Sha256(Sha256::new()),
            Algorithm::Sha512 => DigestHasher::Sha512(Sha512::new()),
        }
    }

    /// The algorithm this hasher computes.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            DigestHasher::Sha256(_) => Algorithm::Sha256,
            DigestHasher::Sha512(_) => Algorithm::Sha512,
        }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            DigestHasher::Sha256(h) => h.update(data),
            DigestHasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Digest {
        match self {
            DigestHasher::Sha256(h) => Digest::from_hash(Algorithm::Sha256, &h.finalize()),
            DigestHasher::Sha512(h) => Digest::from_hash(Algorithm::Sha512, &h.finalize()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str =
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const EMPTY_SHA512: &str = "sha512:cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e";

    #[test]
    fn hashes_the_empty_string() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY_SHA256);
        let d = DigestHasher::new(Algorithm::Sha512).finish();
        assert_eq!(d.to_string(), EMPTY_SHA512);
        assert_eq!(d.algorithm(), Algorithm::Sha512);
    }

    #[test]
    fn hashes_in_pieces_like_at_once() {
        let whole = Digest::of(b"hello, registry");
        let mut h = whole.hasher();
        h.update(b"hello, ");
        h.update(b"");
        h.update(b"registry");
        assert_eq!(h.algorithm(), Algorithm::Sha256);
        assert_eq!(h.finish(), whole);
        assert!(whole.matches(b"hello, registry"));
        assert!(!whole.matches(b"hello, registry!"));
    }

    #[test]
    fn parses_good_digests() {
        let d: Digest = EMPTY_SHA256.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha256);
        assert_eq!(d.hex().len(), 64);
        assert!(EMPTY_SHA256.ends_with(d.hex()));
        assert_eq!(d.to_string(), EMPTY_SHA256);
        assert_eq!(d.as_str(), EMPTY_SHA256);
        assert_eq!(d, Digest::of(b""));
        let d: Digest = EMPTY_SHA512.parse().unwrap();
        assert_eq!(d.algorithm(), Algorithm::Sha512);
        assert_eq!(d.hex().len(), 128);
    }

    #[test]
    fn refuses_bad_digests() {
        let hex64 = &EMPTY_SHA256[7..];
        let bad = [
            String::new(),
            ":".to_string(),
            "sha256:".to_string(),
            hex64.to_string(),
            format!("sha256:{}", hex64.to_uppercase()),
            format!("SHA256:{hex64}"),
            format!("sha256:{}", &hex64[1..]),
            format!("sha256:{hex64}0"),
            format!("sha256:{}g", &hex64[1..]),
            format!("sha384:{hex64}"),
            format!("md5:{hex64}"),
            format!("sha256:{hex64}\n"),
            format!(" sha256:{hex64}"),
            format!("sha512:{hex64}"),
            format!("sha256:{}é", &hex64[2..]),
            format!("sha256+b64:{hex64}"),
        ];
        for s in &bad {
            let err = s.parse::<Digest>().unwrap_err();
            assert!(!err.to_string().is_empty(), "{s:?}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let e = "sha256:abc".parse::<Digest>().unwrap_err().to_string();
        assert!(e.contains("64 hex digits"), "{e}");
        let e = "blake3:abc".parse::<Digest>().unwrap_err().to_string();
        assert!(e.contains("unsupported algorithm"), "{e}");
        let e = "latest".parse::<Digest>().unwrap_err().to_string();
        assert!(e.contains("prefix"), "{e}");
    }

    #[test]
    fn round_trips_through_serde_as_a_string() {
        let d = Digest::of(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        let back: Digest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"sha256:XYZ\"").is_err());
    }
}
