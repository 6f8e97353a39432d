//! The audit trail of remote access: one structured event per tunnel step and per local
//! connection, to the journal (tracing target `audit`), a JSON Lines file in the state
//! directory with bounded rotation (`file.rs`), and optionally an MQTT topic (the MQTT
//! client's `audit_out`). Tunnels are named by their token's hash and the service's channel
//! id; an event never holds a token.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::mpsc;

mod file;

#[cfg(test)]
use file::must_rotate;
pub use file::{FileSink, MAX_FILES};

/// The tracing target of the journal's events.
pub const TARGET: &str = "audit";
/// Events waiting for the file's thread; more are dropped and counted.
pub const FILE_QUEUE: usize = 256;
/// Events waiting for the MQTT client; more are dropped and counted.
pub const MQTT_QUEUE: usize = 256;
/// Events published per second at most.
pub const MQTT_RATE: u32 = 10;
/// A reason is cut to this many characters.
pub const MAX_REASON_CHARS: usize = 160;
/// The default size of one file, and how many files the trail keeps (the current one and
/// the rotated ones).
pub const DEFAULT_FILE_KIB: u64 = 1024;
pub const DEFAULT_FILES: u32 = 2;

/// `[audit]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The JSON Lines file's bound; `None`: no file.
    pub file: Option<FileBound>,
    /// Events are also published here (QoS 1).
    pub mqtt_topic: Option<String>,
}

/// The file is rotated before it would pass `size` bytes; `files` files are kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileBound {
    pub size: u64,
    pub files: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            file: Some(FileBound {
                size: DEFAULT_FILE_KIB * 1024,
                files: DEFAULT_FILES,
            }),
            mqtt_topic: None,
        }
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    NotifyAccepted,
    NotifyRefused,
    Rotated,
    Connected,
    Reconnected,
    Closed,
    Expired,
    ConnectionOpened,
    ConnectionFailed,
    ConnectionClosed,
    StreamRefused,
    ConsentGranted,
    ConsentWithdrawn,
}

/// How a local connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    /// The remote client closed it (a reset from the tunnel's source).
    ClientClosed,
    /// The local service closed it.
    ServiceClosed,
    /// Reset: a local error, the service's session reset, a protocol violation, a newer
    /// stream.
    Reset,
    /// Reset because the local service stopped reading (`tunnel.stall_timeout_ms`).
    Stall,
    /// Closed when site consent was withdrawn.
    Consent,
    /// The tunnel's websocket ended with it.
    TunnelEnded,
}

impl End {
    const ALL: [End; 6] = [
        End::ClientClosed,
        End::ServiceClosed,
        End::Reset,
        End::Stall,
        End::Consent,
        End::TunnelEnded,
    ];

    fn as_str(self) -> &'static str {
        match self {
            End::ClientClosed => "client_closed",
            End::ServiceClosed => "service_closed",
            End::Reset => "reset",
            End::Stall => "stall",
            End::Consent => "consent",
            End::TunnelEnded => "tunnel_ended",
        }
    }
}

impl Kind {
    #[cfg(test)]
    const ALL: [Kind; 13] = [
        Kind::NotifyAccepted,
        Kind::NotifyRefused,
        Kind::Rotated,
        Kind::Connected,
        Kind::Reconnected,
        Kind::Closed,
        Kind::Expired,
        Kind::ConnectionOpened,
        Kind::ConnectionFailed,
        Kind::ConnectionClosed,
        Kind::StreamRefused,
        Kind::ConsentGranted,
        Kind::ConsentWithdrawn,
    ];

    /// The name the journal shows; the same as the JSON's (a unit test holds them equal).
    pub fn as_str(self) -> &'static str {
        KIND_NAMES[self as usize]
    }
}

const KIND_NAMES: [&str; 13] = [
    "notify_accepted",
    "notify_refused",
    "rotated",
    "connected",
    "reconnected",
    "closed",
    "expired",
    "connection_opened",
    "connection_failed",
    "connection_closed",
    "stream_refused",
    "consent_granted",
    "consent_withdrawn",
];

