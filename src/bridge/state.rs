//! What a running bridge reports: counters (`Stats`) and where it is in its life (`State`).

use super::*;

/// Counters a test or the status report can read while the bridge runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Websocket sessions established.
    pub sessions: AtomicU64,
    /// Handshakes that failed and were retried.
    pub handshake_failures: AtomicU64,
    /// Sessions ended by a protocol violation of the peer.
    pub protocol_errors: AtomicU64,
    /// Local connect attempts (retries included).
    pub local_connects: AtomicU64,
    /// Local connections opened (connect succeeded or client accepted).
    pub connections_opened: AtomicU64,
    /// Local connections open now (their tasks are running).
    pub open_connections: AtomicUsize,
    /// The same per service (services with none are absent).
    open_by_service: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    /// Streams and connections refused because their service is not in the service map.
    pub refused_streams: AtomicU64,
    /// Times a full connection queue paused the websocket reader.
    pub stalls: AtomicU64,
    /// Connections reset because their local consumer stalled.
    pub stall_resets: AtomicU64,
    /// High-water mark of the bytes held toward any one local connection (queued or being
    /// written); never above `Limits::connection_buffer_bound`.
    pub max_queued_bytes: AtomicUsize,
    /// STREAM_RESET messages received.
    pub stream_resets_received: AtomicU64,
    /// CONNECTION_RESET messages received.
    pub connection_resets_received: AtomicU64,
    /// SESSION_RESET messages received.
    pub session_resets_received: AtomicU64,
    /// STREAM_RESET and CONNECTION_RESET messages sent.
    pub resets_sent: AtomicU64,
    /// DATA payload bytes received for open local connections.
    pub bytes_from_tunnel: AtomicU64,
    /// DATA payload bytes read from local connections and framed for the tunnel.
    pub bytes_to_tunnel: AtomicU64,
    /// Pings sent.
    pub pings_sent: AtomicU64,
    /// Pongs received (informational: the service may not answer pings).
    pub pongs_received: AtomicU64,
    /// Allowances of the log lines a peer or local client can provoke.
    pub(crate) logs: log_rate::LogRate,
}

impl Stats {
    /// Open local connections per service, now.
    pub fn open_by_service(&self) -> std::collections::BTreeMap<String, usize> {
        self.open_by_service
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// One more (or, with `opened` false, one fewer) open connection of `service`.
    pub(crate) fn count_open(&self, service: &str, opened: bool) {
        let mut map = self
            .open_by_service
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if opened {
            self.open_connections.fetch_add(1, Ordering::Relaxed);
            *map.entry(service.to_owned()).or_default() += 1;
        } else {
            self.open_connections.fetch_sub(1, Ordering::Relaxed);
            if let Some(n) = map.get_mut(service) {
                *n -= 1;
                if *n == 0 {
                    map.remove(service);
                }
            }
        }
    }
}

/// Where the bridge is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not connecting: site consent is withheld for every service of the tunnel.
    AwaitingConsent,
    /// Handshaking, or waiting to reconnect.
    Connecting,
    /// Websocket up, SERVICE_IDS not yet received.
    Connected,
    /// SERVICE_IDS received: streams can be opened.
    Ready,
    /// The websocket session ended; local connections are delivering what is queued for
    /// them (within `Limits::close_linger`).
    Draining,
    /// The bridge returned.
    Ended,
}

/// What the bridge is doing, published on a watch channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    /// Current phase.
    pub phase: Phase,
    /// Websocket sessions established so far.
    pub sessions: u64,
    /// The service's `channel-id` of the current websocket, for support cases.
    pub channel_id: Option<String>,
    /// STREAM_RESET and SESSION_RESET messages received so far.
    pub resets_received: u64,
    /// When the next handshake starts, while waiting to reconnect.
    pub retry_at: Option<Instant>,
    /// Why the last session or handshake ended, if one did.
    pub last_error: Option<String>,
    /// Since when the current websocket is up.
    pub connected_since: Option<SystemTime>,
}
