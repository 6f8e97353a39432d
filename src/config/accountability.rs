//! `[consent]`: site consent (see `crate::consent`), checked against the service maps; and
//! `[audit]`: the audit trail's sinks (see `crate::audit`).

use super::schema::RawConfig;
use super::{ConfigError, err};
use crate::audit::{FileBound, Settings as AuditSettings};
use crate::consent::{FILE_NAME, Settings};

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
            let runtime = raw
                .runtime_dir
                .clone()
                .unwrap_or_else(super::runtime_dir_here);
            let path = c.path.clone().unwrap_or_else(|| runtime.join(FILE_NAME));
            if !path.is_absolute() || path.file_name().is_none() {
                errors.push(err(
                    "consent.path",
                    format!("{} is not an absolute path to a file", path.display()),
                    "use e.g. /run/securetunnel-agent/allow (the default: the runtime directory's allow)",
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

/// `[audit]`: the file's bound (2 x 1 MiB unless set) and the optional MQTT topic.
pub(super) fn check_audit(raw: &RawConfig, errors: &mut Vec<ConfigError>) -> AuditSettings {
    let a = &raw.audit;
    let size_kib = a.file_size_kib.unwrap_or(crate::audit::DEFAULT_FILE_KIB);
    if !(16..=65_536).contains(&size_kib) {
        errors.push(err(
            "audit.file_size_kib",
            format!("{size_kib} KiB is outside 16-65536"),
            "use e.g. 1024 (the default); the trail holds at most audit.files times this",
        ));
    }
    let files = a.files.unwrap_or(crate::audit::DEFAULT_FILES);
    if !(1..=crate::audit::MAX_FILES).contains(&files) {
        errors.push(err(
            "audit.files",
            format!("{files} is outside 1-10"),
            "use e.g. 2 (the default): the current file and the one before",
        ));
    }
    if let Some(topic) = &a.mqtt_topic
        && let Some(problem) = crate::audit::topic_problem(topic)
    {
        errors.push(err(
            "audit.mqtt_topic",
            format!("{topic:?} cannot be published to: {problem}"),
            "use a topic of your own, e.g. \"sites/<site>/audit\", or $aws/rules/<rule>/audit to reach an IoT rule directly",
        ));
    }
    AuditSettings {
        file: a.file.unwrap_or(true).then_some(FileBound {
            size: size_kib * 1024,
            files,
        }),
        mqtt_topic: a.mqtt_topic.clone(),
    }
}
