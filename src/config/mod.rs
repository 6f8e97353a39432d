//! The agent's configuration file (`/etc/securetunnel-agent/agent.toml`): parsed strictly
//! (unknown keys are errors), validated into a `Config` with nothing left optional that must
//! be set later, and checked against the files it names (`check-config`).

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::bridge::DataEndpoint;
use crate::services::ServiceMap;

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

/// A downstream thing: its own service map (an allow-list of its endpoints) and cap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThingConfig {
    pub services: ServiceMap,
    /// At most this many of the agent's tunnels for this thing (`None`: only the agent's).
    pub max_tunnels: Option<usize>,
}

/// AWS IoT's subscriptions per connection; the gateway's own notify topic takes one.
pub const MAX_DOWNSTREAM_THINGS: usize = 49;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// `None` only with a token key: the token holds the certificate.
    pub cert: Option<PathBuf>,
    pub key: DeviceKey,
    pub ca: Option<PathBuf>,
    pub keep_alive: Duration,
    /// Set when a local bridge remaps `$aws/things/<thing>/tunnels/notify`.
    pub notify_topic: Option<String>,
    /// The first reconnect after losing an established connection is spread over this.
    pub reconnect_spread: Duration,
    /// ALPN protocol offered in the TLS handshake (`mqtt_alpn`).
    pub alpn: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentLimits {
    pub max_tunnels: usize,
    pub max_connections_per_tunnel: usize,
    pub max_lifetime: Duration,
    /// Bytes all tunnels together hold toward local sockets.
    pub max_buffered: usize,
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
    /// `[shadow] enabled`: the tunnels' state in the thing's named shadow `securetunnel`.
    pub shadow: bool,
    /// `[consent] mode = "file"`: tunnels only while its file exists; `None`: always.
    pub consent: Option<crate::consent::Settings>,
    /// `[audit]`: the trail's file and MQTT topic.
    pub audit: crate::audit::Settings,
}

impl Config {
    pub fn notify_topic(&self) -> String {
        self.mqtt
            .notify_topic
            .clone()
            .unwrap_or_else(|| crate::protocol::notify::notify_topic(&self.thing_name))
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
    let raw: schema::RawConfig = toml::from_str(text).map_err(|e| {
        let key = path.display().to_string();
        ConfigErrors(vec![err(
            &key,
            e.message().to_owned() + &location(text, e.span()),
            "",
        )])
    })?;
    validate::validate(raw, path)
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

/// The live status socket's name in the runtime directory.
pub const SOCKET_NAME: &str = "status.sock";

/// The default runtime directory on this machine.
pub fn runtime_dir_here() -> PathBuf {
    default_runtime_dir(Path::new("/run").is_dir())
}

/// Rule (runtime directory): systemd's `RuntimeDirectory=` under /run; /var/run where there
/// is no /run (OpenWrt).
pub fn default_runtime_dir(run_exists: bool) -> PathBuf {
    if run_exists {
        PathBuf::from("/run/securetunnel-agent")
    } else {
        PathBuf::from("/var/run/securetunnel-agent")
    }
}

mod accountability;
mod device_key;
mod files;
mod resources;
mod schema;
mod validate;

pub use device_key::DeviceKey;
pub use files::{Checked, Identity, check_files};
pub use resources::{UNIT_LIMIT_NOFILE, UNIT_MEMORY_MAX, resource_needs};

#[cfg(test)]
mod tests;
