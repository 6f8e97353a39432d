//! The agent's configuration file (`/etc/securetunnel-agent/agent.toml`): parsed strictly
//! (unknown keys are errors), validated into a `Config` with nothing left optional that must
//! be set later, and checked against the files it names (`check-config`).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use crate::bridge::DataEndpoint;
use crate::protocol;
use crate::services::ServiceMap;
use crate::tls::{TlsError, TlsOptions, client_config, provider, root_store};

pub const DEFAULT_PATH: &str = "/etc/securetunnel-agent/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/securetunnel-agent";
/// The service's ceiling on a tunnel's lifetime (720 minutes).
pub const MAX_LIFETIME_MINUTES: u64 = 720;
/// AWS IoT Core's ALPN protocol for MQTT over port 443.
pub const MQTT_ALPN_443: &str = "x-amzn-mqtt-ca";

/// Rule: on port 443 AWS IoT tells MQTT from HTTPS by ALPN, so `x-amzn-mqtt-ca` is offered
/// there unless `mqtt.alpn` says otherwise (another name, or `""` for none);
/// other ports offer what `mqtt.alpn` names, by default nothing.
pub fn mqtt_alpn(port: u16, configured: Option<&str>) -> Option<String> {
    match configured {
        Some("") => None,
        Some(p) => Some(p.to_owned()),
        None => (port == 443).then(|| MQTT_ALPN_443.to_owned()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    thing_name: String,
    mqtt: RawMqtt,
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    services: ServiceMap,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    rotation: RawRotation,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    runtime_dir: Option<PathBuf>,
    /// An upgrade waits for open local connections at most this long.
    #[serde(default = "default_upgrade_deadline")]
    upgrade_deadline_minutes: f64,
    proxy: Option<RawProxy>,
    /// Downstream things the gateway serves tunnels for: `[things.<name>.services]`.
    #[serde(default)]
    things: std::collections::BTreeMap<String, RawThing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThing {
    #[serde(default)]
    services: ServiceMap,
    max_tunnels: Option<usize>,
}

/// A downstream thing: its own service map (an allow-list of its endpoints) and cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThingConfig {
    pub services: ServiceMap,
    /// At most this many of the agent's tunnels for this thing (`None`: only the agent's).
    pub max_tunnels: Option<usize>,
}

/// AWS IoT's subscriptions per connection; the gateway's own notify topic takes one.
pub const MAX_DOWNSTREAM_THINGS: usize = 49;

/// `[proxy]`: the URL may carry a password, so it is read as a secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    url: Option<crate::secret::Secret>,
    #[serde(default)]
    no_proxy: Vec<String>,
}

fn default_upgrade_deadline() -> f64 {
    24.0 * 60.0
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMqtt {
    endpoint: String,
    #[serde(default = "default_mqtt_port")]
    port: u16,
    client_id: Option<String>,
    cert: PathBuf,
    key: PathBuf,
    ca: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    keep_alive_secs: u64,
    notify_topic: Option<String>,
    #[serde(default = "default_spread")]
    reconnect_spread_secs: u64,
    alpn: Option<String>,
}

fn default_spread() -> u64 {
    20
}

fn default_mqtt_port() -> u16 {
    8883
}

fn default_keep_alive() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    endpoint: Option<String>,
    #[serde(default)]
    resolve: std::collections::BTreeMap<String, String>,
    ca: Option<PathBuf>,
    #[serde(default)]
    ca_only: bool,
    #[serde(default = "default_stall_ms")]
    stall_timeout_ms: u64,
    #[serde(default = "default_idle_secs")]
    idle_timeout_secs: u64,
    #[serde(default = "default_true")]
    persist_sessions: bool,
}

impl Default for RawTunnel {
    fn default() -> Self {
        RawTunnel {
            endpoint: None,
            resolve: Default::default(),
            ca: None,
            ca_only: false,
            stall_timeout_ms: default_stall_ms(),
            idle_timeout_secs: default_idle_secs(),
            persist_sessions: true,
        }
    }
}

fn default_idle_secs() -> u64 {
    crate::protocol::IDLE_TIMEOUT.as_secs()
}

fn default_true() -> bool {
    true
}

fn default_stall_ms() -> u64 {
    5000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_max_tunnels")]
    max_tunnels: usize,
    #[serde(default = "default_max_connections")]
    max_connections_per_tunnel: usize,
    #[serde(default = "default_max_lifetime")]
    max_lifetime_minutes: f64,
    #[serde(default = "default_buffered_kib")]
    max_buffered_kib: usize,
}

fn default_buffered_kib() -> usize {
    crate::bridge::DEFAULT_BUFFER_BUDGET / 1024
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_tunnels: default_max_tunnels(),
            max_connections_per_tunnel: default_max_connections(),
            max_lifetime_minutes: default_max_lifetime(),
            max_buffered_kib: default_buffered_kib(),
        }
    }
}