/// One event; absent fields are left out.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub event: Kind,
    pub thing: String,
    /// The token's hash, `token:<8 hex>`, as the agent's log and status show it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<String>,
    /// The service's `channel-id` of the websocket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub services: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_from_tunnel: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_to_tunnel: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended: Option<End>,
    /// Local connections a tunnel had, when it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<u64>,
    /// Streams and connections refused over the tunnel's life, when it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<u64>,
    /// Like events left out before this one (a flood the peer provoked), when any were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
    /// The token a rotation replaces (its hash).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    /// Why, for refusals and ends; at most `MAX_REASON_CHARS`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Event {
    /// An event of `kind` about `thing`, now.
    pub fn new(kind: Kind, thing: &str) -> Event {
        Event {
            time: crate::dates::rfc3339(std::time::SystemTime::now()),
            event: kind,
            thing: thing.to_owned(),
            tunnel: None,
            channel: None,
            region: None,
            services: None,
            service: None,
            endpoint: None,
            stream: None,
            connection: None,
            bytes_from_tunnel: None,
            bytes_to_tunnel: None,
            duration_ms: None,
            ended: None,
            connections: None,
            refused: None,
            suppressed: None,
            replaces: None,
            reason: None,
        }
    }

    /// With `reason`, cut to `MAX_REASON_CHARS`.
    pub fn because(mut self, reason: &str) -> Event {
        self.reason = Some(reason.chars().take(MAX_REASON_CHARS).collect());
        self
    }
}

/// The journal's line: the event's fields as tracing fields.
fn journal(e: &Event) {
    let services = e.services.as_ref().map(|s| s.join(","));
    tracing::info!(
        target: TARGET,
        event = e.event.as_str(),
        thing = %e.thing,
        tunnel = e.tunnel.as_deref(),
        channel = e.channel.as_deref(),
        region = e.region.as_deref(),
        services = services.as_deref(),
        service = e.service.as_deref(),
        endpoint = e.endpoint.as_deref(),
        stream = e.stream,
        connection = e.connection,
        bytes_from_tunnel = e.bytes_from_tunnel,
        bytes_to_tunnel = e.bytes_to_tunnel,
        duration_ms = e.duration_ms,
        ended = e.ended.map(End::as_str),
        connections = e.connections,
        refused = e.refused,
        suppressed = e.suppressed,
        replaces = e.replaces.as_deref(),
        reason = e.reason.as_deref(),
        "audit: {}",
        e.event.as_str()
    );
}

struct Sinks {
    file: Option<FileSink>,
    mqtt: Option<mpsc::Sender<String>>,
    dropped_file: Arc<AtomicU64>,
    dropped_mqtt: AtomicU64,
}

/// Where events go; cheap to clone. The default records nothing (`local-proxy`).
#[derive(Clone, Default)]
pub struct Trail(Option<Arc<Sinks>>);

impl Trail {
    /// The journal, plus the file (when `file` runs) and the MQTT queue (when given).
    pub fn new(file: Option<FileSink>, mqtt: Option<mpsc::Sender<String>>) -> Trail {
        let dropped_file = file
            .as_ref()
            .map_or_else(Default::default, FileSink::dropped);
        Trail(Some(Arc::new(Sinks {
            file,
            mqtt,
            dropped_file,
            dropped_mqtt: AtomicU64::new(0),
        })))
    }

    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Records `e` in every sink; a full queue drops it there and counts it. Never waits.
    pub fn record(&self, e: &Event) {
        let Some(s) = &self.0 else { return };
        journal(e);
        if s.file.is_none() && s.mqtt.is_none() {
            return;
        }
        let Ok(line) = serde_json::to_string(e) else {
            return;
        };
        if let Some(mqtt) = &s.mqtt
            && mqtt.try_send(line.clone()).is_err()
        {
            s.dropped_mqtt.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(file) = &s.file {
            file.append(line);
        }
    }

    /// Events dropped so far: (file, MQTT).
    pub fn dropped(&self) -> (u64, u64) {
        self.0.as_ref().map_or((0, 0), |s| {
            (
                s.dropped_file.load(Ordering::Relaxed),
                s.dropped_mqtt.load(Ordering::Relaxed),
            )
        })
    }

    /// Waits (at most `limit`) until the file holds every event recorded so far.
    pub async fn flush(&self, limit: std::time::Duration) {
        if let Some(file) = self.0.as_ref().and_then(|s| s.file.as_ref()) {
            let _ = tokio::time::timeout(limit, file.flush()).await;
        }
    }

    /// The trail of one tunnel: its thing and token hash on every event.
    pub fn tunnel(&self, thing: &str, tunnel: String) -> TunnelTrail {
        TunnelTrail {
            trail: self.clone(),
            thing: Arc::from(thing),
            tunnel: Arc::from(tunnel),
            channel: None,
        }
    }
}

/// A tunnel's trail: thing, token hash and (per websocket) channel id filled in.
#[derive(Clone, Default)]
pub struct TunnelTrail {
    trail: Trail,
    thing: Arc<str>,
    tunnel: Arc<str>,
    channel: Option<Arc<str>>,
}

impl TunnelTrail {
    /// The same for the websocket whose channel id is `channel`.
    pub fn with_channel(&self, channel: Option<&str>) -> TunnelTrail {
        TunnelTrail {
            channel: channel.map(Arc::from),
            ..self.clone()
        }
    }

