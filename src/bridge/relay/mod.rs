//! One websocket session: reads tunnel frames, applies them to the stream table, opens and
//! closes local connections, and reports local events back as resets. Ends on close, loss,
//! protocol error or cancellation; every local connection of the session ends with it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, protocol::CloseFrame};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, trace, warn};

use std::collections::{HashMap, VecDeque};

use super::local::{
    ConnExit, ConnHandle, ConnIds, ConnShared, ExitCause, LocalStream, Open, close_all, connection,
};
use super::log_rate::Kind;
use super::source::Accepted;
use super::streams::{Route, StreamTable};
use super::ws::{Outbound, WsStream};
use super::{Limits, Phase, State, Stats};
use crate::audit::{End, Event, Kind as AuditKind, TunnelTrail};
use crate::consent::Gate;
use crate::protocol::{
    self, Format, FrameCodec, FrameReader, Incoming, Message, MessageType, Mode, ProtocolError,
    Violation, connection_key,
};
use crate::services::{LocalEndpoint, Scope, SharedServiceMap};

mod backpressure;
mod destination;
mod source;

use source::next_waiting;

pub enum SessionEnd {
    Closed(Option<CloseFrame>),
    Cancelled,
    Lost(String),
    Protocol(ProtocolError),
}

/// Why a destination connects a new stream nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// Outside the tunnel's scope (`Scope::admits`).
    OutOfScope,
    /// Not in the thing's service map.
    Unmapped,
    /// Site consent is withheld for the service (`consent::admits`).
    NoConsent,
}

/// What differs between the two ends.
pub enum Role<'a> {
    Destination(&'a SharedServiceMap, &'a Scope, &'a Gate),
    Source(Format),
}

/// What a session takes from its link: limits, the counters it reports to, and the
/// budgets and lookups it shares with the link's other sessions.
pub struct Resources<'a> {
    pub limits: Limits,
    pub stats: &'a Arc<Stats>,
    pub state: &'a tokio::sync::watch::Sender<State>,
    pub budget: super::TunnelBudget,
    pub upward: Arc<Semaphore>,
    pub lookups: crate::lookup::Lookups,
    /// The tunnel's trail, with this websocket's channel id.
    pub audit: TunnelTrail,
}

pub struct Session<'a> {
    role: Role<'a>,
    limits: Limits,
    stats: &'a Arc<Stats>,
    state: &'a tokio::sync::watch::Sender<State>,
    table: &'a mut StreamTable<ConnHandle>,
    out: mpsc::Sender<Outbound>,
    tasks: JoinSet<ConnExit>,
    /// Services of the tunnel, once SERVICE_IDS arrived.
    tunnel_services: Option<Vec<String>>,
    next_id: u64,
    /// Source, V1/V2 peers: clients waiting for the service's one connection to end.
    waiting: HashMap<String, VecDeque<LocalStream>>,
    /// Control messages waiting for room in the writer's queue. While it holds
    /// `BACKLOG_LIMIT` messages the websocket is not read, so a peer that provokes replies
    /// faster than they can be sent is slowed down, not buffered.
    backlog: VecDeque<(Message, Option<oneshot::Sender<()>>)>,
    /// The agent's byte budget: every payload held for a local socket takes its share.
    budget: super::TunnelBudget,
    /// Bytes read from local sockets and not yet framed: this tunnel's upward budget.
    upward: Arc<Semaphore>,
    /// (service, connection, task id, bytes written) of the connected holders at the last
    /// sweep: who made no progress since (see `sweep`).
    swept: Vec<(String, u32, u64, u64)>,
    /// A pong arrived on this websocket: the service answers pings.
    pong_seen: bool,
    /// Where host-name services resolve, bounded.
    lookups: crate::lookup::Lookups,
    audit: TunnelTrail,
}

/// Control messages waiting for the writer before the websocket reader pauses.
pub const BACKLOG_LIMIT: usize = 64;

/// The websocket writer ended: the session is lost.
fn writer_ended(done: Result<Result<(), tungstenite::Error>, JoinError>) -> SessionEnd {
    let why = match done {
        Ok(Ok(())) => "websocket writer stopped".to_owned(),
        Ok(Err(e)) => format!("websocket write failed: {e}"),
        Err(e) => format!("websocket writer failed: {e}"),
    };
    SessionEnd::Lost(why)
}

type Writer = tokio_util::task::AbortOnDropHandle<Result<(), tungstenite::Error>>;

