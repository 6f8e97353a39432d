//! The local-proxy bridge: one websocket to the tunneling service, relayed to local TCP and
//! Unix sockets, in destination or source mode, reconnecting until the tunnel closes.
//!
//! `ws` owns the websocket (handshake, writer), `relay` one websocket session, `streams`
//! the stream/connection table (no I/O), `local` one local connection, `source` the
//! listeners of source mode, `record_reads` the read sizes under TLS.

mod local;
mod log_rate;
mod record_reads;
mod relay;
mod source;
mod streams;
mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, info, warn};

use crate::backoff::Backoff;
use crate::protocol::{self, Format, Mode};
use crate::secret::Secret;
use crate::services::{Scope, SharedServiceMap};
use relay::{Session, SessionEnd};
pub use source::SourceListeners;
#[cfg(fuzzing)]
pub(crate) use ws::handshake_against;
pub use ws::{DataEndpoint, HandshakeError, Io, request_size, ws_config};

/// Timeouts, bounds and retry policies of a bridge, in one place.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Interval between pings on the websocket.
    pub ping_interval: Duration,
    /// A websocket that receives nothing at all (no data, ping or pong) this long is
    /// dropped and reconnected with the same tokens; zero turns it off.
    pub idle_timeout: Duration,
    /// Messages (each at most 64512 bytes) queued toward one local connection.
    pub queue_depth: usize,
    /// A connection whose queue stays full this long is reset (see `relay::Session::on_data`).
    pub stall_timeout: Duration,
    /// How long a reset connection may take to flush what is queued for it.
    pub close_linger: Duration,
    /// Attempts to connect a local endpoint before the stream or connection is refused.
    pub connect_attempts: u32,
    /// Delay before the second local connect attempt; it doubles after each failure.
    pub connect_retry_delay: Duration,
    /// Ceiling of the doubling local connect delay.
    pub connect_retry_max_delay: Duration,
    /// Time one local connect attempt may take.
    pub connect_timeout: Duration,
    /// Local connections open at once on one tunnel.
    pub max_connections: usize,
    /// Frames waiting for the websocket writer.
    pub outgoing_depth: usize,
    /// Bytes held for local sockets, all connections together; a bridge shares the agent's
    /// budget (`Bridge::with_budget`) or has its own of this size.
    pub buffer_budget: usize,
    /// Bytes read from local sockets and not yet framed for the websocket, per tunnel.
    pub upward_budget: usize,
    /// Time the TCP, TLS and websocket handshake together may take.
    pub handshake_timeout: Duration,
    /// Base of the exponential websocket reconnect backoff.
    pub reconnect_min_delay: Duration,
    /// Ceiling of the websocket reconnect backoff.
    pub reconnect_max_delay: Duration,
}

impl Limits {
    /// Rule: a link is pinged at least three times per idle timeout, so a service that
    /// answers pings keeps an idle tunnel alive.
    pub fn with_idle_timeout(self, idle: Duration) -> Self {
        let ping_interval = if idle.is_zero() {
            protocol::PING_INTERVAL
        } else {
            protocol::PING_INTERVAL.min(idle / 3)
        };
        Limits {
            idle_timeout: idle,
            ping_interval,
            ..self
        }
    }

    /// Rule: the longest all local connect attempts of one connection can take: each
    /// attempt's timeout plus the delays between them at their ceiling.
    pub fn connect_give_up(&self) -> Duration {
        let attempts = self.connect_attempts.max(1);
        self.connect_timeout
            .saturating_mul(attempts)
            .saturating_add(self.connect_retry_max_delay.saturating_mul(attempts - 1))
    }

    /// Most bytes held toward one local connection: its queue plus the chunk being written.
    pub fn connection_buffer_bound(&self) -> usize {
        (self.queue_depth.max(1) + 1) * protocol::MAX_PAYLOAD
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            ping_interval: protocol::PING_INTERVAL,
            idle_timeout: protocol::IDLE_TIMEOUT,
            queue_depth: 4,
            stall_timeout: Duration::from_secs(5),
            close_linger: Duration::from_secs(5),
            connect_attempts: 5,
            connect_retry_delay: Duration::from_millis(200),
            connect_retry_max_delay: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(10),
            max_connections: 128,
            outgoing_depth: 8,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            upward_budget: DEFAULT_UPWARD_BUDGET,
            handshake_timeout: Duration::from_secs(15),
            reconnect_min_delay: Duration::from_millis(500),
            reconnect_max_delay: Duration::from_secs(30),
        }
    }
}

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