fn default_max_tunnels() -> usize {
    10
}

fn default_max_connections() -> usize {
    128
}

fn default_max_lifetime() -> f64 {
    MAX_LIFETIME_MINUTES as f64
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    #[serde(default)]
    policy: RotationPolicy,
}

/// What a new token for a tunnel that already has a live session does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RotationPolicy {
    /// Restart the session's bridge with the new token (the old one is revoked).
    #[default]
    Replace,
    /// Keep the old session until it ends and start another beside it.
    Parallel,
}

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Set when a local bridge remaps `$aws/things/<thing>/tunnels/notify`.
    pub notify_topic: Option<String>,
    /// The first reconnect after losing an established connection is spread over this.
    pub reconnect_spread: Duration,
    /// ALPN protocol offered in the TLS handshake (`mqtt_alpn`).
    pub alpn: Option<String>,
}

#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// Data-plane endpoint override; by default the notify's region decides.
    pub endpoint: Option<DataEndpoint>,
    /// Addresses for data-plane hosts, instead of DNS: host -> (address, port if given).
    pub resolve: std::collections::BTreeMap<String, (std::net::IpAddr, Option<u16>)>,
    pub ca: Option<PathBuf>,
    /// Trust only `ca` for the data plane, not the platform roots.
    pub ca_only: bool,
    pub stall_timeout: Duration,
    /// Zero: off.
    pub idle_timeout: Duration,
    pub persist_sessions: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct AgentLimits {
    pub max_tunnels: usize,
    pub max_connections_per_tunnel: usize,
    pub max_lifetime: Duration,
    /// Bytes all tunnels together hold toward local sockets.
    pub max_buffered: usize,
}

/// The systemd unit's ceilings (packaging/systemd/securetunnel-agent.service; a test keeps
/// them equal).
pub const UNIT_LIMIT_NOFILE: u64 = 8192;
pub const UNIT_MEMORY_MAX: u64 = 128 << 20;
/// Descriptors besides the tunnels' (MQTT, logs, state files, resolver).
const BASE_FDS: u64 = 64;
/// Memory besides the byte budget: the binary, TLS configurations, runtime.
const BASE_MEMORY: u64 = 16 << 20;
/// Per tunnel: websocket read buffer and write batch (2 x 128 KiB), a reassembled message
/// (up to 1 MiB), TLS buffers.
const TUNNEL_MEMORY: u64 = 1536 << 10;
/// Per local connection, payload aside (that is in the budget): socket, task, queue.
const CONNECTION_MEMORY: u64 = 16 << 10;

/// Rule: what the limits can need at most, as (descriptors, bytes).
pub fn resource_needs(l: &AgentLimits) -> (u64, u64) {
    let (tunnels, conns) = (l.max_tunnels as u64, l.max_connections_per_tunnel as u64);
    let fds = BASE_FDS + tunnels * (conns + 2);
    // Queued payloads are copies of their own bytes (`relay::remainder_to_queue`); the
    // allocator's size classes can round each up to twice its size. Chunks read from local
    // sockets keep at most twice what they count too (`local::keep_read_buffer`).
    // Each tunnel's reserve (`bridge::TUNNEL_RESERVE`) comes on top of the shared budget,
    // for both bridges of a tunnel during a rotation.
    let reserves = 2 * tunnels * crate::bridge::TUNNEL_RESERVE as u64;
    let memory = BASE_MEMORY
        + 2 * (l.max_buffered as u64 + reserves)
        + tunnels * (TUNNEL_MEMORY + 2 * crate::bridge::DEFAULT_UPWARD_BUDGET as u64)
        + tunnels * conns * CONNECTION_MEMORY;
    (fds, memory)
}

/// `ip`, `ip:port` or `[ipv6]:port`, as a `tunnel.resolve` value.
fn parse_resolve_value(v: &str) -> Option<(std::net::IpAddr, Option<u16>)> {
    if let Ok(ip) = v.parse() {
        return Some((ip, None));
    }
    let sa: std::net::SocketAddr = v.parse().ok()?;
    (sa.port() != 0).then_some((sa.ip(), Some(sa.port())))
}

