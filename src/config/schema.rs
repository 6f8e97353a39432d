//! The file as written: every key, its default, unknown keys refused (`serde`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{DEFAULT_STATE_DIR, MAX_LIFETIME_MINUTES, RotationPolicy};
use crate::services::ServiceMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) thing_name: String,
    pub(super) mqtt: RawMqtt,
    #[serde(default)]
    pub(super) tunnel: RawTunnel,
    #[serde(default)]
    pub(super) services: ServiceMap,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) rotation: RawRotation,
    #[serde(default = "default_state_dir")]
    pub(super) state_dir: PathBuf,
    pub(super) runtime_dir: Option<PathBuf>,
    /// An upgrade waits for open local connections at most this long.
    #[serde(default = "default_upgrade_deadline")]
    pub(super) upgrade_deadline_minutes: f64,
    pub(super) proxy: Option<RawProxy>,
    #[serde(default)]
    pub(super) shadow: RawShadow,
    #[serde(default)]
    pub(super) consent: RawConsent,
    #[serde(default)]
    pub(super) audit: RawAudit,
    /// Downstream things the gateway serves tunnels for: `[things.<name>.services]`.
    #[serde(default)]
    pub(super) things: BTreeMap<String, RawThing>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThing {
    #[serde(default)]
    pub(super) services: ServiceMap,
    pub(super) max_tunnels: Option<usize>,
}

/// `[shadow]`: off unless asked for (AWS IoT closes the connection of a client that
/// publishes where its policy does not allow).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShadow {
    #[serde(default)]
    pub(super) enabled: bool,
}

/// `[consent]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsent {
    #[serde(default)]
    pub(super) mode: Option<String>,
    pub(super) path: Option<PathBuf>,
    pub(super) services: Option<Vec<String>>,
}

/// `[audit]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAudit {
    pub(super) file: Option<bool>,
    pub(super) file_size_kib: Option<u64>,
    pub(super) files: Option<u32>,
    pub(super) mqtt_topic: Option<String>,
}

/// `[proxy]`: the URL may carry a password, so it is read as a secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) url: Option<crate::secret::Secret>,
    #[serde(default)]
    pub(super) no_proxy: Vec<String>,
}

fn default_upgrade_deadline() -> f64 {
    24.0 * 60.0
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMqtt {
    pub(super) endpoint: String,
    #[serde(default = "default_mqtt_port")]
    pub(super) port: u16,
    pub(super) client_id: Option<String>,
    /// Optional only with a token key, whose token may hold the certificate.
    pub(super) cert: Option<PathBuf>,
    /// A PEM file's path, or a `pkcs11:` URI.
    pub(super) key: String,
    pub(super) pkcs11_module: Option<PathBuf>,
    pub(super) pkcs11_pin_file: Option<PathBuf>,
    pub(super) ca: Option<PathBuf>,
    #[serde(default = "default_keep_alive")]
    pub(super) keep_alive_secs: u64,
    pub(super) notify_topic: Option<String>,
    #[serde(default = "default_spread")]
    pub(super) reconnect_spread_secs: u64,
    pub(super) alpn: Option<String>,
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
pub(super) struct RawTunnel {
    pub(super) endpoint: Option<String>,
    #[serde(default)]
    pub(super) resolve: BTreeMap<String, String>,
    pub(super) ca: Option<PathBuf>,
    #[serde(default)]
    pub(super) ca_only: bool,
    #[serde(default = "default_stall_ms")]
    pub(super) stall_timeout_ms: u64,
    #[serde(default = "default_idle_secs")]
    pub(super) idle_timeout_secs: u64,
    #[serde(default = "default_true")]
    pub(super) persist_sessions: bool,
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
pub(super) struct RawLimits {
    #[serde(default = "default_max_tunnels")]
    pub(super) max_tunnels: usize,
    #[serde(default = "default_max_connections")]
    pub(super) max_connections_per_tunnel: usize,
    #[serde(default = "default_max_lifetime")]
    pub(super) max_lifetime_minutes: f64,
    #[serde(default = "default_buffered_kib")]
    pub(super) max_buffered_kib: usize,
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
pub(super) struct RawRotation {
    #[serde(default)]
    pub(super) policy: RotationPolicy,
}