/// Which end of the tunnel the bridge is.
pub enum Role {
    /// Connect each stream to the service map's endpoint for its service.
    Destination {
        /// Read per STREAM_START, so a reload applies to new streams.
        services: SharedServiceMap,
        /// The services this tunnel may reach (`Scope::admits`), asked before the map.
        scope: Scope,
    },
    /// Accept local clients and open streams for them.
    Source {
        /// Bound listeners, one per service.
        listeners: SourceListeners,
        /// Message format the destination speaks.
        format: Format,
    },
}

/// Everything a bridge needs to run.
pub struct BridgeConfig {
    /// Destination or source.
    pub role: Role,
    /// The data-plane endpoint.
    pub endpoint: DataEndpoint,
    /// Required for a `wss` endpoint.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The access token (CAT) for this end.
    pub access_token: Secret,
    /// Generated (UUIDv4) when absent, once for this access token, so reconnects with the
    /// same token are accepted.
    pub client_token: Option<Secret>,
    /// Timeouts, bounds and retry policies.
    pub limits: Limits,
}

/// How a bridge ended, when it ended normally.
#[derive(Debug, PartialEq, Eq)]
pub enum BridgeEnd {
    /// The service closed the websocket: CloseTunnel or the tunnel's lifetime ended.
    ClosedByService {
        /// The close frame's status code (1005 when it carried none).
        code: u16,
        /// The close frame's reason.
        reason: String,
    },
    /// The caller cancelled the bridge.
    Cancelled,
    /// The bridge was retired (its token was replaced) and its websocket then ended: a
    /// retired bridge never reconnects, so a revoked token is never presented again.
    Retired,
}

/// Why a bridge could not run or stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The service refused the handshake and retrying cannot help.
    #[error("{0}")]
    Rejected(HandshakeError),
    /// The access token is unusable (empty, too long, control characters).
    #[error("invalid access token: {0}")]
    AccessToken(&'static str),
    /// The client token does not follow the rule.
    #[error(
        "invalid client token: use 32-128 characters of letters, digits and '-' (a UUID works)"
    )]
    ClientToken,
}

/// One end of a tunnel: a websocket to the service, relayed to local sockets.
pub struct Bridge {
    role: Role,
    link: Link,
    retire: CancellationToken,
}

/// Everything about the websocket side that stays the same across reconnects.
struct Link {
    endpoint: DataEndpoint,
    tls: Option<Arc<rustls::ClientConfig>>,
    access_token: Secret,
    client_token: Secret,
    limits: Limits,
    stats: Arc<Stats>,
    state: watch::Sender<State>,
    /// Bytes held for local sockets, shared with the agent's other bridges.
    budget: TunnelBudget,
    /// Bytes read from local sockets and not yet sent: this tunnel's own.
    upward: Arc<Semaphore>,
    /// Where host-name services resolve; the agent's bridges share one bound.
    lookups: crate::lookup::Lookups,
}

/// A byte budget: a semaphore of bytes, and its size.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

/// One bridge's view of a budget: the budget itself, the tunnel's own cap on it, and, when
/// it shares the budget with other tunnels, a reserve of its own.
#[derive(Clone, Debug)]
pub(crate) struct TunnelBudget {
    pub shared: Budget,
    cap: Arc<Semaphore>,
    reserve: Option<Arc<Semaphore>>,
}

/// Bytes each tunnel that shares the agent's budget holds on its own, besides that budget:
/// two full payloads, so its reader moves while others' stalled consumers hold the rest.
pub const TUNNEL_RESERVE: usize = 2 * crate::protocol::MAX_PAYLOAD;

