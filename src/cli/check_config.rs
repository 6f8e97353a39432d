//! `check-config`: the configuration and the files it names checked, then a summary of what
//! the agent will do. No secrets: there are none in the file, and keys stay on disk.

use std::path::Path;
use std::process::ExitCode;

use crate::config::{Config, Identity, UNIT_LIMIT_NOFILE, UNIT_MEMORY_MAX, resource_needs};
use crate::services::ServiceMap;

/// Exit 0 and a redacted summary, or every problem and exit 2.
pub fn check_config(path: &Path, user: Option<&str>) -> ExitCode {
    let who = match crate::sandbox::Identity::agent(user) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("securetunnel-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let Some((cfg, checked)) = super::load_checked(path) else {
        return ExitCode::from(2);
    };
    // The unit's sandbox (with its drop-ins) applies only where systemd runs the agent.
    let unit = Path::new("/run/systemd/system")
        .exists()
        .then(crate::sandbox::UnitSettings::installed);
    let who = match &unit {
        Some(u) => who.with_groups(&u.groups),
        None => who,
    };
    let mut sockets = crate::sandbox::unix_socket_warnings(&cfg.services, &who, unit.as_ref());
    // Run as root, check-config reads what the service's user may not.
    for (key, path) in files_the_agent_reads(&cfg) {
        let problem = crate::sandbox::file_problem(&path, &who, unit.as_ref());
        sockets.extend(problem.map(|p| format!("{key}: {p}")));
    }
    sockets.extend(consent_warning(&cfg, unit.as_ref()));
    for (name, t) in &cfg.things {
        let thing = crate::sandbox::unix_socket_warnings(&t.services, &who, unit.as_ref());
        sockets.extend(thing.into_iter().map(|w| format!("thing {name}: {w}")));
    }
    println!("{}: OK", path.display());
    for (k, v) in summary(&cfg, &checked.identity) {
        println!("  {k:<16} {v}");
    }
    for w in checked.warnings.iter().chain(&sockets) {
        println!("warning: {w}");
    }
    ExitCode::SUCCESS
}

/// The files the service opens at its start, by key (a CA directory is read file by file).
fn files_the_agent_reads(cfg: &Config) -> Vec<(&'static str, std::path::PathBuf)> {
    let mut files = Vec::new();
    files.extend(cfg.mqtt.cert.clone().map(|p| ("mqtt.cert", p)));
    match &cfg.mqtt.key {
        crate::config::DeviceKey::File(p) => files.push(("mqtt.key", p.clone())),
        crate::config::DeviceKey::Token(k) => {
            files.push(("mqtt.pkcs11_pin_file", k.pin_file.clone()))
        }
    }
    files.extend(cfg.mqtt.ca.clone().map(|p| ("mqtt.ca", p)));
    files.extend(
        cfg.tunnel
            .ca
            .clone()
            .filter(|p| p.is_file())
            .map(|p| ("tunnel.ca", p)),
    );
    files
}

/// `[shadow]`: off, or where the documents go and the policy statement they need.
fn shadow(cfg: &Config) -> String {
    if !cfg.shadow {
        return "off".to_owned();
    }
    let thing = &cfg.thing_name;
    format!(
        "on: tunnel state to {}, at most every {} s; the policy needs {}",
        crate::shadow::topic(thing),
        crate::shadow::MIN_INTERVAL.as_secs(),
        crate::shadow::policy_statement(thing)
    )
}

/// `[audit]`: where the trail goes, and the policy statement its topic needs.
fn audit(cfg: &Config) -> String {
    let mut sinks = vec!["journal (target audit)".to_owned()];
    if let Some(b) = cfg.audit.file {
        sinks.push(format!(
            "{} ({} files of at most {} KiB)",
            cfg.state_dir.join("audit.jsonl").display(),
            b.files,
            b.size / 1024
        ));
    }
    if let Some(topic) = &cfg.audit.mqtt_topic {
        sinks.push(format!(
            "MQTT topic {topic} (QoS 1, at most {} events/s; the policy needs {})",
            crate::audit::MQTT_RATE,
            crate::audit::policy_statement(topic)
        ));
    }
    sinks.join("; ")
}

/// `[consent]`: always, or the file, what it covers and whether it grants now.
fn consent(cfg: &Config) -> String {
    use crate::consent::{Reading, reading_of};
    let Some(s) = &cfg.consent else {
        return "always (no site consent asked)".to_owned();
    };
    let covers = match s.services.as_slice() {
        [] => String::new(),
        some => format!(" for {} (other services stay open)", some.join(", ")),
    };
    let now = match reading_of(&s.path) {
        Reading::Present => "granted".to_owned(),
        Reading::Absent => "withheld (no file)".to_owned(),
        Reading::NoDirectory => "withheld (its directory does not exist)".to_owned(),
        Reading::Symlink => "withheld (a symbolic link is never followed)".to_owned(),
        Reading::NotAFile => "withheld (not a regular file)".to_owned(),
        Reading::Unreadable(e) => format!("withheld ({e})"),
    };
    format!(
        "tunnels served only while {} exists{covers}; now {now}",
        s.path.display()
    )
}

