//! What the agent is doing, for operators and supervisors: a JSON snapshot written
//! atomically to `<state_dir>/status.json` whenever the tunnel table changes, and the same
//! snapshot live on a Unix socket in the runtime directory (`securetunnel-agent status`).
//! Tokens appear only as `token:<hash>`.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::bridge::{Phase, State, Stats};
use crate::tunnels::Entry;

/// One tunnel, as status.json and `status` show it.
#[derive(Debug, Serialize, Deserialize)]
pub struct TunnelStatus {
    pub id: u64,
    /// The thing the tunnel is for: the gateway's own or a downstream one.
    pub thing: String,
    pub region: String,
    pub services: Vec<String>,
    pub token: String,
    pub rotations: u32,
    pub age_secs: u64,
    /// The agent's own end for this token; `None` until its first connect.
    pub expires_in_secs: Option<u64>,
    /// connecting, connected, reconnecting, draining or ended.
    pub phase: String,
    /// While waiting to reconnect: when the next attempt starts.
    pub next_attempt_in_secs: Option<u64>,
    /// Unix time the current websocket came up.
    pub connected_since: Option<u64>,
    pub channel_id: Option<String>,
    /// Open local connections per service (services with none are absent).
    pub open_connections: BTreeMap<String, usize>,
    /// DATA payload bytes received from the tunnel for local connections.
    pub bytes_from_tunnel: u64,
    /// DATA payload bytes read from local connections and sent into the tunnel.
    pub bytes_to_tunnel: u64,
    /// Websocket sessions after the first.
    pub reconnects: u64,
    pub last_error: Option<String>,
}

/// The whole agent.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    /// connecting, connected or subscribed.
    pub mqtt: String,
    /// Unix time the MQTT state began.
    pub mqtt_since: u64,
    pub mqtt_last_error: Option<String>,
    /// The downstream things followed, and whether the broker refused each one's topic.
    #[serde(default)]
    pub things: Vec<ThingStatus>,
    pub tunnels: Vec<TunnelStatus>,
    /// Unix time since which a checked upgrade waits for local connections to end.
    #[serde(default)]
    pub upgrade_pending_since: Option<u64>,
    /// The last upgrade this process rolled back: the file's SHA-256 and why.
    #[serde(default)]
    pub upgrade_rolled_back: Option<RolledBack>,
    /// Site consent: "always", "granted" or "withheld" (with the services it covers).
    #[serde(default)]
    pub consent: String,
    /// Audit events dropped since the start: the file's queue was full or a write failed;
    /// the MQTT queue was full (the broker unreachable for long) or the topic refused.
    #[serde(default)]
    pub audit_dropped: AuditDropped,
}

/// Audit events dropped, per sink.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditDropped {
    pub file: u64,
    pub mqtt: u64,
}

/// An upgrade that failed its trial run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolledBack {
    pub sha256: String,
    pub why: String,
}

/// A downstream thing as the MQTT side sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ThingStatus {
    pub name: String,
    /// The broker refused the subscription to its notify topic.
    pub refused: bool,
}

/// Rule (status phase): a bridge that is connecting after it had a session is reconnecting;
/// connected covers the websocket up, with or without the service's SERVICE_IDS yet.
pub fn phase_name(phase: Phase, sessions: u64) -> &'static str {
    match phase {
        Phase::AwaitingConsent => "awaiting consent",
        Phase::Connecting if sessions > 0 => "reconnecting",
        Phase::Connecting => "connecting",
        Phase::Connected | Phase::Ready => "connected",
        Phase::Draining => "draining",
        Phase::Ended => "ended",
    }
}

/// Rule (connected since): shown only while the websocket is up; between attempts the last
/// session's start is history, not a connection.
pub fn connected_since(phase: Phase, since: Option<SystemTime>) -> Option<u64> {
    match phase {
        Phase::Connected | Phase::Ready => since.map(unix),
        // Draining: the websocket session has ended; its local connections flush.
        Phase::AwaitingConsent | Phase::Connecting | Phase::Draining | Phase::Ended => None,
    }
}

pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TunnelStatus {
    /// A table entry with its bridge's state and counters (`None`: no bridge runs).
    pub fn of(e: &Entry, bridge: Option<(&State, &Stats)>, now: Instant) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let (phase, next, since, channel, open, from, to, reconnects, error) = match bridge {
            Some((st, stats)) => (
                phase_name(st.phase, st.sessions),
                st.retry_at
                    .map(|t| t.saturating_duration_since(now).as_secs()),
                connected_since(st.phase, st.connected_since),
                st.channel_id.clone(),
                stats.open_by_service(),
                stats.bytes_from_tunnel.load(Relaxed),
                stats.bytes_to_tunnel.load(Relaxed),
                st.sessions.saturating_sub(1),
                st.last_error.clone(),
            ),
            None => ("ended", None, None, None, BTreeMap::new(), 0, 0, 0, None),
        };
        TunnelStatus {
            id: e.id,
            thing: e.key.thing.clone(),
            region: e.key.region.clone(),
            services: e.key.services.clone(),
            token: e.token.to_string(),
            rotations: e.rotations,
            age_secs: now.saturating_duration_since(e.created).as_secs(),
            expires_in_secs: e
                .deadline
                .map(|d| d.saturating_duration_since(now).as_secs()),
            phase: phase.to_owned(),
            next_attempt_in_secs: next,
            connected_since: since,
            channel_id: channel,
            open_connections: open,
            bytes_from_tunnel: from,
            bytes_to_tunnel: to,
            reconnects,
            last_error: error,
        }
    }
}

