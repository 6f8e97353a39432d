//! From the file as written (`schema`) to a `Config`: every rule on a value, each problem
//! named by key with its fix. One function per section of the file.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::schema::{RawConfig, RawLimits, RawMqtt, RawProxy, RawTunnel};
use super::{
    AgentLimits, Config, ConfigError, ConfigErrors, DEFAULT_STATE_DIR, MAX_DOWNSTREAM_THINGS,
    MAX_LIFETIME_MINUTES, MqttConfig, ThingConfig, TunnelConfig, err, mqtt_alpn,
};
use crate::bridge::DataEndpoint;
use crate::protocol;

/// Host -> (address, port if given), as `tunnel.resolve` holds them.
type Resolve = BTreeMap<String, (IpAddr, Option<u16>)>;

/// `ip`, `ip:port` or `[ipv6]:port`, as a `tunnel.resolve` value.
fn parse_resolve_value(v: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    if let Ok(ip) = v.parse() {
        return Some((ip, None));
    }
    let sa: std::net::SocketAddr = v.parse().ok()?;
    (sa.port() != 0).then_some((sa.ip(), Some(sa.port())))
}

pub(super) fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    check_thing_name(&raw.thing_name, &mut errors);
    let client_id = check_mqtt(&raw.mqtt, &raw.thing_name, &mut errors);
    let key = super::device_key::check_device_key(&raw.mqtt, &mut errors);
    let (endpoint, resolve) = check_tunnel(&raw.tunnel, &mut errors);
    if raw.services.is_empty() {
        errors.push(err(
            "services",
            "no service is mapped, so every tunnel would be refused",
            "add e.g. SSH = 22 under [services]",
        ));
    }
    check_limits(&raw.limits, &mut errors);
    let proxy = check_proxy(raw.proxy.as_ref(), &mut errors);
    errors.extend(validate_things(&raw));
    check_paths(&raw, &mut errors);
    let consent = super::accountability::check_consent(&raw, &mut errors);
    let audit = super::accountability::check_audit(&raw, &mut errors);
    match key {
        Some(key) if errors.is_empty() => {
            let mut cfg = build(raw, path, client_id, key, endpoint, resolve, proxy);
            cfg.consent = consent;
            cfg.audit = audit;
            Ok(cfg)
        }
        _ => Err(ConfigErrors(errors)),
    }
}

fn check_thing_name(name: &str, errors: &mut Vec<ConfigError>) {
    let names = "use 1-128 characters of letters, digits, ':', '_' or '-'";
    if !protocol::is_valid_service_id(name) {
        errors.push(err(
            "thing_name",
            format!("{:?} is not a valid thing name", name),
            names,
        ));
    }
}

/// `[mqtt]`; returns the client id (the thing name unless set).
fn check_mqtt(m: &RawMqtt, thing_name: &str, errors: &mut Vec<ConfigError>) -> String {
    if m.endpoint.is_empty()
        || m.endpoint.contains("://")
        || m.endpoint.contains(':')
        || m.endpoint.contains('/')
    {
        errors.push(err(
            "mqtt.endpoint",
            format!("{:?} is not a host name", m.endpoint),
            "give the AWS IoT Core data endpoint host only, e.g. a1b2c3-ats.iot.eu-west-1.amazonaws.com; the port goes in mqtt.port",
        ));
    }
    if let Some(p) = &m.alpn
        && (p.len() > 255 || !p.bytes().all(|b| b.is_ascii_graphic()))
    {
        errors.push(err(
            "mqtt.alpn",
            format!("{p:?} is not an ALPN protocol name"),
            "give one name such as \"x-amzn-mqtt-ca\" or \"mqtt\", or \"\" for none",
        ));
    }
    if m.port == 0 {
        errors.push(err(
            "mqtt.port",
            "0 is not a port",
            "use 8883, or 443 (ALPN x-amzn-mqtt-ca)",
        ));
    }
    let client_id = m.client_id.clone().unwrap_or_else(|| thing_name.to_owned());
    if client_id.is_empty() || client_id.len() > 128 {
        errors.push(err(
            "mqtt.client_id",
            "must be 1-128 characters",
            "leave it out to use the thing name",
        ));
    }
    if !(5..=1200).contains(&m.keep_alive_secs) {
        errors.push(err(
            "mqtt.keep_alive_secs",
            format!("{} is out of range", m.keep_alive_secs),
            "use 5-1200 seconds; AWS IoT Core accepts 30-1200",
        ));
    }
    if let Some(t) = &m.notify_topic {
        if t.is_empty() || t.len() > 256 || t.contains(['+', '#', '\0']) {
            errors.push(err(
                "mqtt.notify_topic",
                format!("{t:?} is not a topic to subscribe to"),
                "give one topic without wildcards, or leave it out for $aws/things/<thing_name>/tunnels/notify",
            ));
        }
    }
    if m.reconnect_spread_secs > 3600 {
        errors.push(err(
            "mqtt.reconnect_spread_secs",
            format!("{} is out of range", m.reconnect_spread_secs),
            "use 0-3600 seconds (default 20)",
        ));
    }
    client_id
}