/// A payload's share of the budget: released when the payload is written (or dropped).
#[derive(Debug)]
pub(crate) enum BudgetPermit {
    /// From the shared budget, within the tunnel's cap.
    Shared {
        _cap: tokio::sync::OwnedSemaphorePermit,
        _shared: tokio::sync::OwnedSemaphorePermit,
    },
    /// From the tunnel's own reserve.
    Reserved {
        _reserve: tokio::sync::OwnedSemaphorePermit,
    },
}

impl TunnelBudget {
    /// Rule (fair share): a tunnel may hold at most half of a budget it shares with other
    /// tunnels, and has `TUNNEL_RESERVE` of its own that it uses first, so consumers of other
    /// tunnels can never stall its reader; alone, it has all of its budget.
    pub fn new(shared: Budget, sharing: bool) -> Self {
        let cap = if sharing {
            shared.total / 2
        } else {
            shared.total
        };
        TunnelBudget {
            cap: Arc::new(Semaphore::new(cap.max(crate::protocol::MAX_PAYLOAD))),
            shared,
            reserve: sharing.then(|| Arc::new(Semaphore::new(TUNNEL_RESERVE))),
        }
    }

    /// `len` bytes now: from the reserve, else if both the tunnel's cap and the budget
    /// have them.
    pub fn try_acquire(&self, len: u32) -> Option<BudgetPermit> {
        if let Some(reserve) = &self.reserve
            && let Ok(p) = reserve.clone().try_acquire_many_owned(len)
        {
            return Some(BudgetPermit::Reserved { _reserve: p });
        }
        let cap = self.cap.clone().try_acquire_many_owned(len).ok()?;
        let shared = self.shared.sem.clone().try_acquire_many_owned(len).ok()?;
        Some(BudgetPermit::Shared {
            _cap: cap,
            _shared: shared,
        })
    }

    /// `len` bytes once available, from whichever has them first: the reserve, or the
    /// tunnel's cap and then the budget (so a tunnel at its cap does not hold a share of
    /// the budget while it waits).
    pub async fn acquire(&self, len: u32) -> Option<BudgetPermit> {
        let shared = async {
            let cap = self.cap.clone().acquire_many_owned(len).await.ok()?;
            let shared = self.shared.sem.clone().acquire_many_owned(len).await.ok()?;
            Some(BudgetPermit::Shared {
                _cap: cap,
                _shared: shared,
            })
        };
        let Some(reserve) = &self.reserve else {
            return shared.await;
        };
        tokio::select! {
            p = shared => p,
            Ok(p) = reserve.clone().acquire_many_owned(len) => {
                Some(BudgetPermit::Reserved { _reserve: p })
            }
        }
    }
}

impl Budget {
    /// `total` bytes.
    pub fn new(total: usize) -> Self {
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Rule: under pressure when less than a quarter is left; then connections holding
    /// bytes that their consumers do not take are reset (see `relay::Session::sweep`).
    pub(crate) fn scarce(&self) -> bool {
        self.sem.available_permits() < self.total / 4
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.total.saturating_sub(self.sem.available_permits())
    }
}

/// Default byte budget: 8 MiB (`limits.max_buffered_kib` in the agent's config).
pub const DEFAULT_BUFFER_BUDGET: usize = 8 << 20;
/// Default upward budget per tunnel: 1 MiB, 16 full payloads.
pub const DEFAULT_UPWARD_BUDGET: usize = 1 << 20;

/// Accepted clients waiting for the session (source mode).
const ACCEPT_QUEUE: usize = 16;
/// Time given to the writer to send a close frame when a session ends.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

impl Bridge {
    /// Checks the tokens; a client token is generated when none is given.
    pub fn new(cfg: BridgeConfig) -> Result<Self, BridgeError> {
        if let Some(problem) = protocol::access_token_problem(cfg.access_token.expose()) {
            return Err(BridgeError::AccessToken(problem));
        }
        let client_token = match &cfg.client_token {
            Some(t) if protocol::is_valid_client_token(t.expose()) => t.clone(),
            Some(_) => return Err(BridgeError::ClientToken),
            None => Secret::new(uuid::Uuid::new_v4().to_string()),
        };
        let state = watch::Sender::new(State {
            phase: Phase::Connecting,
            sessions: 0,
            channel_id: None,
            resets_received: 0,
            retry_at: None,
            last_error: None,
            connected_since: None,
        });
        Ok(Bridge {
            role: cfg.role,
            link: Link {
                endpoint: cfg.endpoint,
                tls: cfg.tls,
                access_token: cfg.access_token,
                client_token,
                budget: TunnelBudget::new(Budget::new(cfg.limits.buffer_budget), false),
                upward: Arc::new(Semaphore::new(cfg.limits.upward_budget)),
                lookups: crate::lookup::Lookups::default(),
                limits: cfg.limits,
                stats: Arc::default(),
                state,
            },
            retire: CancellationToken::new(),
        })
    }