impl Snapshot {
    pub fn new(
        mqtt: &crate::mqtt::MqttState,
        things: &[String],
        tunnels: Vec<TunnelStatus>,
    ) -> Self {
        Snapshot {
            mqtt: format!("{:?}", mqtt.phase).to_lowercase(),
            mqtt_since: unix(mqtt.since),
            mqtt_last_error: mqtt.last_error.clone(),
            things: things
                .iter()
                .map(|name| ThingStatus {
                    refused: mqtt.refused_things.contains(name),
                    name: name.clone(),
                })
                .collect(),
            tunnels,
            upgrade_pending_since: None,
            upgrade_rolled_back: crate::upgrade_trial::rolled_back()
                .map(|(sha256, why)| RolledBack { sha256, why }),
            consent: "always".to_owned(),
            audit_dropped: AuditDropped::default(),
        }
    }

    /// For people: one block per tunnel.
    pub fn render(&self, now_unix: u64) -> String {
        let ago = |t: u64| human(now_unix.saturating_sub(t));
        let mut out = format!("MQTT: {} for {}", self.mqtt, ago(self.mqtt_since));
        if let (Some(e), false) = (&self.mqtt_last_error, self.mqtt == "subscribed") {
            out.push_str(&format!(" (last error: {e})"));
        }
        out.push('\n');
        if !self.consent.is_empty() && self.consent != "always" {
            out.push_str(&format!("Site consent: {}\n", self.consent));
        }
        let AuditDropped { file, mqtt } = self.audit_dropped;
        if file + mqtt > 0 {
            out.push_str(&format!(
                "Audit events dropped: {file} from the file, {mqtt} from the MQTT topic\n"
            ));
        }
        if let Some(r) = &self.upgrade_rolled_back {
            out.push_str(&format!(
                "Upgrade rolled back: the new binary (sha256 {}) failed its trial run: {}; the running version goes on\n",
                r.sha256, r.why
            ));
        }
        if let Some(since) = self.upgrade_pending_since {
            out.push_str(&format!(
                "Upgrade pending since {} ago: the new binary runs once no local connection is open, or at upgrade_deadline_minutes\n",
                ago(since)
            ));
        }
        if !self.things.is_empty() {
            let things: Vec<String> = self
                .things
                .iter()
                .map(|t| {
                    let refused = if t.refused {
                        " (subscription refused)"
                    } else {
                        ""
                    };
                    format!("{}{refused}", t.name)
                })
                .collect();
            out.push_str(&format!("Downstream things: {}\n", things.join(", ")));
        }
        if self.tunnels.is_empty() {
            out.push_str("No tunnels.\n");
        }
        for t in &self.tunnels {
            render_tunnel(&mut out, t, &ago);
        }
        out
    }
}

/// One tunnel's lines of `status`.
fn render_tunnel(out: &mut String, t: &TunnelStatus, ago: &dyn Fn(u64) -> String) {
    out.push_str(&format!(
        "\nTunnel {} to {} ({}): {}, region {}, services {}\n",
        t.id,
        t.thing,
        t.token,
        t.phase,
        t.region,
        t.services.join(", ")
    ));
    if let Some(n) = t.next_attempt_in_secs {
        out.push_str(&format!("  next attempt in {n} s\n"));
    }
    if let Some(since) = t.connected_since {
        out.push_str(&format!(
            "  connected for {}, channel {}\n",
            ago(since),
            t.channel_id.as_deref().unwrap_or("-")
        ));
    }
    let open: Vec<String> = t
        .services
        .iter()
        .map(|s| format!("{s} {}", t.open_connections.get(s).copied().unwrap_or(0)))
        .collect();
    out.push_str(&format!(
        "  connections open: {}; bytes from tunnel {}, to tunnel {}\n",
        open.join(", "),
        t.bytes_from_tunnel,
        t.bytes_to_tunnel
    ));
    let left = t.expires_in_secs.map_or("-".to_owned(), human);
    out.push_str(&format!(
        "  reconnects {}, rotations {}, age {}, lifetime left {left}\n",
        t.reconnects,
        t.rotations,
        human(t.age_secs)
    ));
    if let Some(e) = &t.last_error {
        out.push_str(&format!("  last error: {e}\n"));
    }
}