/// `[tunnel]`; returns the endpoint override and the `resolve` table.
fn check_tunnel(t: &RawTunnel, errors: &mut Vec<ConfigError>) -> (Option<DataEndpoint>, Resolve) {
    let endpoint = match t.endpoint.as_deref().map(DataEndpoint::parse_override) {
        Some(Ok(e)) => Some(e),
        Some(Err(p)) => {
            errors.push(err(
                "tunnel.endpoint",
                p,
                "give host[:port], or leave it out to use the notify's region",
            ));
            None
        }
        None => None,
    };
    let mut resolve = std::collections::BTreeMap::new();
    for (host, value) in &t.resolve {
        match parse_resolve_value(value) {
            Some(v) if !host.is_empty() => {
                resolve.insert(host.to_ascii_lowercase(), v);
            }
            _ => errors.push(err(
                &format!("tunnel.resolve.{host:?}"),
                format!("{value:?} is not an IP address with an optional port"),
                "give the address to connect to for this host, e.g. \"10.0.0.5\" or \"[fd00::5]:8443\"",
            )),
        }
    }
    if t.idle_timeout_secs != 0 && !(3..=3600).contains(&t.idle_timeout_secs) {
        errors.push(err(
            "tunnel.idle_timeout_secs",
            format!("{} is out of range", t.idle_timeout_secs),
            "use 3-3600 seconds (default 60), or 0 to rely on TCP alone",
        ));
    }
    if t.stall_timeout_ms < 100 {
        errors.push(err(
            "tunnel.stall_timeout_ms",
            format!("{} ms is too short", t.stall_timeout_ms),
            "use at least 100 (default 5000)",
        ));
    }
    (endpoint, resolve)
}

/// `[limits]`, each in its range and together within the service unit's ceilings.
fn check_limits(l: &RawLimits, errors: &mut Vec<ConfigError>) {
    if !(1..=100).contains(&l.max_tunnels) {
        errors.push(err(
            "limits.max_tunnels",
            format!("{} is out of range", l.max_tunnels),
            "use 1-100 (default 10)",
        ));
    }
    if !(1..=1024).contains(&l.max_connections_per_tunnel) {
        errors.push(err(
            "limits.max_connections_per_tunnel",
            format!("{} is out of range", l.max_connections_per_tunnel),
            "use 1-1024 (default 128)",
        ));
    }
    if !(l.max_lifetime_minutes > 0.0 && l.max_lifetime_minutes <= MAX_LIFETIME_MINUTES as f64) {
        errors.push(err(
            "limits.max_lifetime_minutes",
            format!("{} is out of range", l.max_lifetime_minutes),
            "use up to 720 minutes, fractions allowed (the service closes every tunnel after 720)",
        ));
    }
    if !(256..=262_144).contains(&l.max_buffered_kib) {
        errors.push(err(
            "limits.max_buffered_kib",
            format!("{} is out of range", l.max_buffered_kib),
            "use 256-262144 KiB (default 8192)",
        ));
    }
    if errors.is_empty() {
        errors.extend(super::resources::beyond_unit_ceilings(l));
    }
}

/// `[proxy]`: a URL (never quoted back: it may hold a password) and `no_proxy` entries.
fn check_proxy(
    p: Option<&RawProxy>,
    errors: &mut Vec<ConfigError>,
) -> Option<crate::proxy::ProxySettings> {
    match p {
        None => None,
        Some(RawProxy { url: None, .. }) => {
            errors.push(err(
                "proxy.url",
                "is missing",
                "set url = \"http://[user:password@]host:port\", or remove [proxy]",
            ));
            None
        }
        Some(RawProxy {
            url: Some(url),
            no_proxy,
        }) => match no_proxy
            .iter()
            .find_map(|e| crate::proxy::check_no_proxy_entry(e).err())
        {
            Some(why) => {
                errors.push(err(
                    "proxy.no_proxy",
                    why,
                    "use host names, .domain suffixes, IP addresses, address/prefix networks, or \"*\" alone",
                ));
                None
            }
            None => match crate::proxy::parse_proxy_url(url.expose()) {
                Ok(proxy) => Some(crate::proxy::ProxySettings {
                    proxy,
                    no_proxy: no_proxy.clone(),
                }),
                // The reason never quotes the URL: it may hold the password.
                Err(e) => {
                    errors.push(err(
                    "proxy.url",
                    e,
                    "use http://[user:password@]host:port (percent-encode @ and : in credentials)",
                ));
                    None
                }
            },
        },
    }
}

/// The directories and the upgrade deadline.
fn check_paths(raw: &RawConfig, errors: &mut Vec<ConfigError>) {
    if raw.runtime_dir.as_ref().is_some_and(|d| !d.is_absolute()) {
        errors.push(err(
            "runtime_dir",
            "is not an absolute path",
            "use e.g. /run/securetunnel-agent",
        ));
    }
    if !(raw.upgrade_deadline_minutes.is_finite() && raw.upgrade_deadline_minutes >= 0.0) {
        errors.push(err(
            "upgrade_deadline_minutes",
            format!(
                "{} is not a number of minutes",
                raw.upgrade_deadline_minutes
            ),
            "use e.g. 1440 (24 h); 0 re-executes at once, cutting open connections",
        ));
    }
    if !raw.state_dir.is_absolute() {
        errors.push(err(
            "state_dir",
            format!("{} is not an absolute path", raw.state_dir.display()),
            format!("use e.g. {DEFAULT_STATE_DIR}"),
        ));
    }
}

