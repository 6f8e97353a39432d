//! The websocket side of a bridge: connect, run one session, and reconnect with backoff
//! until the tunnel closes, the token is rejected or replaced, or the bridge is cancelled.

use super::*;

/// Everything about the websocket side that stays the same across reconnects.
pub(super) struct Link {
    pub(super) endpoint: DataEndpoint,
    pub(super) tls: Option<Arc<rustls::ClientConfig>>,
    pub(super) access_token: Secret,
    pub(super) client_token: Secret,
    pub(super) limits: Limits,
    pub(super) stats: Arc<Stats>,
    pub(super) state: watch::Sender<State>,
    /// Bytes held for local sockets, shared with the agent's other bridges.
    pub(super) budget: TunnelBudget,
    /// Bytes read from local sockets and not yet sent: this tunnel's own.
    pub(super) upward: Arc<Semaphore>,
    /// Where host-name services resolve; the agent's bridges share one bound.
    pub(super) lookups: crate::lookup::Lookups,
    /// The tunnel's audit trail (off for `local-proxy`).
    pub(super) audit: TunnelTrail,
}

/// Accepted clients waiting for the session (source mode).
const ACCEPT_QUEUE: usize = 16;
/// Time given to the writer to send a close frame when a session ends.
const CLOSE_FLUSH: Duration = Duration::from_millis(500);