/// What would keep the consent file from ever granting under the service.
fn consent_warning(cfg: &Config, unit: Option<&crate::sandbox::UnitSettings>) -> Option<String> {
    use crate::consent::{FILE_NAME, Reading, reading_of};
    let s = cfg.consent.as_ref()?;
    let path = s.path.display();
    if let Some(setting) = unit.and_then(|u| crate::sandbox::hidden_by(&s.path, u)) {
        return Some(format!(
            "consent.path: {path} is hidden by the unit's {setting}: the agent would watch another directory than the one written to; put the file under /run, e.g. /run/keyswitch/allow"
        ));
    }
    match reading_of(&s.path) {
        Reading::Symlink => Some(format!(
            "consent.path: {path} is a symbolic link, which never grants: create a regular file (touch)"
        )),
        Reading::NotAFile => Some(format!(
            "consent.path: {path} is not a regular file and never grants: remove it, then touch it to grant"
        )),
        Reading::NoDirectory if s.path != cfg.runtime_dir.join(FILE_NAME) => Some(format!(
            "consent.path: the directory of {path} does not exist: consent stays withheld until it is created and the file with it"
        )),
        _ => None,
    }
}

/// The summary's lines, as (label, value).
pub fn summary(cfg: &Config, id: &Identity) -> Vec<(&'static str, String)> {
    vec![
        ("thing name", cfg.thing_name.clone()),
        ("downstream things", downstream(cfg)),
        ("notify topic", cfg.notify_topic()),
        ("MQTT", mqtt(cfg)),
        ("certificate", id.cert_source.clone()),
        ("private key", id.key.clone()),
        (
            "MQTT CA",
            cfg.mqtt
                .ca
                .as_ref()
                .map_or("platform CA store".into(), |p| {
                    format!("{} only (pinned)", p.display())
                }),
        ),
        ("tunnel endpoint", tunnel_endpoint(cfg)),
        ("tunnel CA", tunnel_ca(cfg)),
        ("services", services(&cfg.services).join(", ")),
        ("limits", limits(cfg)),
        ("resources", resources(cfg)),
        ("dead links", dead_links(cfg)),
        ("restarts", restarts(cfg)),
        ("rotation", format!("{:?}", cfg.rotation).to_lowercase()),
        ("shadow", shadow(cfg)),
        ("site consent", consent(cfg)),
        ("audit trail", audit(cfg)),
        ("state dir", cfg.state_dir.display().to_string()),
        (
            "upgrades",
            format!(
                "a new binary is checked, then executed once no local connection is open, or after {} min (upgrade_deadline_minutes)",
                cfg.upgrade_deadline.as_secs() / 60
            ),
        ),
        (
            "live status",
            format!(
                "{} (securetunnel-agent status)",
                cfg.runtime_dir.join(crate::config::SOCKET_NAME).display()
            ),
        ),
        ("proxy", proxy(cfg)),
    ]
}

fn services(map: &ServiceMap) -> Vec<String> {
    map.named()
        .map(|(s, e)| format!("{s} -> {e}"))
        .chain(map.unnamed_endpoint().map(|e| format!("(unnamed) -> {e}")))
        .collect()
}

fn downstream(cfg: &Config) -> String {
    if cfg.things.is_empty() {
        return "none".to_owned();
    }
    let things: Vec<String> = cfg
        .things
        .iter()
        .map(|(name, t)| {
            let cap = t
                .max_tunnels
                .map(|n| format!(", at most {n} tunnels"))
                .unwrap_or_default();
            format!("{name} ({}{cap})", services(&t.services).join(", "))
        })
        .collect();
    things.join("; ")
}

fn mqtt(cfg: &Config) -> String {
    let alpn = cfg.mqtt.alpn.as_deref();
    format!(
        "{}:{} as client {:?}, mutual TLS{}",
        cfg.mqtt.host,
        cfg.mqtt.port,
        cfg.mqtt.client_id,
        alpn.map(|p| format!(", ALPN {p}")).unwrap_or_default()
    )
}

fn tunnel_endpoint(cfg: &Config) -> String {
    let mut tunnel = match &cfg.tunnel.endpoint {
        Some(e) => format!("{e} (override)"),
        None => "data.tunneling.iot.<region>.amazonaws.com:443, region from each notify".into(),
    };
    for (host, (ip, port)) in &cfg.tunnel.resolve {
        let port = port.map(|p| format!(" port {p}")).unwrap_or_default();
        tunnel.push_str(&format!("; {host} at {ip}{port} (tunnel.resolve)"));
    }
    tunnel
}

