//! Device keys that never leave their token (a TPM, a secure element, an HSM), used through
//! PKCS#11: `mqtt.key = "pkcs11:..."` (RFC 7512, `uri`). With the `pkcs11` feature (the glibc
//! .debs), `token` opens the token with `cryptoki` and `signer` gives rustls a signing key
//! and a certificate resolver; builds without it (the static musl binaries, which cannot
//! load a module) refuse such a key (`unsupported_build`). The PIN comes from a file, lives
//! in a `secret::Pin`, and is read again for every login.

use std::fmt;
use std::path::{Path, PathBuf};

#[cfg(feature = "pkcs11")]
pub mod der;
#[cfg(feature = "pkcs11")]
mod signer;
#[cfg(feature = "pkcs11")]
mod token;
pub mod uri;

#[cfg(feature = "pkcs11")]
pub use signer::{Identity, identity};
#[cfg(feature = "pkcs11")]
pub use token::module;
pub use uri::{Pkcs11Uri, is_pkcs11_uri};

use crate::secret::Pin;

/// A key in a token: the URI as written and parsed, the module, the PIN's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRef {
    /// `mqtt.key` as written (no PIN: `pin-value` is refused).
    pub text: String,
    /// What it names.
    pub uri: Pkcs11Uri,
    /// The module's shared object (`mqtt.pkcs11_module` or `module-path=`).
    pub module: PathBuf,
    /// The file holding the user PIN (`mqtt.pkcs11_pin_file` or `pin-source=`).
    pub pin_file: PathBuf,
}

/// Why a token key cannot be used: the setting to change, the problem, the fix. Never
/// holds the PIN.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct Error {
    /// The configuration key to look at.
    pub setting: &'static str,
    /// What is wrong.
    pub problem: String,
    /// What to do.
    pub fix: String,
}

fn refuse(setting: &'static str, problem: impl Into<String>, fix: impl Into<String>) -> Error {
    Error {
        setting,
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Whether this binary can use a token key.
pub const SUPPORTED: bool = cfg!(feature = "pkcs11");

/// Rule: a binary built without PKCS#11 refuses a token key, naming the builds that have it.
pub fn unsupported_build(built_with_pkcs11: bool) -> Option<Error> {
    (!built_with_pkcs11).then(not_built)
}

/// The refusal of a build without PKCS#11.
pub fn not_built() -> Error {
    refuse(
        "mqtt.key",
        "is a PKCS#11 key, and this binary is built without PKCS#11 support (the static musl builds cannot load a module)",
        "install the glibc .deb package (securetunnel-agent_<version>_<arch>.deb), which has it, or build with --features pkcs11; or keep the key in a PEM file",
    )
}

/// A token key's type and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA on NIST P-256.
    EcP256,
    /// ECDSA on NIST P-384.
    EcP384,
    /// RSA with a modulus of `bits`.
    Rsa {
        /// The modulus's size.
        bits: usize,
    },
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcP256 => f.write_str("EC P-256"),
            KeyKind::EcP384 => f.write_str("EC P-384"),
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
        }
    }
}

/// DER of the curves' OIDs, as `CKA_EC_PARAMS` holds them.
const P256_OID: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: [u8; 7] = [0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

/// Rule: an EC key's curve from its `CKA_EC_PARAMS` (a named curve's OID); others are unknown.
pub fn curve(params: &[u8]) -> Option<KeyKind> {
    match params {
        p if p == P256_OID => Some(KeyKind::EcP256),
        p if p == P384_OID => Some(KeyKind::EcP384),
        _ => None,
    }
}

/// Rule: an RSA modulus's size in bits (leading zero bytes do not count).
pub fn bits(modulus: &[u8]) -> usize {
    let start = modulus
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(modulus.len());
    match modulus.get(start) {
        Some(top) => (modulus.len() - start - 1) * 8 + (8 - top.leading_zeros() as usize),
        None => 0,
    }
}

/// What a token says of itself, to match against the URI.
pub struct TokenFacts<'a> {
    /// `CKA_LABEL` of the token, blanks trimmed (as every field).
    pub label: &'a str,
    /// Its manufacturer.
    pub manufacturer: &'a str,
    /// Its model.
    pub model: &'a str,
    /// Its serial number.
    pub serial: &'a str,
    /// The slot it is in.
    pub slot: u64,
}

