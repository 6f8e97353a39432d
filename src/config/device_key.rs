//! `mqtt.key` and `mqtt.cert`: the device's key in a PEM file, or in a token (`pkcs11:`,
//! RFC 7512) with the module and the PIN file it needs. Checked here without opening
//! anything; `files` opens them.

use std::fmt;
use std::path::{Path, PathBuf};

use super::schema::RawMqtt;
use super::{ConfigError, err};
use crate::pkcs11::{self, KeyRef};

/// Where the device's private key is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceKey {
    /// A PEM file (PKCS#8, SEC1 or PKCS#1).
    File(PathBuf),
    /// A key that never leaves its token.
    Token(Box<KeyRef>),
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKey::File(p) => write!(f, "{}", p.display()),
            DeviceKey::Token(k) => f.write_str(&k.text),
        }
    }
}

/// `[mqtt]`'s key settings; `None` (with errors) when they are not usable.
pub(super) fn check_device_key(m: &RawMqtt, errors: &mut Vec<ConfigError>) -> Option<DeviceKey> {
    if !pkcs11::is_pkcs11_uri(&m.key) {
        return check_file_key(m, errors);
    }
    if let Some(e) = pkcs11::unsupported_build(pkcs11::SUPPORTED) {
        errors.push(err(e.setting, e.problem, e.fix));
        return None;
    }
    let uri = match pkcs11::uri::parse(&m.key) {
        Ok(u) => u,
        Err(e) => {
            errors.push(err(
                "mqtt.key",
                format!("the PKCS#11 URI {}", e.problem),
                e.fix,
            ));
            return None;
        }
    };
    let module = one_of(
        "mqtt.pkcs11_module",
        m.pkcs11_module.as_deref(),
        "module-path",
        uri.module_path.as_deref(),
        "e.g. /usr/lib/softhsm/libsofthsm2.so, or the TPM's /usr/lib/<arch>-linux-gnu/libtpm2_pkcs11.so.1",
        errors,
    );
    let pin_file = one_of(
        "mqtt.pkcs11_pin_file",
        m.pkcs11_pin_file.as_deref(),
        "pin-source",
        uri.pin_source.as_deref(),
        "e.g. /etc/securetunnel-agent/token.pin, holding the token's user PIN (chmod 600)",
        errors,
    );
    Some(DeviceKey::Token(Box::new(KeyRef {
        text: m.key.clone(),
        uri,
        module: module?,
        pin_file: pin_file?,
    })))
}

/// Rule: a token key's module (or PIN file) is given once: by the setting or by the URI's
/// query attribute, the same if both; an absolute path.
fn one_of(
    setting: &'static str,
    configured: Option<&Path>,
    attribute: &str,
    in_uri: Option<&Path>,
    example: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<PathBuf> {
    let path = match (configured, in_uri) {
        (Some(a), Some(b)) if a != b => {
            let problem = format!(
                "{} and the URI's {attribute}= {} differ",
                a.display(),
                b.display()
            );
            errors.push(err(
                setting,
                problem,
                format!("give it once: remove {setting} or {attribute}="),
            ));
            return None;
        }
        (Some(p), _) | (None, Some(p)) => p,
        (None, None) => {
            let problem = format!("is needed for a PKCS#11 key (or {attribute}= in mqtt.key)");
            errors.push(err(setting, problem, example.to_owned()));
            return None;
        }
    };
    if !path.is_absolute() {
        errors.push(err(
            setting,
            format!("{} is not an absolute path", path.display()),
            "give the whole path, starting with /",
        ));
        return None;
    }
    Some(path.to_owned())
}

/// A PEM key file: it needs `mqtt.cert`, and the token settings mean nothing with it.
fn check_file_key(m: &RawMqtt, errors: &mut Vec<ConfigError>) -> Option<DeviceKey> {
    let before = errors.len();
    if m.key.is_empty() {
        errors.push(err(
            "mqtt.key",
            "is empty",
            "give the device's private key file, or a pkcs11: URI",
        ));
    }
    if m.cert.is_none() {
        errors.push(err(
            "mqtt.cert",
            "is needed with a key file",
            "give the device certificate's PEM file (only a pkcs11: key can take it from its token)",
        ));
    }
    for (setting, given) in [
        ("mqtt.pkcs11_module", m.pkcs11_module.is_some()),
        ("mqtt.pkcs11_pin_file", m.pkcs11_pin_file.is_some()),
    ] {
        if given {
            errors.push(err(
                setting,
                "is only used with a PKCS#11 key, and mqtt.key is a file",
                "remove it, or set mqtt.key to the key's pkcs11: URI",
            ));
        }
    }
    (errors.len() == before).then(|| DeviceKey::File(PathBuf::from(&m.key)))
}