impl Link {
    pub(super) async fn run(
        &self,
        role: Role,
        mode: Mode,
        cancel: CancellationToken,
        retire: CancellationToken,
    ) -> Result<BridgeEnd, BridgeError> {
        let (accept_tx, mut accepts) = mpsc::channel(ACCEPT_QUEUE);
        let mut listener_tasks = JoinSet::new();
        let (services, format) = match role {
            Role::Destination {
                services,
                scope,
                consent,
            } => (Some((services, scope, consent)), Format::V3),
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
            let consent = services.as_ref().map(|(_, scope, gate)| (scope, gate));
            let connected = match self.attempt(consent, mode, &cancel, &retire).await {
                Ok(connected) => connected,
                Err(end) => return Ok(end),
            };
            let why = match connected {
                Ok(c) => {
                    let role = match &services {
                        Some((map, scope, consent)) => {
                            relay::Role::Destination(map, scope, consent)
                        }
                        None => relay::Role::Source(format),
                    };
                    match self
                        .serve(c, role, &mut table, &mut accepts, &cancel, &mut backoff)
                        .await
                    {
                        Ok(why) => why,
                        Err(end) => return end,
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
            if let Some(end) = self.back_off(why, &mut backoff, &cancel, &retire).await {
                return Ok(end);
            }
        }
    }

    /// One handshake, after site consent when the tunnel must wait for it; `Err` when the
    /// bridge ends first.
    async fn attempt(
        &self,
        consent: Option<(&Scope, &Gate)>,
        mode: Mode,
        cancel: &CancellationToken,
        retire: &CancellationToken,
    ) -> Result<Result<ws::Connected, HandshakeError>, BridgeEnd> {
        if let Some((scope, gate)) = consent
            && let Some(end) = self.await_consent(scope, gate, cancel, retire).await
        {
            return Err(end);
        }
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
        tokio::select! {
            _ = cancel.cancelled() => Err(BridgeEnd::Cancelled),
            _ = retire.cancelled() => Err(BridgeEnd::Retired),
            r = ws::connect(&params) => Ok(r),
        }
    }

    /// Before each connect: a tunnel whose services all need a site consent not given
    /// waits for it (`consent::may_connect`), within the agent's limits for its token.
    async fn await_consent(
        &self,
        scope: &Scope,
        consent: &Gate,
        cancel: &CancellationToken,
        retire: &CancellationToken,
    ) -> Option<BridgeEnd> {
        let opened = scope.opened();
        if consent.may_connect(opened) {
            return None;
        }
        info!(services = ?opened, "awaiting site consent before connecting");
        self.state.send_modify(|s| {
            s.phase = Phase::AwaitingConsent;
            s.retry_at = None;
            s.connected_since = None;
        });
        let mut consent = consent.clone();
        tokio::select! {
            _ = cancel.cancelled() => Some(BridgeEnd::Cancelled),
            _ = retire.cancelled() => Some(BridgeEnd::Retired),
            () = consent.until_may_connect(opened) => {
                info!("site consent given: connecting");
                None
            }
        }
    }

    /// One websocket session, to its end: `Ok` with why it was lost (reconnect), `Err` with
    /// how the bridge ends.
    async fn serve(
        &self,
        c: ws::Connected,
        role: relay::Role<'_>,
        table: &mut streams::StreamTable<local::ConnHandle>,
        accepts: &mut mpsc::Receiver<source::Accepted>,
        cancel: &CancellationToken,
        backoff: &mut Backoff,
    ) -> Result<String, Result<BridgeEnd, BridgeError>> {
        if backoff.failures() > 0 {
            info!(
                attempts = backoff.failures() + 1,
                "websocket connected after retrying"
            );
        }
        let up = Instant::now();
        let end = self.session(c, role, table, accepts, cancel).await;
        // Only a session that stayed up ends the failure streak: a service that accepts and
        // then drops us keeps backing off.
        backoff.connection_lasted(up.elapsed());
        match end {
            SessionEnd::Closed(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                info!(code, reason = ?reason, "the service closed the tunnel");
                Err(Ok(BridgeEnd::ClosedByService { code, reason }))
            }
            SessionEnd::Cancelled => Err(Ok(BridgeEnd::Cancelled)),
            SessionEnd::Lost(why) => Ok(why),
            // Counted in `Session::violation`.
            SessionEnd::Protocol(e) => Ok(format!("protocol error: {e}")),
        }
    }

    /// After a lost session or a failed connect: waits as the backoff says. `Some` with how
    /// the bridge ends when it was retired or cancelled meanwhile.
    async fn back_off(
        &self,
        why: String,
        backoff: &mut Backoff,
        cancel: &CancellationToken,
        retire: &CancellationToken,
    ) -> Option<BridgeEnd> {
        if retire.is_cancelled() {
            info!("{why}; not reconnecting: this token was replaced");
            return Some(BridgeEnd::Retired);
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
            _ = cancel.cancelled() => return Some(BridgeEnd::Cancelled),
            _ = retire.cancelled() => return Some(BridgeEnd::Retired),
            _ = tokio::time::sleep_until(retry_at) => {}
        }
        None
    }

    pub(super) async fn session(
        &self,
        c: ws::Connected,
        role: relay::Role<'_>,
        table: &mut streams::StreamTable<local::ConnHandle>,
        accepts: &mut mpsc::Receiver<source::Accepted>,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        info!(channel_id = c.channel_id.as_deref().unwrap_or("-"), endpoint = %self.endpoint, "websocket connected");
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        let mut sessions = 0;
        self.state.send_modify(|s| {
            s.phase = Phase::Connected;
            s.sessions += 1;
            s.channel_id = c.channel_id.clone();
            s.connected_since = Some(SystemTime::now());
            sessions = s.sessions;
        });
        let audit = self.audit.with_channel(c.channel_id.as_deref());
        if audit.is_on() {
            let kind = match sessions {
                1 => AuditKind::Connected,
                _ => AuditKind::Reconnected,
            };
            audit.record(&audit.event(kind));
        }
        let (sink, incoming) = c.ws.split();
        let limits = self.limits;
        let (out_tx, out_rx) = mpsc::channel(limits.outgoing_depth.max(1));
        let mut writer = AbortOnDropHandle::new(tokio::spawn(ws::write_loop(
            sink,
            out_rx,
            limits.ping_interval,
            self.stats.clone(),
        )));
        let res = relay::Resources {
            limits,
            stats: &self.stats,
            state: &self.state,
            budget: self.budget.clone(),
            upward: self.upward.clone(),
            lookups: self.lookups.clone(),
            audit,
        };
        let mut session = Session::new(role, res, table, out_tx.clone());
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