impl<'a> Session<'a> {
    /// A session on a new websocket: `out` feeds its writer; `table` outlives it (streams
    /// survive a reconnect as far as the protocol allows).
    pub fn new(
        role: Role<'a>,
        res: Resources<'a>,
        table: &'a mut StreamTable<ConnHandle>,
        out: mpsc::Sender<Outbound>,
    ) -> Self {
        Session {
            role,
            limits: res.limits,
            stats: res.stats,
            state: res.state,
            table,
            out,
            tasks: JoinSet::new(),
            tunnel_services: None,
            next_id: 0,
            waiting: HashMap::new(),
            backlog: VecDeque::new(),
            budget: res.budget,
            upward: res.upward,
            swept: Vec::new(),
            pong_seen: false,
            lookups: res.lookups,
            audit: res.audit,
        }
    }

    /// The tunnel's site consent (`always` for a source).
    fn consent_gate(&self) -> Gate {
        match self.role {
            Role::Destination(_, _, gate) => gate.clone(),
            Role::Source(_) => Gate::always(),
        }
    }

    /// The service a stream is for: its id, or a V1 stream's (empty id) one service.
    fn named<'s>(&'s self, service: &'s str) -> &'s str {
        match self.role {
            Role::Destination(_, scope, _) => {
                scope.named(service, self.services()).unwrap_or(service)
            }
            Role::Source(_) => service,
        }
    }

    fn mode(&self) -> Mode {
        match self.role {
            Role::Destination(..) => Mode::Destination,
            Role::Source(_) => Mode::Source,
        }
    }

    pub async fn run(
        &mut self,
        mut incoming: SplitStream<WsStream>,
        writer: &mut Writer,
        accepts: &mut mpsc::Receiver<Accepted>,
        cancel: &CancellationToken,
    ) -> SessionEnd {
        let mut reader = FrameReader::new(FrameCodec);
        let accepting = matches!(self.role, Role::Source(_));
        // A second handle, so a send permit does not borrow `self`.
        let out = self.out.clone();
        // Dead-link detection: anything received (data, ping, pong) proves the link alive. It is
        // enforced once the service answered a ping on this websocket: one that does not answer
        // (docs/protocol.md §1.5) would otherwise see an idle tunnel dropped, and its streams
        // reset, every period; TCP keepalive still covers that link. The timer is re-armed lazily,
        // once per idle period, not once per message.
        let idle = self.limits.idle_timeout;
        let mut last_rx = Instant::now();
        let idle_check = tokio::time::sleep(idle);
        tokio::pin!(idle_check);
        let mut sweep = tokio::time::interval(
            self.limits
                .stall_timeout
                .max(std::time::Duration::from_millis(1)),
        );
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Frames of a received message not decoded yet: decoding pauses while the backlog
        // is full, so one message of tiny frames cannot queue a reply for each.
        let mut undecoded = false;
        // Site consent: a change may close the connections of the services it covers.
        let mut consent = self.consent_gate();
        loop {
            let ready = accepting && self.tunnel_services.is_some();
            let room = self.backlog.len() < BACKLOG_LIMIT;
            tokio::select! {
                _ = cancel.cancelled() => return SessionEnd::Cancelled,
                _ = &mut idle_check, if !idle.is_zero() => {
                    let deadline = last_rx + idle;
                    if Instant::now() >= deadline && self.pong_seen {
                        return SessionEnd::Lost(format!(
                            "nothing received for {idle:?} (no data, no ping, no pong): the link is dead"
                        ));
                    }
                    idle_check.as_mut().reset(deadline.max(Instant::now() + idle / 4));
                }
                ws = incoming.next(), if room && !undecoded => {
                    match self.on_ws(ws, &mut reader, cancel).await {
                        Ok(more) => undecoded = more,
                        Err(end) => return end,
                    }
                    // Received now; and a stall while handling it paused reading, so the
                    // peer gets a fresh idle window from its end.
                    last_rx = Instant::now();
                }
                _ = std::future::ready(()), if room && undecoded => {
                    match self.decode(&mut reader, cancel).await {
                        Ok(more) => undecoded = more,
                        Err(end) => return end,
                    }
                    last_rx = Instant::now();
                }
                _ = sweep.tick() => self.sweep(),
                () = consent.changed() => self.on_consent(&consent),
                Some(exit) = self.tasks.join_next() => self.on_conn_exit(exit),
                Some(accepted) = accepts.recv(), if ready => self.on_accept(accepted),
                Some(service) = next_waiting(&self.waiting, self.table), if !self.waiting.is_empty() => {
                    self.resume_waiting(service)
                }
                Ok(permit) = out.reserve(), if !self.backlog.is_empty() => {
                    self.send_backlogged(permit)
                }
                done = &mut *writer => return writer_ended(done),
            }
        }
    }

    /// The oldest control message waiting for the writer goes into the room it made.
    fn send_backlogged(&mut self, permit: mpsc::Permit<'_, Outbound>) {
        if let Some((msg, queued)) = self.backlog.pop_front() {
            permit.send(Outbound::Frame(msg));
            if let Some(q) = queued {
                let _ = q.send(());
            }
        }
    }