fn tunnel_ca(cfg: &Config) -> String {
    match &cfg.tunnel.ca {
        None => "platform CA store".into(),
        Some(p) if cfg.tunnel.ca_only => format!("{} only (pinned)", p.display()),
        Some(p) => format!("{} + platform CA store", p.display()),
    }
}

fn limits(cfg: &Config) -> String {
    format!(
        "{} tunnels, {} connections each, lifetime at most {} min, stall reset after {} ms",
        cfg.limits.max_tunnels,
        cfg.limits.max_connections_per_tunnel,
        cfg.limits.max_lifetime.as_secs_f64() / 60.0,
        cfg.tunnel.stall_timeout.as_millis()
    )
}

fn resources(cfg: &Config) -> String {
    let (fds, memory) = resource_needs(&cfg.limits);
    format!(
        "{} KiB buffered at most; up to {fds} descriptors (unit: {UNIT_LIMIT_NOFILE}), {} MiB (unit: {} MiB)",
        cfg.limits.max_buffered / 1024,
        memory >> 20,
        UNIT_MEMORY_MAX >> 20
    )
}

fn dead_links(cfg: &Config) -> String {
    if cfg.tunnel.idle_timeout.is_zero() {
        return "TCP keepalive only (tunnel.idle_timeout_secs = 0)".to_owned();
    }
    format!(
        "websocket dropped after {} s without a byte; TCP keepalive",
        cfg.tunnel.idle_timeout.as_secs()
    )
}

fn restarts(cfg: &Config) -> String {
    if !cfg.tunnel.persist_sessions {
        return "sessions are not persisted (tunnel.persist_sessions = false)".to_owned();
    }
    format!(
        "live sessions persisted in {}/sessions and rejoined",
        cfg.state_dir.display()
    )
}

fn proxy(cfg: &Config) -> String {
    let Some(p) = &cfg.proxy else {
        return "none (direct connections)".to_owned();
    };
    let mut via = format!("{} for MQTT and the data plane (CONNECT)", p.proxy);
    if !p.no_proxy.is_empty() {
        via.push_str(&format!("; direct for {}", p.no_proxy.join(", ")));
    }
    via
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    const MIN: &str = "thing_name = \"gw-1\"\n[mqtt]\nendpoint = \"a.example\"\ncert = \"/c\"\nkey = \"/k\"\n[services]\nSSH = 22\n";

    #[test]
    fn the_summary_says_whether_the_shadow_is_on_and_the_statement_it_needs() {
        let off = crate::config::parse(MIN, Path::new("a.toml")).unwrap();
        assert_eq!(super::shadow(&off), "off");
        let text = format!("{MIN}[shadow]\nenabled = true\n");
        let on = crate::config::parse(&text, Path::new("a.toml")).unwrap();
        let line = super::shadow(&on);
        assert!(
            line.contains("$aws/things/gw-1/shadow/name/securetunnel/update"),
            "{line}"
        );
        assert!(line.contains("\"Action\":\"iot:Publish\""), "{line}");
    }

    #[test]
    fn the_summary_says_what_consent_covers_and_whether_it_grants_now() {
        let dir = std::env::temp_dir().join(format!("consent-summary-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let allow = dir.join("allow");
        let text = format!(
            "{MIN}[consent]\nmode = \"file\"\npath = \"{}\"\nservices = [\"SSH\"]\n",
            allow.display()
        );
        let cfg = crate::config::parse(&text, Path::new("a.toml")).unwrap();
        let line = super::consent(&cfg);
        assert!(
            line.contains("for SSH (other services stay open)"),
            "{line}"
        );
        assert!(line.ends_with("now withheld (no file)"), "{line}");
        std::fs::write(&allow, "").unwrap();
        assert!(super::consent(&cfg).ends_with("now granted"));
        assert_eq!(super::consent_warning(&cfg, None), None);
        std::fs::remove_file(&allow).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &allow).unwrap();
        let w = super::consent_warning(&cfg, None).unwrap();
        assert!(w.contains("symbolic link"), "{w}");
        std::fs::remove_dir_all(&dir).unwrap();
        let off = crate::config::parse(MIN, Path::new("a.toml")).unwrap();
        assert!(super::consent(&off).starts_with("always"));
    }

    #[test]
    fn the_summary_names_the_audit_sinks_and_the_statement_the_topic_needs() {
        let cfg = crate::config::parse(MIN, Path::new("a.toml")).unwrap();
        let line = super::audit(&cfg);
        assert!(
            line.contains("audit.jsonl (2 files of at most 1024 KiB)"),
            "{line}"
        );
        let text = format!("{MIN}[audit]\nfile = false\nmqtt_topic = \"sites/gw-1/audit\"\n");
        let cfg = crate::config::parse(&text, Path::new("a.toml")).unwrap();
        let line = super::audit(&cfg);
        assert!(!line.contains("audit.jsonl"), "{line}");
        assert!(line.contains("topic/sites/gw-1/audit"), "{line}");
    }
}