    pub fn is_on(&self) -> bool {
        self.trail.is_on()
    }

    /// The token's hash this trail names.
    pub fn tunnel(&self) -> &str {
        &self.tunnel
    }

    /// An event of `kind` about this tunnel.
    pub fn event(&self, kind: Kind) -> Event {
        Event {
            tunnel: Some(self.tunnel.to_string()),
            channel: self.channel.as_deref().map(str::to_owned),
            ..Event::new(kind, &self.thing)
        }
    }

    pub fn record(&self, e: &Event) {
        self.trail.record(e);
    }
}

/// A connection's end as its task and the session share it: set by whoever closes it,
/// read when the connection's closing event is written.
#[derive(Debug, Default)]
pub struct EndCell(std::sync::atomic::AtomicU8);

impl EndCell {
    /// `why` unless an end was set before (the first cause wins).
    pub fn set(&self, why: End) {
        let _ = self
            .0
            .compare_exchange(0, why as u8 + 1, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The end set, or `otherwise`.
    pub fn get_or(&self, otherwise: End) -> End {
        match self.0.load(Ordering::Relaxed) {
            0 => otherwise,
            n => End::ALL.get(n as usize - 1).copied().unwrap_or(otherwise),
        }
    }
}

/// Rule (audit topic): a topic AWS IoT accepts for a publish: 1-256 bytes, no wildcard or
/// NUL, at most 7 slashes, and no reserved `$` topic except Basic Ingest's
/// `$aws/rules/<rule>/...` (whose prefix does not count).
pub fn topic_problem(topic: &str) -> Option<&'static str> {
    let rest = topic
        .strip_prefix("$aws/rules/")
        .and_then(|r| r.split_once('/').map(|(_, rest)| rest));
    if topic.is_empty() || topic.len() > 256 {
        Some("a topic has 1 to 256 bytes")
    } else if topic.contains(['+', '#', '\0']) {
        Some("a topic to publish to has no wildcard (+, #)")
    } else if topic.starts_with('$') && rest.is_none() {
        Some(
            "topics starting with $ are reserved; use your own, or Basic Ingest's $aws/rules/<rule>/<topic>",
        )
    } else if rest.unwrap_or(topic).matches('/').count() > 7 {
        Some("AWS IoT takes at most 7 slashes in a topic")
    } else {
        None
    }
}

/// Rule (policy hint): the statement that lets the gateway publish its audit events.
pub fn policy_statement(topic: &str) -> String {
    let resource = match topic.strip_prefix("$aws/rules/") {
        Some(rest) => format!("topic/$aws/rules/{rest}"),
        None => format!("topic/{topic}"),
    };
    format!(
        r#"{{"Effect":"Allow","Action":"iot:Publish","Resource":"arn:aws:iot:REGION:ACCOUNT:{resource}"}}"#
    )
}

#[cfg(test)]
mod tests;