    /// Counters that stay readable while the bridge runs.
    pub fn stats(&self) -> Arc<Stats> {
        self.link.stats.clone()
    }

    /// The bridge's state, updated as it changes.
    pub fn state(&self) -> watch::Receiver<State> {
        self.link.state.subscribe()
    }

    /// Shares `budget` (bytes) with other bridges instead of the bridge's own
    /// `limits.buffer_budget`: the agent bounds what all its tunnels hold together.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.link.budget = TunnelBudget::new(budget, true);
        self
    }

    /// Resolves host-name services through `lookups`, whose bound it shares with other
    /// bridges, instead of a bound of its own.
    pub fn with_lookups(mut self, lookups: crate::lookup::Lookups) -> Self {
        self.link.lookups = lookups;
        self
    }

    /// Cancel it to retire the bridge: the current websocket session goes on, but once it
    /// ends the bridge returns instead of reconnecting (its token was replaced).
    pub fn retire_handle(&self) -> CancellationToken {
        self.retire.clone()
    }

    /// Destination or source.
    pub fn mode(&self) -> Mode {
        match self.role {
            Role::Destination { .. } => Mode::Destination,
            Role::Source { .. } => Mode::Source,
        }
    }

    /// Runs until the service closes the tunnel, the handshake is rejected for good, or
    /// `cancel` fires. Every local socket is closed when it returns.
    pub async fn run(self, cancel: CancellationToken) -> Result<BridgeEnd, BridgeError> {
        let span =
            tracing::info_span!("bridge", mode = %self.mode(), token = %self.link.access_token);
        let mode = self.mode();
        let Bridge { role, link, retire } = self;
        let result = link.run(role, mode, cancel, retire).instrument(span).await;
        link.state.send_modify(|s| {
            s.phase = Phase::Ended;
            s.retry_at = None;
            s.connected_since = None;
        });
        result
    }
}