/// `1h02m03s`, `4m05s`, `6s`.
fn human(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

pub struct StatusFile {
    path: PathBuf,
}

impl StatusFile {
    pub fn new(state_dir: &Path) -> Self {
        StatusFile {
            path: state_dir.join("status.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write-then-rename, so a reader never sees half a file.
    pub fn write(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

pub use crate::config::SOCKET_NAME;
/// Status clients answered at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 4;
/// A client that does not take its answer within this is dropped.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer a `status` client reads.
const MAX_ANSWER: u64 = 4 << 20;

/// The agent's end: each client that connects gets one JSON snapshot, then EOF.
pub struct StatusSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The socket file's (device, inode): only ours is removed on drop.
    file: (u64, u64),
    writers: Arc<Semaphore>,
}

/// What a client beyond `MAX_CLIENTS` is told.
const BUSY: &[u8] = b"busy\n";

impl StatusSocket {
    /// Binds `<dir>/status.sock`, owner-only, in a directory only the agent's user uses
    /// (created 0700 when missing). Refuses when another agent answers on it.
    pub fn bind(dir: &Path) -> io::Result<StatusSocket> {
        crate::persist::private_dir(dir, crate::persist::euid())
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
        let path = dir.join(SOCKET_NAME);
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent answers status on {}", path.display()),
            ));
        }
        // A socket left by a killed agent refuses connections: replace it.
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let meta = std::fs::symlink_metadata(&path)?;
        Ok(StatusSocket {
            listener,
            file: (meta.dev(), meta.ino()),
            path,
            writers: Arc::new(Semaphore::new(MAX_CLIENTS)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    /// Sends a snapshot to `client` from a task of its own; `snapshot` is built only when
    /// a writer is free. A client beyond `MAX_CLIENTS` is told the agent is busy.
    pub fn answer(&self, client: UnixStream, snapshot: impl FnOnce() -> Snapshot) {
        let Ok(permit) = self.writers.clone().try_acquire_owned() else {
            // A fresh socket's buffer takes these few bytes at once; if not, the client
            // sees EOF.
            let _ = client.try_write(BUSY);
            return;
        };
        let Ok(mut body) = serde_json::to_vec(&snapshot()) else {
            return;
        };
        body.push(b'\n');
        let mut client = client;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(ANSWER_TIMEOUT, client.write_all(&body)).await;
            drop(permit);
        });
    }
}

impl Drop for StatusSocket {
    fn drop(&mut self) {
        let ours =
            std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.file);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Why `securetunnel-agent status` has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("the agent is not running (nothing listens on {0})")]
    NotRunning(PathBuf),
    #[error("{0}: permission denied: run status as root or as the agent's user")]
    Denied(PathBuf),
    #[error("the agent is answering {MAX_CLIENTS} other status clients; try again")]
    Busy,
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: the answer is not a status snapshot: {source}")]
    Garbled {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The client's end: one snapshot from the agent whose runtime directory is `dir`.
pub fn query(dir: &Path) -> Result<Snapshot, QueryError> {
    let path = dir.join(SOCKET_NAME);
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            QueryError::NotRunning(path.clone())
        }
        io::ErrorKind::PermissionDenied => QueryError::Denied(path.clone()),
        _ => QueryError::Io {
            path: path.clone(),
            source,
        },
    };
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(io_err)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    let mut body = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut body)
        .map_err(io_err)?;
    if body == BUSY {
        return Err(QueryError::Busy);
    }
    serde_json::from_slice(&body).map_err(|source| QueryError::Garbled {
        path: path.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phase_names_tell_reconnecting_from_connecting() {
        assert_eq!(phase_name(Phase::Connecting, 0), "connecting");
        assert_eq!(phase_name(Phase::Connecting, 2), "reconnecting");
        assert_eq!(phase_name(Phase::Connected, 1), "connected");
        assert_eq!(phase_name(Phase::Ready, 1), "connected");
        assert_eq!(phase_name(Phase::Draining, 1), "draining");
        assert_eq!(phase_name(Phase::AwaitingConsent, 1), "awaiting consent");
    }

    #[test]
    fn connected_since_only_while_the_websocket_is_up() {
        let t = Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        for phase in [Phase::Connected, Phase::Ready] {
            assert_eq!(connected_since(phase, t), Some(1_700_000_000), "{phase:?}");
        }
        for phase in [
            Phase::AwaitingConsent,
            Phase::Connecting,
            Phase::Draining,
            Phase::Ended,
        ] {
            assert_eq!(connected_since(phase, t), None, "{phase:?}");
        }
        assert_eq!(connected_since(Phase::Connected, None), None);
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human(5), "5s");
        assert_eq!(human(65), "1m05s");
        assert_eq!(human(3723), "1h02m03s");
    }
}