/// Rule: a token matches when every token attribute the URI gives is equal; a URI that gives
/// none matches the first token.
pub fn token_matches(uri: &Pkcs11Uri, t: &TokenFacts<'_>) -> bool {
    let same = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    same(&uri.token, t.label)
        && same(&uri.manufacturer, t.manufacturer)
        && same(&uri.model, t.model)
        && same(&uri.serial, t.serial)
        && uri.slot_id.is_none_or(|s| s == t.slot)
}

#[cfg(feature = "pkcs11")]
/// Names for an error message: quoted, comma-separated; "none" when there are none.
fn listing(names: &[String]) -> String {
    if names.is_empty() {
        return "none".to_owned();
    }
    names
        .iter()
        .map(|n| {
            if n.starts_with('"') {
                n.clone()
            } else {
                format!("{n:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(feature = "pkcs11")]
/// How an error names the key the URI asks for.
fn describe_key(uri: &Pkcs11Uri) -> String {
    let id = uri.id.as_ref().map(|id| {
        let hex: String = id.iter().map(|b| format!("%{b:02x}")).collect();
        format!("id={hex}")
    });
    let label = uri.object.as_ref().map(|o| format!("labelled {o:?}"));
    [label, id]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" with ")
}

/// The longest PIN file read (PKCS#11 PINs are short; a device or FIFO is not read on).
const MAX_PIN_FILE: u64 = 256;

/// Rule: the PIN is the content of a regular file of at most `MAX_PIN_FILE` bytes, without
/// one trailing newline; an empty one is refused. Errors name the file, never its content.
pub fn read_pin(path: &Path) -> Result<Pin, Error> {
    use std::io::Read;
    let unusable = |why: String| {
        refuse(
            "mqtt.pkcs11_pin_file",
            format!("{}: {why}", path.display()),
            "create the file with the token's user PIN, readable by the agent only (chmod 600)",
        )
    };
    let file = std::fs::File::open(path).map_err(|e| unusable(e.to_string()))?;
    let meta = file.metadata().map_err(|e| unusable(e.to_string()))?;
    if !meta.is_file() || meta.len() > MAX_PIN_FILE {
        return Err(unusable(format!(
            "not a regular file of at most {MAX_PIN_FILE} bytes"
        )));
    }
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    file.take(MAX_PIN_FILE)
        .read_to_end(&mut bytes)
        .map_err(|e| unusable(e.to_string()))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| {
        refuse(
            "mqtt.pkcs11_pin_file",
            format!("{} is not UTF-8 text", path.display()),
            "write the PIN as text",
        )
    })?;
    let pin = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if pin.is_empty() {
        return Err(refuse(
            "mqtt.pkcs11_pin_file",
            format!("{} is empty", path.display()),
            "write the token's user PIN in it",
        ));
    }
    Ok(Pin::new(pin))
}

/// A file's identity and version: inode, size, modification time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileStamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    /// The stamp of `path` now; `None` if it cannot be read.
    pub fn of(path: &Path) -> Option<FileStamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            ino: m.ino(),
            len: m.len(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Rule: a PIN the token refused is not tried again while its file is unchanged (each try
/// spends one of the token's few before it locks the PIN).
pub fn try_pin(refused: Option<&FileStamp>, now: Option<&FileStamp>) -> bool {
    match (refused, now) {
        (Some(r), Some(n)) => r != n,
        (Some(_), None) => false,
        (None, _) => true,
    }
}

#[cfg(test)]
mod tests;