impl Link {
    async fn run(
        &self,
        role: Role,
        mode: Mode,
        cancel: CancellationToken,
        retire: CancellationToken,
    ) -> Result<BridgeEnd, BridgeError> {
        let (accept_tx, mut accepts) = mpsc::channel(ACCEPT_QUEUE);
        let mut listener_tasks = JoinSet::new();
        let (services, format) = match role {
            Role::Destination { services, scope } => (Some((services, scope)), Format::V3),
            Role::Source { listeners, format } => {
                listeners.log_addresses();
                listeners.spawn(&mut listener_tasks, accept_tx);
                (None, format)
            }
        };
        let mut table = streams::StreamTable::default();
        let mut backoff = Backoff::new(
            self.limits.reconnect_min_delay,
            self.limits.reconnect_max_delay,
        );
        loop {
            self.state.send_modify(|s| {
                s.phase = Phase::Connecting;
                s.retry_at = None;
                s.connected_since = None;
            });
            let params = ws::HandshakeParams {
                endpoint: &self.endpoint,
                mode,
                tls: self.tls.as_ref(),
                access_token: &self.access_token,
                client_token: &self.client_token,
                timeout: self.limits.handshake_timeout,
            };
            // A retired bridge never presents its replaced token again, not even in a
            // handshake already under way.
            let connected = tokio::select! {
                _ = cancel.cancelled() => return Ok(BridgeEnd::Cancelled),
                _ = retire.cancelled() => return Ok(BridgeEnd::Retired),
                r = ws::connect(&params) => r,
            };
            let why = match connected {
                Ok(c) => {
                    if backoff.failures() > 0 {
                        info!(
                            attempts = backoff.failures() + 1,
                            "websocket connected after retrying"
                        );
                    }
                    let role = match &services {
                        Some((map, scope)) => relay::Role::Destination(map, scope),
                        None => relay::Role::Source(format),
                    };
                    let up = Instant::now();
                    let end = self
                        .session(c, role, &mut table, &mut accepts, &cancel)
                        .await;
                    // Only a session that stayed up ends the failure streak: a service that
                    // accepts and then drops us keeps backing off.
                    backoff.connection_lasted(up.elapsed());
                    match end {
                        SessionEnd::Closed(frame) => {
                            let (code, reason) = frame
                                .map(|f| (u16::from(f.code), f.reason.to_string()))
                                .unwrap_or((1005, String::new()));
                            info!(code, reason = ?reason, "the service closed the tunnel");
                            return Ok(BridgeEnd::ClosedByService { code, reason });
                        }
                        SessionEnd::Cancelled => return Ok(BridgeEnd::Cancelled),
                        SessionEnd::Lost(why) => why,
                        // Counted in `Session::violation`.
                        SessionEnd::Protocol(e) => format!("protocol error: {e}"),
                    }
                }
                Err(e) if !e.is_retryable() => {
                    // The caller logs it: one line per rejected token.
                    debug!("{e}; not retrying with this token");
                    return Err(BridgeError::Rejected(e));
                }
                Err(e) => {
                    self.stats
                        .handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    e.to_string()
                }
            };
            if retire.is_cancelled() {
                info!("{why}; not reconnecting: this token was replaced");
                return Ok(BridgeEnd::Retired);
            }
            // The first failure of a streak is logged loudly, the rest quietly.
            if backoff.failures() == 0 {
                warn!("{why}; reconnecting with backoff");
            } else {
                debug!(attempt = backoff.failures() + 1, "{why}");
            }
            let delay = backoff.failed();
            let retry_at = Instant::now() + delay;
            self.state.send_modify(|s| {
                s.phase = Phase::Connecting;
                s.retry_at = Some(retry_at);
                s.last_error = Some(why);
            });
            tokio::select! {
                _ = cancel.cancelled() => return Ok(BridgeEnd::Cancelled),
                _ = retire.cancelled() => return Ok(BridgeEnd::Retired),
                _ = tokio::time::sleep_until(retry_at) => {}
            }
        }
    }

