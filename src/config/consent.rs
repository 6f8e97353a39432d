//! `[consent]`: site consent (see `crate::consent`), checked against the service maps.

use super::schema::RawConfig;
use super::{ConfigError, err};
use crate::consent::{DEFAULT_PATH, Settings};

/// `None` for `mode = "always"` (the default).
pub(super) fn check_consent(raw: &RawConfig, errors: &mut Vec<ConfigError>) -> Option<Settings> {
    let c = &raw.consent;
    match c.mode.as_deref().unwrap_or("always") {
        "always" => {
            for (key, set) in [
                ("consent.path", c.path.is_some()),
                ("consent.services", c.services.is_some()),
            ] {
                if set {
                    errors.push(err(
                        key,
                        "is set but consent.mode is \"always\", so nothing asks for consent",
                        "add mode = \"file\" under [consent], or remove the key",
                    ));
                }
            }
            None
        }
        "file" => {
            let path = c.path.clone().unwrap_or_else(|| DEFAULT_PATH.into());
            if !path.is_absolute() || path.file_name().is_none() {
                errors.push(err(
                    "consent.path",
                    format!("{} is not an absolute path to a file", path.display()),
                    format!("use e.g. {DEFAULT_PATH}"),
                ));
            }
            let services = c.services.clone().unwrap_or_default();
            check_services(raw, &services, errors);
            Some(Settings { path, services })
        }
        other => {
            errors.push(err(
                "consent.mode",
                format!("{other:?} is not a consent mode"),
                "use \"always\" (no site consent) or \"file\" (tunnels only while consent.path exists)",
            ));
            None
        }
    }
}

/// Rule (consent services): each listed service must be one some service map names, so a
/// misspelt name cannot leave the service it meant open.
fn check_services(raw: &RawConfig, services: &[String], errors: &mut Vec<ConfigError>) {
    let maps = std::iter::once(&raw.services).chain(raw.things.values().map(|t| &t.services));
    let named: Vec<&str> = maps.flat_map(|m| m.named().map(|(name, _)| name)).collect();
    if raw.consent.services.as_ref().is_some_and(Vec::is_empty) {
        errors.push(err(
            "consent.services",
            "is empty, so consent would cover nothing",
            "list the services that need consent, e.g. [\"SSH\"], or remove the key to cover them all",
        ));
    }
    for s in services {
        if !named.contains(&s.as_str()) {
            errors.push(err(
                "consent.services",
                format!("{s:?} is in no service map, so consent would not cover the service meant"),
                format!("use a name from the service maps: {}", named.join(", ")),
            ));
        }
    }
}