    /// Closes every local connection of the session: each first delivers what is already
    /// queued for its local socket (within `close_linger`); then the rest are aborted.
    pub async fn shutdown(&mut self) {
        close_all(self.table.reset_all(), End::TunnelEnded);
        let tasks = &mut self.tasks;
        let flushed = tokio::time::timeout(self.limits.close_linger, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if flushed.is_err() {
            self.tasks.shutdown().await;
        }
    }

    async fn on_ws(
        &mut self,
        ws: Option<Result<WsMessage, tungstenite::Error>>,
        reader: &mut FrameReader<FrameCodec>,
        cancel: &CancellationToken,
    ) -> Result<bool, SessionEnd> {
        match ws {
            None => Err(SessionEnd::Lost(
                "websocket ended without a close frame".into(),
            )),
            Some(Err(e)) => Err(SessionEnd::Lost(format!("websocket read failed: {e}"))),
            Some(Ok(WsMessage::Binary(data))) => {
                trace!(bytes = data.len(), "websocket message");
                reader.push(data);
                self.decode(reader, cancel).await
            }
            Some(Ok(WsMessage::Text(_))) => self
                .violation(None, ProtocolError::TextFrame)
                .map(|()| false),
            Some(Ok(WsMessage::Close(frame))) => Err(SessionEnd::Closed(frame)),
            Some(Ok(WsMessage::Pong(_))) => {
                // The service may not answer pings (docs/protocol.md §1.5); once it does, the idle
                // timeout applies to this websocket.
                let n = self.stats.pongs_received.fetch_add(1, Ordering::Relaxed);
                if !self.pong_seen {
                    self.pong_seen = true;
                    debug!(
                        pongs = n + 1,
                        "the service answers pings: idle timeout armed"
                    );
                }
                Ok(false)
            }
            // tungstenite answers pings itself.
            Some(Ok(_)) => Ok(false),
        }
    }

    /// Decodes and handles the frames buffered in `reader` while the backlog has room;
    /// `Ok(true)` when it stopped for the backlog with frames left.
    async fn decode(
        &mut self,
        reader: &mut FrameReader<FrameCodec>,
        cancel: &CancellationToken,
    ) -> Result<bool, SessionEnd> {
        while self.backlog.len() < BACKLOG_LIMIT {
            match reader.next_frame() {
                Ok(Some(msg)) => {
                    self.on_message(msg, cancel).await?;
                }
                Ok(None) => return Ok(false),
                // The length prefix still delimits the next frame.
                Err(e) => self.violation(None, e)?,
            }
        }
        Ok(true)
    }

    async fn on_message(
        &mut self,
        msg: Message,
        cancel: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        let kind = match protocol::admit(self.mode(), &msg) {
            Ok(Incoming::Ignore) => {
                trace!(kind = msg.r#type, stream = msg.stream_id, "ignored message");
                return Ok(());
            }
            Ok(Incoming::Handle(kind)) => kind,
            Err(e) => return self.violation(Some(&msg), e),
        };
        match kind {
            MessageType::Data => self.on_data(msg, cancel).await,
            MessageType::StreamStart => self.on_stream_start(msg),
            MessageType::ConnectionStart => self.on_connection_start(msg)?,
            MessageType::StreamReset => self.on_stream_reset(&msg),
            MessageType::ConnectionReset => self.on_connection_reset(&msg),
            MessageType::SessionReset => self.on_session_reset(),
            MessageType::ServiceIds => self.on_service_ids(msg),
            MessageType::Unknown => {}
        }
        Ok(())
    }

    /// A bad message from the peer ends only what it belongs to (`protocol::violation_scope`).
    fn violation(&mut self, msg: Option<&Message>, e: ProtocolError) -> Result<(), SessionEnd> {
        let n = self.stats.protocol_errors.fetch_add(1, Ordering::Relaxed) + 1;
        match protocol::violation_scope(msg.map(|m| m.stream_id), &e) {
            Violation::Session => Err(SessionEnd::Protocol(e)),
            Violation::ResetStream => {
                let Some(m) = msg else { return Ok(()) };
                if let Some(suppressed) = self.stats.logs.admit(Kind::Violation) {
                    warn!(service = ?m.service_id, stream = m.stream_id, violations = n, suppressed, "bad message from the peer: {e}; resetting its stream");
                }
                let closed = self.table.reset_stream(&m.service_id, m.stream_id);
                close_all(closed.unwrap_or_default(), End::Reset);
                self.send(Message::stream_reset(m.stream_id, &m.service_id));
                Ok(())
            }
            Violation::Drop => {
                if let Some(suppressed) = self.stats.logs.admit(Kind::Violation) {
                    warn!(
                        violations = n,
                        suppressed, "bad message from the peer dropped: {e}"
                    );
                }
                Ok(())
            }
        }
    }

    /// Queues a control message without ever waiting: the session is the websocket's only
    /// reader, and blocking it on the writer could close a wait cycle through the service's
    /// relay. Order is kept: once anything is in the backlog, everything goes behind it.
    fn send(&mut self, msg: Message) {
        self.send_then(msg, None);
    }

    /// As `send`; `queued` fires once the message is in the writer's queue.
    fn send_then(&mut self, msg: Message, queued: Option<oneshot::Sender<()>>) {
        match msg.kind() {
            Some(MessageType::StreamReset) => {
                self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
                self.table.reset_sent(&msg.service_id, msg.stream_id);
            }
            Some(MessageType::ConnectionReset) => {
                self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        if self.backlog.is_empty() {
            match self.out.try_send(Outbound::Frame(msg)) {
                Ok(()) => {
                    if let Some(q) = queued {
                        let _ = q.send(());
                    }
                }
                Err(TrySendError::Full(Outbound::Frame(msg))) => {
                    self.backlog.push_back((msg, queued))
                }
                // A closed writer ends the session through its own select arm.
                Err(_) => {}
            }
        } else {
            self.backlog.push_back((msg, queued));
        }
    }

    fn on_stream_reset(&mut self, msg: &Message) {
        self.stats
            .stream_resets_received
            .fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|s| s.resets_received += 1);
        match self.table.reset_stream(&msg.service_id, msg.stream_id) {
            Some(closed) => {
                if let Some(suppressed) = self.stats.logs.admit(Kind::PeerReset) {
                    info!(
                        service = ?msg.service_id, stream = msg.stream_id, closed = closed.len(),
                        suppressed, "stream reset by peer"
                    );
                }
                close_all(closed, End::ClientClosed);
            }
            None => trace!(service = ?msg.service_id, stream = msg.stream_id, "stale STREAM_RESET"),
        }
    }

    fn on_connection_reset(&mut self, msg: &Message) {
        self.stats
            .connection_resets_received
            .fetch_add(1, Ordering::Relaxed);
        let conn = connection_key(msg.connection_id);
        let closed = self
            .table
            .reset_connection(&msg.service_id, msg.stream_id, conn);
        debug!(
            service = ?msg.service_id, stream = msg.stream_id, conn,
            found = closed.is_some(), "connection reset by peer"
        );
        close_all(closed, End::ClientClosed);
    }

    fn on_session_reset(&mut self) {
        self.stats
            .session_resets_received
            .fetch_add(1, Ordering::Relaxed);
        self.state.send_modify(|s| s.resets_received += 1);
        let closed = self.table.reset_all();
        info!(
            closed = closed.len(),
            "session reset by the service: every stream closed"
        );
        close_all(closed, End::Reset);
    }

    fn on_service_ids(&mut self, msg: Message) {
        if self.tunnel_services.is_some() {
            debug!("SERVICE_IDS during the session ignored");
            return;
        }
        let ids = protocol::distinct_services(msg.available_service_ids);
        info!(services = ?ids, "tunnel services");
        match &self.role {
            Role::Destination(map, ..) => {
                let unmapped = map.current().unmapped(&ids);
                if !unmapped.is_empty() {
                    warn!(services = ?unmapped, "services not in the service map: their streams will be refused");
                }
            }
            Role::Source(_) => {}
        }
        self.tunnel_services = Some(ids);
        self.state.send_modify(|s| s.phase = Phase::Ready);
    }

    /// A connection task ended. If it ended on its own (not reset by the peer), tell the
    /// peer, after the data the task already queued.
    fn on_conn_exit(&mut self, exit: Result<ConnExit, JoinError>) {
        let Ok(exit) = exit else {
            return; // aborted by us
        };
        let ConnExit { ids, cause } = exit;
        let ConnIds {
            id,
            service,
            stream_id: stream,
            conn_id: conn,
            wire_conn: wire,
            ..
        } = ids;
        if self
            .table
            .remove_if(&service, conn, |h| h.id() == id)
            .is_none()
        {
            return;
        }
        let reset = match cause {
            ExitCause::ConnectFailed { by_stream_start } => {
                if by_stream_start {
                    drop(self.table.reset_stream(&service, stream));
                }
                protocol::reset_on_connect_failure(by_stream_start, stream, &service, wire)
            }
            ExitCause::LocalClosed => {
                if wire == 0 {
                    drop(self.table.reset_stream(&service, stream));
                }
                protocol::reset_on_local_close(stream, &service, wire)
            }
            ExitCause::Flushed => return,
        };
        debug!(service = ?service, stream, conn, kind = ?reset.kind(), "local side ended");
        self.send(reset);
    }
}