/// The `Config` of a file that passed every rule.
fn build(
    raw: RawConfig,
    path: &Path,
    client_id: String,
    key: super::DeviceKey,
    endpoint: Option<DataEndpoint>,
    resolve: Resolve,
    proxy: Option<crate::proxy::ProxySettings>,
) -> Config {
    Config {
        path: path.to_owned(),
        mqtt: MqttConfig {
            host: raw.mqtt.endpoint,
            port: raw.mqtt.port,
            client_id,
            cert: raw.mqtt.cert,
            key,
            ca: raw.mqtt.ca,
            keep_alive: Duration::from_secs(raw.mqtt.keep_alive_secs),
            notify_topic: raw.mqtt.notify_topic,
            reconnect_spread: Duration::from_secs(raw.mqtt.reconnect_spread_secs),
            alpn: mqtt_alpn(raw.mqtt.port, raw.mqtt.alpn.as_deref()),
        },
        thing_name: raw.thing_name,
        tunnel: TunnelConfig {
            endpoint,
            resolve,
            ca: raw.tunnel.ca,
            ca_only: raw.tunnel.ca_only,
            stall_timeout: Duration::from_millis(raw.tunnel.stall_timeout_ms),
            idle_timeout: Duration::from_secs(raw.tunnel.idle_timeout_secs),
            persist_sessions: raw.tunnel.persist_sessions,
        },
        services: raw.services,
        limits: AgentLimits {
            max_tunnels: raw.limits.max_tunnels,
            max_connections_per_tunnel: raw.limits.max_connections_per_tunnel,
            max_lifetime: Duration::from_secs_f64(raw.limits.max_lifetime_minutes * 60.0),
            max_buffered: raw.limits.max_buffered_kib * 1024,
        },
        rotation: raw.rotation.policy,
        state_dir: raw.state_dir,
        runtime_dir: raw.runtime_dir.unwrap_or_else(super::runtime_dir_here),
        upgrade_deadline: Duration::from_secs_f64(
            raw.upgrade_deadline_minutes.clamp(0.0, 1e9) * 60.0,
        ),
        proxy,
        shadow: raw.shadow.enabled,
        consent: None,
        audit: Default::default(),
        things: raw
            .things
            .into_iter()
            .map(|(name, t)| {
                let thing = ThingConfig {
                    services: t.services,
                    max_tunnels: t.max_tunnels,
                };
                (name, thing)
            })
            .collect(),
    }
}

/// Rule (downstream things): names as AWS IoT allows them, not the gateway's own, each with
/// services, a cap within `limits.max_tunnels`, and no more than `MAX_DOWNSTREAM_THINGS`
/// (AWS IoT's 50 subscriptions per connection, one taken by the gateway's own topic).
fn validate_things(raw: &RawConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if raw.things.len() > MAX_DOWNSTREAM_THINGS {
        errors.push(err(
            "things",
            format!(
                "{} downstream things; AWS IoT allows 50 subscriptions per MQTT connection and the gateway's own notify topic takes one",
                raw.things.len()
            ),
            format!("serve at most {MAX_DOWNSTREAM_THINGS} downstream things per gateway"),
        ));
    }
    for (name, t) in &raw.things {
        let key = format!("things.{name:?}");
        if !protocol::is_valid_service_id(name) {
            errors.push(err(
                &key,
                "is not a valid thing name",
                "use 1-128 characters of letters, digits, ':', '_' or '-'",
            ));
        }
        if raw.mqtt.notify_topic.as_deref() == Some(&crate::protocol::notify::notify_topic(name)) {
            errors.push(err(
                &key,
                "its notify topic is mqtt.notify_topic, the gateway's own",
                "remove mqtt.notify_topic or this thing",
            ));
        }
        if *name == raw.thing_name {
            errors.push(err(
                &key,
                "is the gateway's own thing",
                "put the gateway's own services under [services]",
            ));
        }
        if t.services.is_empty() {
            errors.push(err(
                &format!("{key}.services"),
                "no service is mapped, so every tunnel to this thing would be refused",
                format!("add e.g. HTTP = \"10.0.0.42:80\" under [things.{name}.services]"),
            ));
        }
        if t.services.unnamed_endpoint().is_some() {
            errors.push(err(
                &format!("{key}.services"),
                "has an unnamed mapping",
                "name each service, as in the tunnel's destination config",
            ));
        }
        if let Some(cap) = t.max_tunnels {
            if cap == 0 || cap > raw.limits.max_tunnels {
                errors.push(err(
                    &format!("{key}.max_tunnels"),
                    format!("{cap} is out of range"),
                    format!("use 1-{} (limits.max_tunnels)", raw.limits.max_tunnels),
                ));
            }
        }
    }
    errors
}