/// Rule: `tunnel.resolve` replaces DNS for a data-plane host (names compared without case);
/// the endpoint's port applies unless the entry names one. TLS still verifies the host name.
pub fn resolve_override(
    resolve: &std::collections::BTreeMap<String, (std::net::IpAddr, Option<u16>)>,
    endpoint: &DataEndpoint,
) -> Option<std::net::SocketAddr> {
    let (ip, port) = resolve.get(&endpoint.host.to_ascii_lowercase())?;
    Some(std::net::SocketAddr::new(
        *ip,
        port.unwrap_or(endpoint.port),
    ))
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub thing_name: String,
    pub mqtt: MqttConfig,
    pub tunnel: TunnelConfig,
    pub services: ServiceMap,
    pub limits: AgentLimits,
    pub rotation: RotationPolicy,
    pub state_dir: PathBuf,
    /// Where the live status socket is (`status::default_runtime_dir` unless set).
    pub runtime_dir: PathBuf,
    /// How long an installed upgrade waits for open local connections to end.
    pub upgrade_deadline: Duration,
    /// `[proxy]`: MQTT and the data plane through an HTTP CONNECT proxy.
    pub proxy: Option<crate::proxy::ProxySettings>,
    /// Downstream things, by name (the gateway's own thing is not among them).
    pub things: std::collections::BTreeMap<String, ThingConfig>,
}

impl Config {
    pub fn notify_topic(&self) -> String {
        self.mqtt
            .notify_topic
            .clone()
            .unwrap_or_else(|| crate::notify::notify_topic(&self.thing_name))
    }
}

/// One problem, naming the key, what is wrong with its value, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.problem)?;
        if !self.fix.is_empty() {
            write!(f, "; {}", self.fix)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

fn err(key: &str, problem: impl Into<String>, fix: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// Several problems at once, so an operator fixes them in one go.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the file; does not open the certificate files (see `check_files`).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![err(
            &path.display().to_string(),
            format!("cannot read the configuration: {e}"),
            "create it (example: config/agent.toml) or pass --config",
        )])
    })?;
    parse(&text, path)
}

pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let key = path.display().to_string();
        ConfigErrors(vec![err(
            &key,
            e.message().to_owned() + &location(text, e.span()),
            "",
        )])
    })?;
    validate(raw, path)
}

fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(s) => {
            let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigErrors> {
    let mut errors = Vec::new();
    let names = "use 1-128 characters of letters, digits, ':', '_' or '-'";
    if !protocol::is_valid_service_id(&raw.thing_name) {
        errors.push(err(
            "thing_name",
            format!("{:?} is not a valid thing name", raw.thing_name),
            names,
        ));
    }
    let m = &raw.mqtt;
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
    let client_id = m
        .client_id
        .clone()
        .unwrap_or_else(|| raw.thing_name.clone());
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
            "use 30-1200 seconds (AWS IoT Core's range)",
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
    let endpoint = match raw
        .tunnel
        .endpoint
        .as_deref()
        .map(DataEndpoint::parse_override)
    {
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
    for (host, value) in &raw.tunnel.resolve {
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
    if raw.tunnel.idle_timeout_secs != 0 && !(3..=3600).contains(&raw.tunnel.idle_timeout_secs) {
        errors.push(err(
            "tunnel.idle_timeout_secs",
            format!("{} is out of range", raw.tunnel.idle_timeout_secs),
            "use 3-3600 seconds (default 60), or 0 to rely on TCP alone",
        ));
    }
    if m.reconnect_spread_secs > 3600 {
        errors.push(err(
            "mqtt.reconnect_spread_secs",
            format!("{} is out of range", m.reconnect_spread_secs),
            "use 0-3600 seconds (default 20)",
        ));
    }
    if raw.tunnel.stall_timeout_ms < 100 {
        errors.push(err(
            "tunnel.stall_timeout_ms",
            format!("{} ms is too short", raw.tunnel.stall_timeout_ms),
            "use at least 100 (default 5000)",
        ));
    }
    if raw.services.is_empty() {
        errors.push(err(
            "services",
            "no service is mapped, so every tunnel would be refused",
            "add e.g. SSH = 22 under [services]",
        ));
    }
    let l = &raw.limits;
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
        let limits = AgentLimits {
            max_tunnels: l.max_tunnels,
            max_connections_per_tunnel: l.max_connections_per_tunnel,
            max_lifetime: Duration::ZERO,
            max_buffered: l.max_buffered_kib * 1024,
        };
        let (fds, memory) = resource_needs(&limits);
        if fds > UNIT_LIMIT_NOFILE {
            errors.push(err(
                "limits.max_tunnels x limits.max_connections_per_tunnel",
                format!(
                    "{} x {} connections need up to {fds} file descriptors; the service unit allows {UNIT_LIMIT_NOFILE} (LimitNOFILE)",
                    l.max_tunnels, l.max_connections_per_tunnel
                ),
                "lower one of them, or raise LimitNOFILE in a drop-in and run the agent outside these checks",
            ));
        }
        if memory > UNIT_MEMORY_MAX {
            errors.push(err(
                "limits.max_tunnels x limits.max_connections_per_tunnel + limits.max_buffered_kib",
                format!(
                    "these limits can need {} MiB; the service unit allows {} MiB (MemoryMax)",
                    memory >> 20,
                    UNIT_MEMORY_MAX >> 20
                ),
                "lower max_tunnels, max_connections_per_tunnel or max_buffered_kib",
            ));
        }
    }
    let proxy = match &raw.proxy {
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
    };
    errors.extend(validate_things(&raw));
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
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        path: path.to_owned(),
        mqtt: MqttConfig {
            host: raw.mqtt.endpoint,
            port: raw.mqtt.port,
            client_id,
            cert: raw.mqtt.cert,
            key: raw.mqtt.key,
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
        runtime_dir: raw
            .runtime_dir
            .unwrap_or_else(crate::status::runtime_dir_here),
        upgrade_deadline: Duration::from_secs_f64(
            raw.upgrade_deadline_minutes.clamp(0.0, 1e9) * 60.0,
        ),
        proxy,
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
    })
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
        if raw.mqtt.notify_topic.as_deref() == Some(&crate::notify::notify_topic(name)) {
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

/// What the files named by a config turned into.
#[derive(Clone)]
pub struct Checked {
    pub mqtt_tls: Arc<rustls::ClientConfig>,
    pub tunnel_tls: Arc<rustls::ClientConfig>,
    pub warnings: Vec<String>,
    pub summary: Vec<(String, String)>,
}

fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            err(
                key,
                format!("{}: {}", path.display(), pem_problem(&e)),
                "give a PEM certificate file",
            )
        })?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{} holds no PEM certificate", path.display()),
            "give a PEM certificate file",
        ));
    }
    Ok(certs)
}

fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        other => format!("not valid PEM ({other:?})"),
    }
}

