//! The local-proxy bridge: one websocket to the tunneling service, relayed to local TCP and
//! Unix sockets, in destination or source mode, reconnecting until the tunnel closes.
//!
//! `ws` owns the websocket (handshake, writer), `relay` one websocket session, `streams`
//! the stream/connection table (no I/O), `local` one local connection, `source` the
//! listeners of source mode.

mod budget;
mod endpoint;
mod link;
mod local;
mod log_rate;
mod relay;
mod source;
mod state;
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

use crate::audit::{Kind as AuditKind, TunnelTrail};
use crate::backoff::Backoff;
use crate::consent::Gate;
use crate::protocol::{self, Format, Mode};
use crate::secret::Secret;
use crate::services::{Scope, SharedServiceMap};
pub use budget::{Budget, DEFAULT_BUFFER_BUDGET, DEFAULT_UPWARD_BUDGET, TUNNEL_RESERVE};
pub(crate) use budget::{BudgetPermit, TunnelBudget};
use link::Link;
use relay::{Session, SessionEnd};
pub use source::SourceListeners;
pub use state::{Phase, State, Stats};
#[cfg(fuzzing)]
pub(crate) use ws::handshake_against;
pub use ws::{DataEndpoint, HandshakeError, Io, Probe, probe, request_size, ws_config};

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

/// Which end of the tunnel the bridge is.
pub enum Role {
    /// Connect each stream to the service map's endpoint for its service.
    Destination {
        /// Read per STREAM_START, so a reload applies to new streams.
        services: SharedServiceMap,
        /// The services this tunnel may reach (`Scope::admits`), asked before the map.
        scope: Scope,
        /// Site consent: the tunnel connects and its streams are admitted only while it is
        /// given (`consent::Gate`).
        consent: Gate,
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
                audit: TunnelTrail::default(),
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

    /// Records the tunnel's connects and its local connections in `audit`.
    pub(crate) fn with_audit(mut self, audit: TunnelTrail) -> Self {
        self.link.audit = audit;
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
                consent: crate::consent::Gate::always(),
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
