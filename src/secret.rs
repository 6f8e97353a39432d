//! Secrets (access and client tokens, a token's PIN) in newtypes that never print their
//! value and are wiped from memory when dropped.

use std::fmt;

use zeroize::Zeroizing;

/// A token that must never reach a log, argv or a child's environment.
/// Debug and Display show `token:<8 hex>`, a SHA-256 prefix that lets an operator tell two
/// tokens apart in logs without revealing either.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a value; the caller's copy should be the only other one.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Zeroizing::new(value.into()))
    }

    /// The raw value, for the one place that must send it (the handshake header).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 4 bytes of the value's SHA-256, as hex.
    pub fn fingerprint(&self) -> String {
        self.hash().to_string()["token:".len()..].to_owned()
    }

    /// The value's whole SHA-256: what tells two tokens apart (the display form's 8 hex
    /// digits collide after some 77,000 tokens).
    pub fn hash(&self) -> TokenHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes());
        let mut h = [0u8; 32];
        h.copy_from_slice(digest.as_ref());
        TokenHash(h)
    }
}

/// A token's SHA-256: compared whole, shown as `token:<8 hex>` like the token itself.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl fmt::Display for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("token:")?;
        self.0[..4].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "token:{}", self.fingerprint())
    }
}

/// From a configuration file: the value goes straight into the redacting type.
impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A token's PIN (`mqtt.pkcs11_pin_file`): shown as `PIN(redacted)`, never even as a
/// hash (a short PIN's hash gives it away), wiped from memory when dropped.
pub struct Pin(Zeroizing<String>);

impl Pin {
    /// Wraps a value read from the PIN file.
    pub fn new(value: impl Into<String>) -> Self {
        Pin(Zeroizing::new(value.into()))
    }

    /// The raw value, for the one place that must send it (the token's login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PIN(redacted)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("AQGAAXiVzSmRsecret");
        for shown in [format!("{s}"), format!("{s:?}"), format!("{:?}", Some(&s))] {
            assert!(!shown.contains("AQGA"), "{shown}");
            assert!(shown.starts_with("token:") || shown.starts_with("Some(token:"));
        }
        assert_eq!(s.fingerprint().len(), 8);
        assert_ne!(s.fingerprint(), Secret::new("other").fingerprint());
        assert_eq!(s.hash().to_string(), s.to_string());
    }

    #[test]
    fn a_pin_shows_neither_its_value_nor_a_hash_of_it() {
        let p = Pin::new("1234");
        assert_eq!(format!("{p:?}"), "PIN(redacted)");
        assert_eq!(format!("{:?}", Some(&p)), "Some(PIN(redacted))");
        assert_eq!(p.expose(), "1234");
    }

    #[test]
    fn tokens_whose_display_forms_collide_have_different_hashes() {
        // Found by search: the same first 4 bytes of SHA-256.
        let (a, b) = (
            Secret::new("AQGA-collide-40119"),
            Secret::new("AQGA-collide-45948"),
        );
        assert_eq!(a.to_string(), b.to_string());
        assert_ne!(a.hash(), b.hash());
    }
}