/// Opens every file the config names: certificates parse, the key loads (PKCS#8, SEC1 or
/// PKCS#1) and belongs to the certificate, and the TLS configurations build.
pub fn check_files(cfg: &Config) -> Result<Checked, ConfigErrors> {
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let cert = read_certs("mqtt.cert", &cfg.mqtt.cert)
        .map_err(|e| errors.push(e))
        .ok();
    let key = PrivateKeyDer::from_pem_file(&cfg.mqtt.key)
        .map_err(|e| {
            errors.push(err(
                "mqtt.key",
                format!("{}: {}", cfg.mqtt.key.display(), pem_problem(&e)),
                "give the device's private key in PEM (PKCS#8, SEC1 or PKCS#1)",
            ))
        })
        .ok();
    if let Ok(meta) = std::fs::metadata(&cfg.mqtt.key) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            warnings.push(format!(
                "mqtt.key: {} is readable by group or others (mode {mode:04o}); run chmod 600 on it",
                cfg.mqtt.key.display()
            ));
        }
    }
    // mqtt.ca pins the broker: only those roots.
    let mut mqtt_trust = if cfg.mqtt.ca.is_some() {
        TlsOptions::default()
    } else {
        TlsOptions::platform()
    };
    if let Some(ca) = &cfg.mqtt.ca {
        if let Err(e) = read_certs("mqtt.ca", ca).map(|c| mqtt_trust.extra_roots.extend(c)) {
            errors.push(e);
        }
    }
    let mut tunnel_trust = TlsOptions {
        platform_roots: !cfg.tunnel.ca_only,
        ..TlsOptions::default()
    };
    if cfg.tunnel.ca_only && cfg.tunnel.ca.is_none() {
        errors.push(err(
            "tunnel.ca_only",
            "is true but tunnel.ca is not set: nothing would be trusted",
            "set tunnel.ca to the CA file or directory to pin, or ca_only = false",
        ));
    }
    if let Some(ca) = &cfg.tunnel.ca {
        if let Err(e) = tunnel_trust.add_ca_path(ca) {
            errors.push(err(
                "tunnel.ca",
                e.to_string(),
                "give a PEM file or a directory of PEM files",
            ));
        }
    }
    let mut mqtt_tls = None;
    if let (Some(cert), Some(key)) = (cert, key) {
        match mqtt_client_config(cfg, &mqtt_trust, cert, key) {
            Ok(c) => mqtt_tls = Some(c),
            Err(e) => errors.push(e),
        }
    }
    let tunnel_tls = client_config(&tunnel_trust)
        .map_err(|e| errors.push(err("tunnel.ca", e.to_string(), "")))
        .ok();
    match (errors.is_empty(), mqtt_tls, tunnel_tls) {
        (true, Some(mqtt_tls), Some(tunnel_tls)) => Ok(Checked {
            mqtt_tls,
            tunnel_tls,
            warnings,
            summary: summary(cfg),
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

fn mqtt_client_config(
    cfg: &Config,
    trust: &TlsOptions,
    cert: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let roots = root_store(trust).map_err(|e| match e {
        TlsError::NoRoots => err(
            "mqtt.ca",
            "no trusted CA certificate",
            "set mqtt.ca to AmazonRootCA1.pem",
        ),
        other => err("mqtt.ca", other.to_string(), "give a valid CA certificate"),
    })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err("mqtt", e.to_string(), ""))?
        .with_root_certificates(roots)
        .with_client_auth_cert(cert, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => err(
                "mqtt.key",
                format!(
                    "{} does not belong to the certificate {}",
                    cfg.mqtt.key.display(),
                    cfg.mqtt.cert.display()
                ),
                "use the private key that was created with this certificate",
            ),
            other => err(
                "mqtt.key",
                other.to_string(),
                "give the device's private key in PEM",
            ),
        })?;
    if let Some(p) = &cfg.mqtt.alpn {
        config.alpn_protocols = vec![p.as_bytes().to_vec()];
    }
    Ok(Arc::new(config))
}

/// What `check-config` prints: no secrets (there are none in the file; keys stay on disk).
fn summary(cfg: &Config) -> Vec<(String, String)> {
    let services: Vec<String> = cfg
        .services
        .named()
        .map(|(s, e)| format!("{s} -> {e}"))
        .chain(
            cfg.services
                .unnamed_endpoint()
                .map(|e| format!("(unnamed) -> {e}")),
        )
        .collect();
    let mut tunnel = match &cfg.tunnel.endpoint {
        Some(e) => format!("{e} (override)"),
        None => "data.tunneling.iot.<region>.amazonaws.com:443, region from each notify".into(),
    };
    for (host, (ip, port)) in &cfg.tunnel.resolve {
        let port = port.map(|p| format!(" port {p}")).unwrap_or_default();
        tunnel.push_str(&format!("; {host} at {ip}{port} (tunnel.resolve)"));
    }
    vec![
        ("thing name".into(), cfg.thing_name.clone()),
        (
            "downstream things".into(),
            if cfg.things.is_empty() {
                "none".to_owned()
            } else {
                cfg.things
                    .iter()
                    .map(|(name, t)| {
                        let services: Vec<String> = t
                            .services
                            .named()
                            .map(|(s, e)| format!("{s} -> {e}"))
                            .collect();
                        let cap = t
                            .max_tunnels
                            .map(|n| format!(", at most {n} tunnels"))
                            .unwrap_or_default();
                        format!("{name} ({}{cap})", services.join(", "))
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            },
        ),
        ("notify topic".into(), cfg.notify_topic()),
        (
            "MQTT".into(),
            format!(
                "{}:{} as client {:?}, mutual TLS{}",
                cfg.mqtt.host,
                cfg.mqtt.port,
                cfg.mqtt.client_id,
                cfg.mqtt
                    .alpn
                    .as_deref()
                    .map(|p| format!(", ALPN {p}"))
                    .unwrap_or_default()
            ),
        ),
        ("certificate".into(), cfg.mqtt.cert.display().to_string()),
        (
            "private key".into(),
            format!("{} (matches the certificate)", cfg.mqtt.key.display()),
        ),
        (
            "MQTT CA".into(),
            cfg.mqtt
                .ca
                .as_ref()
                .map_or("platform CA store".into(), |p| {
                    format!("{} only (pinned)", p.display())
                }),
        ),
        ("tunnel endpoint".into(), tunnel),
        (
            "tunnel CA".into(),
            cfg.tunnel
                .ca
                .as_ref()
                .map_or("platform CA store".into(), |p| {
                    if cfg.tunnel.ca_only {
                        format!("{} only (pinned)", p.display())
                    } else {
                        format!("{} + platform CA store", p.display())
                    }
                }),
        ),
        ("services".into(), services.join(", ")),
        (
            "limits".into(),
            format!(
                "{} tunnels, {} connections each, lifetime at most {} min, stall reset after {} ms",
                cfg.limits.max_tunnels,
                cfg.limits.max_connections_per_tunnel,
                cfg.limits.max_lifetime.as_secs_f64() / 60.0,
                cfg.tunnel.stall_timeout.as_millis()
            ),
        ),
        ("resources".into(), {
            let (fds, memory) = resource_needs(&cfg.limits);
            format!(
                "{} KiB buffered at most; up to {fds} descriptors (unit: {UNIT_LIMIT_NOFILE}), {} MiB (unit: {} MiB)",
                cfg.limits.max_buffered / 1024,
                memory >> 20,
                UNIT_MEMORY_MAX >> 20
            )
        }),
        (
            "dead links".into(),
            if cfg.tunnel.idle_timeout.is_zero() {
                "TCP keepalive only (tunnel.idle_timeout_secs = 0)".to_owned()
            } else {
                format!(
                    "websocket dropped after {} s without a byte; TCP keepalive",
                    cfg.tunnel.idle_timeout.as_secs()
                )
            },
        ),
        (
            "restarts".into(),
            if cfg.tunnel.persist_sessions {
                format!(
                    "live sessions persisted in {}/sessions and rejoined",
                    cfg.state_dir.display()
                )
            } else {
                "sessions are not persisted (tunnel.persist_sessions = false)".to_owned()
            },
        ),
        (
            "rotation".into(),
            format!("{:?}", cfg.rotation).to_lowercase(),
        ),
        ("state dir".into(), cfg.state_dir.display().to_string()),
        (
            "upgrades".into(),
            format!(
                "a new binary is checked, then executed once no local connection is open, or after {} min (upgrade_deadline_minutes)",
                cfg.upgrade_deadline.as_secs() / 60
            ),
        ),
        (
            "live status".into(),
            format!(
                "{} (securetunnel-agent status)",
                cfg.runtime_dir.join(crate::status::SOCKET_NAME).display()
            ),
        ),
        (
            "proxy".into(),
            match &cfg.proxy {
                None => "none (direct connections)".to_owned(),
                Some(p) => {
                    let mut via = format!("{} for MQTT and the data plane (CONNECT)", p.proxy);
                    if !p.no_proxy.is_empty() {
                        via.push_str(&format!("; direct for {}", p.no_proxy.join(", ")));
                    }
                    via
                }
            },
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
        thing_name = "gw-1"
        [mqtt]
        endpoint = "a1b2c3-ats.iot.eu-west-1.amazonaws.com"
        cert = "/etc/x/cert.pem"
        key = "/etc/x/key.pem"
        [services]
        SSH = 22
    "#;

    fn parse_str(s: &str) -> Result<Config, ConfigErrors> {
        parse(s, Path::new("agent.toml"))
    }

    #[test]
    fn downstream_things_are_validated_by_key() {
        let c = parse_str(&format!(
            "{MIN}\n[things.PLC-42]\nmax_tunnels = 2\n[things.PLC-42.services]\nHTTP = \"10.0.0.42:80\"\n[things.cam-7.services]\nRTSP = \"10.0.0.57:554\"\n"
        ))
        .unwrap();
        assert_eq!(c.things.len(), 2);
        assert_eq!(c.things["PLC-42"].max_tunnels, Some(2));
        assert!(c.things["cam-7"].services.named().any(|(s, _)| s == "RTSP"));
        for (bad, key) in [
            ("[things.gw-1.services]\nSSH = 22", "things.\"gw-1\""),
            (
                "[things.\"bad name\".services]\nSSH = 22",
                "things.\"bad name\"",
            ),
            (
                "[things.PLC-1]\nmax_tunnels = 0\n[things.PLC-1.services]\nSSH = 22",
                "things.\"PLC-1\".max_tunnels",
            ),
            ("[things.PLC-1.services]", "things.\"PLC-1\".services"),
        ] {
            let e = parse_str(&format!("{MIN}\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let many: String = (0..50)
            .map(|i| format!("[things.t{i}.services]\nSSH = 22\n"))
            .collect();
        let e = parse_str(&format!("{MIN}\n{many}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("50 subscriptions per MQTT connection"), "{e}");
        let ok: String = (0..49)
            .map(|i| format!("[things.t{i}.services]\nSSH = 22\n"))
            .collect();
        assert_eq!(parse_str(&format!("{MIN}\n{ok}")).unwrap().things.len(), 49);
    }

    #[test]
    fn a_proxy_url_is_refused_by_key_without_quoting_its_password() {
        let with = |proxy: &str| format!("{MIN}\n[proxy]\n{proxy}\n");
        let c = parse_str(&with(
            r#"url = "http://op:pw-1@proxy:3128"
            no_proxy = ["localhost"]"#,
        ))
        .unwrap();
        let p = c.proxy.unwrap();
        assert_eq!(p.proxy.to_string(), "http://op@proxy:3128");
        assert_eq!(p.no_proxy, vec!["localhost".to_owned()]);
        for (bad, why) in [
            (r#"url = "https://op:pw-1@proxy:3128""#, "https:// proxies"),
            (r#"url = "http://op:pw-1@proxy:0""#, "port"),
            (r#"no_proxy = ["x"]"#, "is missing"),
            (r#"url = "http://op:pw-1""#, "port"),
        ] {
            let e = parse_str(&with(bad)).unwrap_err().to_string();
            assert!(e.contains("proxy.url") && e.contains(why), "{e}");
            assert!(!e.contains("pw-1"), "{e}");
        }
        assert!(parse_str(MIN).unwrap().proxy.is_none());
    }

    #[test]
    fn defaults_are_named_and_applied() {
        let c = parse_str(MIN).unwrap();
        assert_eq!(c.tunnel.stall_timeout, Duration::from_secs(5));
        assert_eq!(c.mqtt.port, 8883);
        assert_eq!(c.mqtt.client_id, "gw-1");
        assert_eq!(c.limits.max_tunnels, 10);
        assert_eq!(c.limits.max_lifetime, Duration::from_secs(720 * 60));
        assert_eq!(c.rotation, RotationPolicy::Replace);
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(c.notify_topic(), "$aws/things/gw-1/tunnels/notify");
    }

    #[test]
    fn tunnel_resolve_replaces_dns_for_a_data_plane_host_and_keeps_its_port() {
        let c = parse_str(&format!(
            "{MIN}\n[tunnel]\nresolve = {{ \"Data.Tunneling.IoT.us-east-1.amazonaws.com\" = \"10.0.0.5\", \"other\" = \"[fd00::5]:8443\" }}\n"
        ))
        .unwrap();
        let ep = DataEndpoint::for_region("us-east-1");
        assert_eq!(
            resolve_override(&c.tunnel.resolve, &ep),
            Some("10.0.0.5:443".parse().unwrap())
        );
        let other = DataEndpoint::parse_override("other:9000").unwrap();
        assert_eq!(
            resolve_override(&c.tunnel.resolve, &other),
            Some("[fd00::5]:8443".parse().unwrap())
        );
        assert_eq!(
            resolve_override(&c.tunnel.resolve, &DataEndpoint::for_region("eu-west-1")),
            None
        );
        let e = parse_str(&format!(
            "{MIN}\n[tunnel]\nresolve = {{ \"h\" = \"not-an-ip\" }}\n"
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "tunnel.resolve.\"h\"");
    }

    #[test]
    fn port_443_offers_the_amazon_mqtt_alpn_unless_configured() {
        assert_eq!(mqtt_alpn(443, None).as_deref(), Some("x-amzn-mqtt-ca"));
        assert_eq!(mqtt_alpn(8883, None), None);
        assert_eq!(mqtt_alpn(443, Some("mqtt")).as_deref(), Some("mqtt"));
        assert_eq!(mqtt_alpn(443, Some("")), None);
        assert_eq!(mqtt_alpn(8883, Some("x")).as_deref(), Some("x"));
        let c = parse_str(&MIN.replace("[services]", "port = 443\n[services]")).unwrap();
        assert_eq!(c.mqtt.alpn.as_deref(), Some("x-amzn-mqtt-ca"));
    }

    #[test]
    fn notify_topic_can_be_remapped_but_not_to_a_wildcard() {
        let c = parse_str(&MIN.replace(
            "[services]",
            "notify_topic = \"local/gw-1/notify\"\n[services]",
        ))
        .unwrap();
        assert_eq!(c.notify_topic(), "local/gw-1/notify");
        let e = parse_str(&MIN.replace(
            "[services]",
            "notify_topic = \"local/+/notify\"\n[services]",
        ))
        .unwrap_err();
        assert_eq!(e.0[0].key, "mqtt.notify_topic");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name_and_line() {
        let e = parse_str(&format!("{MIN}\n[limits]\nmax_tunels = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_tunels") && e.contains("line"), "{e}");
    }

    #[test]
    fn each_invalid_value_names_key_problem_and_fix() {
        let bad = MIN.replace("gw-1", "gw 1").replace(
            "a1b2c3-ats.iot.eu-west-1.amazonaws.com",
            "mqtts://host:8883",
        ) + "[limits]\nmax_lifetime_minutes = 721\nmax_tunnels = 0\n";
        let e = parse_str(&bad).unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "thing_name",
                "mqtt.endpoint",
                "limits.max_tunnels",
                "limits.max_lifetime_minutes"
            ]
        );
        assert!(e.0.iter().all(|e| !e.fix.is_empty()));
    }

    #[test]
    fn a_bad_service_mapping_names_the_service() {
        let e = parse_str(&MIN.replace("SSH = 22", "SSH = 70000"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("SSH") && e.contains("70000"), "{e}");
    }

    #[test]
    fn rotation_policy_parallel_is_opt_in() {
        let c = parse_str(&format!("{MIN}\n[rotation]\npolicy = \"parallel\"\n")).unwrap();
        assert_eq!(c.rotation, RotationPolicy::Parallel);
        assert!(parse_str(&format!("{MIN}\n[rotation]\npolicy = \"both\"\n")).is_err());
    }

    /// Every example file in config/ parses, so the documentation cannot drift from the code.
    #[test]
    fn every_example_in_config_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            match path.file_name().and_then(|n| n.to_str()) {
                Some("services.toml") => {
                    let map = ServiceMap::from_toml_str(&text)
                        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_eq!(map.named().count(), 5);
                }
                Some("agent.toml") => {
                    // As shipped the thing name is commented out (the service stays idle);
                    // an operator uncomments it.
                    let err = parse(&text, &path).unwrap_err().to_string();
                    assert!(err.contains("thing_name"), "{err}");
                    let text = text.replace("# thing_name =", "thing_name =");
                    let cfg =
                        parse(&text, &path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                    assert_eq!(cfg.thing_name, "gateway-01");
                    assert_eq!(cfg.mqtt.port, 8883);
                }
                other => panic!("no check for config/{other:?}: add one"),
            }
            checked += 1;
        }
        assert_eq!(checked, 2, "an example in config/ is missing");
    }

    #[test]
    fn limits_that_would_not_fit_the_units_ceilings_are_refused() {
        let l = AgentLimits {
            max_tunnels: 10,
            max_connections_per_tunnel: 128,
            max_lifetime: Duration::ZERO,
            max_buffered: 8 << 20,
        };
        let (fds, memory) = resource_needs(&l);
        assert!(
            fds <= UNIT_LIMIT_NOFILE && memory <= UNIT_MEMORY_MAX,
            "defaults fit"
        );
        let e = parse_str(&format!(
            "{MIN}\n[limits]\nmax_tunnels = 100\nmax_connections_per_tunnel = 1024\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("LimitNOFILE") && e.contains("MemoryMax"), "{e}");
        assert!(
            e.contains("limits.max_tunnels x limits.max_connections_per_tunnel"),
            "{e}"
        );
    }

    #[test]
    fn the_units_ceilings_are_the_ones_checked() {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("packaging/systemd/securetunnel-agent.service"),
        )
        .unwrap();
        assert!(
            unit.contains(&format!("\nLimitNOFILE={UNIT_LIMIT_NOFILE}\n")),
            "{unit}"
        );
        assert!(
            unit.contains(&format!("\nMemoryMax={}M\n", UNIT_MEMORY_MAX >> 20)),
            "{unit}"
        );
    }
}