    async fn session(
        &self,
        c: ws::Connected,
        role: relay::Role<'_>,
        table: &mut streams::StreamTable<local::ConnHandle>,
        accepts: &mut mpsc::Receiver<source::Accepted>,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        info!(channel_id = c.channel_id.as_deref().unwrap_or("-"), endpoint = %self.endpoint, "websocket connected");
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|s| {
            s.phase = Phase::Connected;
            s.sessions += 1;
            s.channel_id = c.channel_id.clone();
            s.connected_since = Some(SystemTime::now());
        });
        let (sink, incoming) = c.ws.split();
        let limits = self.limits;
        let (out_tx, out_rx) = mpsc::channel(limits.outgoing_depth.max(1));
        let mut writer = AbortOnDropHandle::new(tokio::spawn(ws::write_loop(
            sink,
            out_rx,
            limits.ping_interval,
            self.stats.clone(),
        )));
        let mut session = Session {
            role,
            limits,
            stats: &self.stats,
            state: &self.state,
            table,
            out: out_tx.clone(),
            tasks: JoinSet::new(),
            tunnel_services: None,
            next_id: 0,
            waiting: Default::default(),
            backlog: Default::default(),
            budget: self.budget.clone(),
            upward: self.upward.clone(),
            swept: Vec::new(),
            pong_seen: false,
            lookups: self.lookups.clone(),
        };
        let end = session.run(incoming, &mut writer, accepts, cancel).await;
        self.state.send_modify(|s| s.phase = Phase::Draining);
        session.shutdown().await;
        drop(session);
        let close = match &end {
            SessionEnd::Cancelled => Some((1000, "agent stopping")),
            SessionEnd::Protocol(_) => Some((1002, "protocol error")),
            _ => None,
        };
        if let Some((code, reason)) = close {
            let _ = out_tx.try_send(ws::Outbound::Close(code, reason));
        }
        drop(out_tx);
        // The session may already have consumed the writer's result.
        if !writer.is_finished() {
            let _ = tokio::time::timeout(CLOSE_FLUSH, &mut writer).await;
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_holds_at_most_half_of_a_shared_budget() {
        let shared = Budget::new(1 << 20);
        let (a, b) = (
            TunnelBudget::new(shared.clone(), true),
            TunnelBudget::new(shared.clone(), true),
        );
        let held: Vec<_> = std::iter::from_fn(|| a.try_acquire(64 << 10)).collect();
        assert_eq!(
            held.len(),
            1 + 8,
            "one 64 KiB payload from its reserve, then half of 1 MiB"
        );
        let rest = b.try_acquire(512 << 10);
        assert!(rest.is_some(), "the other tunnel gets the rest");
        assert_eq!(shared.used(), 1 << 20);
        drop(held);
        assert!(a.try_acquire(64 << 10).is_some());
        // Alone, a bridge may use all of its own budget.
        let alone = TunnelBudget::new(Budget::new(1 << 20), false);
        assert!(alone.try_acquire(1 << 20).is_some());
    }

    #[tokio::test]
    async fn a_tunnel_keeps_its_reserve_when_others_hold_the_whole_shared_budget() {
        let shared = Budget::new(1 << 20);
        let (a, b, c) = (
            TunnelBudget::new(shared.clone(), true),
            TunnelBudget::new(shared.clone(), true),
            TunnelBudget::new(shared.clone(), true),
        );
        let payload = crate::protocol::MAX_PAYLOAD as u32;
        // Two tunnels take their reserves and then all of the shared budget.
        let held: Vec<_> = std::iter::from_fn(|| a.try_acquire(payload))
            .chain(std::iter::from_fn(|| b.try_acquire(payload)))
            .collect();
        assert!(shared.used() > (1 << 20) - payload as usize);
        assert_eq!(held.len(), 2 * 2 + (1 << 20) / payload as usize);
        // The third still has its own: two payloads at once, and more as they are written.
        let first = c.try_acquire(payload).expect("reserve");
        let _second = c.try_acquire(payload).expect("reserve");
        assert!(c.try_acquire(payload).is_none());
        let waiting = tokio::spawn(async move { c.acquire(payload).await.is_some() });
        drop(first);
        assert!(
            waiting.await.unwrap(),
            "the written payload's room comes back"
        );
    }

    #[test]
    fn malformed_client_token_is_refused_with_the_rule() {
        let cfg = BridgeConfig {
            role: Role::Destination {
                services: crate::services::ServiceMap::default().into(),
                scope: Scope::WholeMap,
            },
            endpoint: DataEndpoint::for_region("us-east-1"),
            tls: None,
            access_token: Secret::new("token"),
            client_token: Some(Secret::new("short")),
            limits: Limits::default(),
        };
        assert!(matches!(Bridge::new(cfg), Err(BridgeError::ClientToken)));
    }

    #[test]
    fn reconnects_back_off_from_half_a_second_to_30_seconds() {
        let l = Limits::default();
        assert_eq!(l.reconnect_min_delay, Duration::from_millis(500));
        assert_eq!(l.reconnect_max_delay, Duration::from_secs(30));
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_link_is_pinged_at_least_three_times_per_idle_timeout() {
        let l = Limits::default().with_idle_timeout(Duration::from_secs(3));
        assert_eq!(l.ping_interval, Duration::from_secs(1));
        let l = Limits::default().with_idle_timeout(Duration::from_secs(120));
        assert_eq!(l.ping_interval, protocol::PING_INTERVAL);
        let l = Limits::default().with_idle_timeout(Duration::ZERO);
        assert_eq!(l.ping_interval, protocol::PING_INTERVAL);
        assert!(l.idle_timeout.is_zero());
    }
}
