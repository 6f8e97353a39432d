//! One websocket session: reads tunnel frames, applies them to the stream table, opens and
//! closes local connections, and reports local events back as resets. Ends on close, loss,
//! protocol error or cancellation; every local connection of the session ends with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

use super::local::{ConnExit, ConnHandle, ConnTask, ExitCause, LocalStream, Open, OpenGuard};
use super::log_rate::Kind;
use super::source::Accepted;
use super::streams::{Route, StreamTable};
use super::ws::{Outbound, WsStream};
use super::{Limits, Phase, State, Stats};
use crate::protocol::{
    self, Format, FrameCodec, FrameReader, Incoming, Message, MessageType, Mode, ProtocolError,
    Violation, connection_key,
};
use crate::services::{LocalEndpoint, Scope, SharedServiceMap};

pub enum SessionEnd {
    Closed(Option<CloseFrame>),
    Cancelled,
    Lost(String),
    Protocol(ProtocolError),
}

/// A service whose waiting client can go now: its stream has ended.
fn next_waiting(
    waiting: &HashMap<String, VecDeque<LocalStream>>,
    table: &StreamTable<ConnHandle>,
) -> std::future::Ready<Option<String>> {
    let free = waiting
        .keys()
        .find(|s| table.active_stream(s).is_none())
        .cloned();
    std::future::ready(free)
}

/// Why a destination connects a new stream nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refused {
    /// Outside the tunnel's scope (`Scope::admits`).
    OutOfScope,
    /// Not in the thing's service map.
    Unmapped,
}

/// What differs between the two ends.
pub enum Role<'a> {
    Destination(&'a SharedServiceMap, &'a Scope),
    Source(Format),
}

pub struct Session<'a> {
    pub role: Role<'a>,
    pub limits: Limits,
    pub stats: &'a Arc<Stats>,
    pub state: &'a tokio::sync::watch::Sender<State>,
    pub table: &'a mut StreamTable<ConnHandle>,
    pub out: mpsc::Sender<Outbound>,
    pub tasks: JoinSet<ConnExit>,
    /// Services of the tunnel, once SERVICE_IDS arrived.
    pub tunnel_services: Option<Vec<String>>,
    pub next_id: u64,
    /// Source, V1/V2 peers: clients waiting for the service's one connection to end.
    pub waiting: HashMap<String, VecDeque<LocalStream>>,
    /// Control messages waiting for room in the writer's queue. While it holds
    /// `BACKLOG_LIMIT` messages the websocket is not read, so a peer that provokes replies
    /// faster than they can be sent is slowed down, not buffered.
    pub backlog: VecDeque<(Message, Option<oneshot::Sender<()>>)>,
    /// The agent's byte budget: every payload held for a local socket takes its share.
    pub budget: super::TunnelBudget,
    /// Bytes read from local sockets and not yet framed: this tunnel's upward budget.
    pub upward: Arc<Semaphore>,
    /// (service, connection, task id, bytes written) of the connected holders at the last
    /// sweep: who made no progress since (see `sweep`).
    pub swept: Vec<(String, u32, u64, u64)>,
    /// A pong arrived on this websocket: the service answers pings.
    pub pong_seen: bool,
    /// Where host-name services resolve, bounded.
    pub lookups: crate::lookup::Lookups,
}

/// Rule (stalled consumer): a consumer holding bytes that wrote less than one full payload
/// in a `stall_timeout` window is stalled, even if it trickles: it would hold the whole
/// tunnel (every stream waits behind it) for as long as it pleases.
pub fn stalled(written_before: u64, written_now: u64) -> bool {
    written_now.saturating_sub(written_before) < crate::protocol::MAX_PAYLOAD as u64
}

/// Control messages waiting for the writer before the websocket reader pauses.
pub const BACKLOG_LIMIT: usize = 64;

/// Rule (bounded memory): what is queued toward a local socket is a copy of the bytes that
/// the socket did not take at once (`ConnHandle::write_through`). A payload is a slice of
/// its websocket message, which may be tungstenite's read buffer or a reassembled message
/// twice its size: queued as a slice, a small payload would keep all of that alive.
pub fn remainder_to_queue(payload: &Bytes, written: usize) -> Bytes {
    Bytes::copy_from_slice(&payload[written..])
}

type Writer = tokio_util::task::AbortOnDropHandle<Result<(), tungstenite::Error>>;

impl Session<'_> {
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
                Some(exit) = self.tasks.join_next() => self.on_conn_exit(exit),
                Some(accepted) = accepts.recv(), if ready => self.on_accept(accepted),
                Some(service) = next_waiting(&self.waiting, self.table), if !self.waiting.is_empty() => {
                    self.resume_waiting(service)
                }
                Ok(permit) = out.reserve(), if !self.backlog.is_empty() => {
                    if let Some((msg, queued)) = self.backlog.pop_front() {
                        permit.send(Outbound::Frame(msg));
                        if let Some(q) = queued {
                            let _ = q.send(());
                        }
                    }
                }
                done = &mut *writer => {
                    let why = match done {
                        Ok(Ok(())) => "websocket writer stopped".to_owned(),
                        Ok(Err(e)) => format!("websocket write failed: {e}"),
                        Err(e) => format!("websocket writer failed: {e}"),
                    };
                    return SessionEnd::Lost(why);
                }
            }
        }
    }

    /// Closes every local connection of the session: each first delivers what is already
    /// queued for its local socket (within `close_linger`); then the rest are aborted.
    pub async fn shutdown(&mut self) {
        drop(self.table.reset_all());
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
                drop(self.table.reset_stream(&m.service_id, m.stream_id));
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

    /// Backpressure policy: a full connection queue, or a spent byte budget, pauses the
    /// websocket reader (and so the whole tunnel) for at most `stall_timeout`, counted once
    /// the connection is up. Then connections whose local consumer made no progress are
    /// reset, so the others go on.
    async fn on_data(&mut self, msg: Message, cancel: &CancellationToken) {
        let (service, stream) = (msg.service_id, msg.stream_id);
        let key = connection_key(msg.connection_id);
        let handle = match self.table.route(&service, stream, key) {
            Route::Deliver(h) => h,
            Route::StaleStream => {
                if self.table.answer_stray_data(&service, stream) {
                    debug!(service = ?service, stream, "DATA for a stream that is not active: resetting it");
                    self.send(Message::stream_reset(stream, &service));
                }
                return;
            }
            Route::UnknownConnection => {
                debug!(service = ?service, stream, conn = key, "no such connection: dropping DATA");
                return;
            }
        };
        let payload = {
            // The slice of the websocket message goes at the end of this block: only the
            // copy of what the socket did not take may outlive it.
            let sliced = msg.payload;
            let n = sliced.len() as u64;
            self.stats.bytes_from_tunnel.fetch_add(n, Ordering::Relaxed);
            let through = handle.write_through(&sliced);
            if through == sliced.len() {
                return;
            }
            remainder_to_queue(&sliced, through)
        };
        let len = payload.len();
        let budget = self.budget.try_acquire(len as u32);
        // Count the bytes before the chunk becomes visible to the receiver, which subtracts
        // them: a slot first, then the count, then the send.
        let waiting = match budget {
            Some(permit) => match handle.tx.try_reserve() {
                Ok(slot) => {
                    ConnHandle::note_queued(&handle.queued, len, self.stats);
                    slot.send((payload, permit));
                    return;
                }
                // The task is ending; its exit is handled in `on_conn_exit`.
                Err(TrySendError::Closed(())) => return,
                Err(TrySendError::Full(())) => Some(permit),
            },
            None => None,
        };
        self.stall(payload, waiting, &service, stream, key, cancel)
            .await;
    }

    /// Waits for a queue slot and budget for one payload; see `on_data`. The websocket is
    /// not read meanwhile. After each `stall_timeout` without room, every connected
    /// connection that holds bytes and is `stalled` is reset (this one included); this one
    /// is also reset if it did not connect within one connect attempt. A consumer that
    /// keeps writing at least a payload per window is waited for: that is backpressure.
    async fn stall(
        &mut self,
        payload: Bytes,
        mut permit: Option<super::BudgetPermit>,
        service: &str,
        stream: i32,
        key: u32,
        cancel: &CancellationToken,
    ) {
        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        let len = payload.len();
        let stall = self.limits.stall_timeout;
        // Data queued for a connection still connecting waits for one connect attempt.
        let connect_limit = self.limits.connect_timeout.saturating_add(stall);
        loop {
            let Some(handle) = self.table.get(service, key) else {
                return;
            };
            let (tx, queued, id) = (handle.tx.clone(), handle.queued.clone(), handle.id);
            let mut connected = handle.connected.clone();
            let before = self.progress_snapshot();
            let budget = self.budget.clone();
            let acquire = async {
                let permit = match permit.take() {
                    Some(p) => p,
                    None => budget.acquire(len as u32).await?,
                };
                let slot = tx.reserve().await.ok()?;
                Some((slot, permit))
            };
            // A connection still connecting is not a stalled consumer, unless it takes
            // longer than any connect could.
            let deadline = async {
                let up = tokio::time::timeout(connect_limit, async {
                    connected.wait_for(|up| *up).await.is_ok()
                })
                .await;
                match up {
                    Ok(true) => tokio::time::sleep(stall).await,
                    // The task ended: `acquire` fails at once.
                    Ok(false) => std::future::pending().await,
                    Err(_) => {}
                }
            };
            let gone = tx.clone();
            let waited = tokio::select! {
                _ = cancel.cancelled() => return,
                // The task ended (its exit is handled in `on_conn_exit`): nothing to wait for.
                _ = gone.closed() => return,
                r = acquire => Some(r),
                _ = deadline => None,
            };
            match waited {
                Some(Some((slot, permit))) => {
                    ConnHandle::note_queued(&queued, len, self.stats);
                    slot.send((payload, permit));
                    return;
                }
                Some(None) => return,
                None => {
                    self.reset_idle_holders(&before);
                    let Some(up) = self
                        .table
                        .get(service, key)
                        .filter(|h| h.id == id)
                        .map(|h| *h.connected.borrow())
                    else {
                        return;
                    };
                    if !up {
                        self.reset_stalled(service, stream, key, id);
                        return;
                    }
                    // It wrote, or others freed the budget: wait again (holding on to a
                    // queue permit is not needed; it is re-acquired).
                }
            }
        }
    }

    /// Under budget pressure (`Budget::scarce`), resets the connected holders that wrote
    /// nothing since the previous sweep: the budget is shared with other tunnels, whose
    /// readers would otherwise wait on consumers only this session can reset. Called every
    /// `stall_timeout`.
    pub fn sweep(&mut self) {
        let before = std::mem::take(&mut self.swept);
        if self.budget.shared.scarce() {
            self.reset_idle_holders(&before);
        }
        self.swept = self.progress_snapshot();
    }

    /// (service, connection, task id, bytes written so far) of every connected connection
    /// holding bytes: who made progress while the reader waited.
    fn progress_snapshot(&self) -> Vec<(String, u32, u64, u64)> {
        self.table
            .connections()
            .filter(|(_, _, h)| h.queued.load(Ordering::Relaxed) > 0 && *h.connected.borrow())
            .map(|(s, k, h)| (s.to_owned(), k, h.id, h.written.load(Ordering::Relaxed)))
            .collect()
    }

    /// Resets the connections of `before` that still hold bytes and wrote none since.
    fn reset_idle_holders(&mut self, before: &[(String, u32, u64, u64)]) -> usize {
        let mut reset = 0;
        for (service, key, id, written) in before {
            let idle = self.table.get(service, *key).is_some_and(|h| {
                h.id == *id
                    && stalled(*written, h.written.load(Ordering::Relaxed))
                    && h.queued.load(Ordering::Relaxed) > 0
            });
            if idle {
                let stream = self.table.active_stream(service).unwrap_or(0);
                self.reset_stalled(service, stream, *key, *id);
                reset += 1;
            }
        }
        reset
    }

    fn reset_stalled(&mut self, service: &str, stream: i32, key: u32, id: u64) {
        let wire = self.table.wire_connection_id(service, key);
        let Some(handle) = self.table.remove_if(service, key, |h| h.id == id) else {
            return;
        };
        handle.reset.cancel();
        self.stats.stall_resets.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.stats.logs.admit(Kind::Stall) {
            warn!(
                service = ?service, stream, conn = key, suppressed,
                "local consumer stopped reading for {:?}: resetting this connection to keep the tunnel moving",
                self.limits.stall_timeout
            );
        }
        if wire == 0 {
            drop(self.table.reset_stream(service, stream));
        }
        self.send(protocol::reset_on_local_close(stream, service, wire));
    }

    /// Where a new stream or connection of `service` goes: nowhere unless the tunnel's
    /// scope admits it (`Scope::admits`) and its thing's map has it. A refusal is counted
    /// and logged (rate-limited) with the service; the span names the tunnel.
    fn endpoint_for(&mut self, service: &str, stream: i32) -> Result<LocalEndpoint, Refused> {
        let Role::Destination(map, scope) = self.role else {
            return Err(Refused::Unmapped);
        };
        let (refused, why) = if !scope.admits(service, self.services()) {
            (
                Refused::OutOfScope,
                "the tunnel was not opened for this service",
            )
        } else if let Some(endpoint) = map.current().resolve(service, self.services()) {
            return Ok(endpoint.clone());
        } else {
            (Refused::Unmapped, "the service is not in the service map")
        };
        let n = self.stats.refused_streams.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) {
            warn!(
                service = ?service, stream, tunnel_services = %scope, refused = n, suppressed,
                "refusing stream: {why}"
            );
        }
        Err(refused)
    }

    fn services(&self) -> &[String] {
        self.tunnel_services.as_deref().unwrap_or(&[])
    }

    fn on_stream_start(&mut self, msg: Message) {
        // A source opens streams itself; one from its peer is not for it to answer.
        if !matches!(self.role, Role::Destination(..)) {
            return;
        }
        let (service, stream, conn) = (msg.service_id, msg.stream_id, msg.connection_id);
        let Ok(endpoint) = self.endpoint_for(&service, stream) else {
            self.send(Message::stream_reset(stream, &service));
            return;
        };
        let format = protocol::format_of_stream_start(&service, conn);
        let replaced = self
            .table
            .start_stream(&service, stream, format == Format::V3);
        if !replaced.is_empty()
            && let Some(suppressed) = self.stats.logs.admit(Kind::Replace)
        {
            info!(service = ?service, stream, closed = replaced.len(), suppressed, "new stream replaces the active one");
        }
        drop(replaced);
        debug!(service = ?service, stream, conn, ?format, "stream start");
        let open = Open::Connect {
            endpoint,
            by_stream_start: true,
        };
        self.open_local(service, stream, connection_key(conn), open);
    }

    fn on_connection_start(&mut self, msg: Message) -> Result<(), SessionEnd> {
        if !matches!(self.role, Role::Destination(..)) {
            return Ok(());
        }
        if self.table.active_stream(&msg.service_id) == Some(msg.stream_id)
            && !self.table.has_wire_ids(&msg.service_id)
        {
            return self.violation(Some(&msg), ProtocolError::ConnectionOnSingleStream);
        }
        let (service, stream, conn) = (msg.service_id, msg.stream_id, msg.connection_id);
        match self.table.active_stream(&service) {
            None => {
                // The source believes in a stream we do not have (we were reset, it was
                // not): reset it so its next connection starts a fresh stream.
                debug!(service = ?service, stream, "CONNECTION_START without a stream: resetting it");
                self.send(Message::stream_reset(stream, &service));
                return Ok(());
            }
            Some(active) if active != stream => {
                trace!(service = ?service, stream, active, "stale CONNECTION_START dropped");
                return Ok(());
            }
            Some(_) => {}
        }
        let conn = connection_key(conn);
        if self.table.contains(&service, conn) {
            if let Some(suppressed) = self.stats.logs.admit(Kind::Replace) {
                warn!(service = ?service, stream, conn, suppressed, "CONNECTION_START reuses a live connection id: resetting it");
            }
            drop(self.table.reset_connection(&service, stream, conn));
            self.send(Message::connection_reset(stream, &service, conn));
            return Ok(());
        }
        let endpoint = match self.endpoint_for(&service, stream) {
            Ok(endpoint) => endpoint,
            Err(Refused::OutOfScope) => {
                drop(self.table.reset_stream(&service, stream));
                self.send(Message::stream_reset(stream, &service));
                return Ok(());
            }
            // Removed from the map by a reload while its stream was open.
            Err(Refused::Unmapped) => {
                self.send(Message::connection_reset(stream, &service, conn));
                return Ok(());
            }
        };
        let open = Open::Connect {
            endpoint,
            by_stream_start: false,
        };
        self.open_local(service, stream, conn, open);
        Ok(())
    }

    /// Registers the connection (its queue exists at once, so DATA that arrives while the
    /// local connect is under way waits in it) and starts its task. The limit counts running
    /// tasks, so connections that were reset but are still flushing count too.
    fn open_local(&mut self, service: String, stream: i32, conn: u32, open: Open) {
        let wire = self.table.wire_connection_id(&service, conn);
        let running = self.stats.open_connections.load(Ordering::Relaxed);
        if running >= self.limits.max_connections {
            if let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) {
                warn!(
                    service = ?service, stream, conn, suppressed,
                    "refusing connection: {running} connections already open on this tunnel (limits.max_connections_per_tunnel)"
                );
            }
            let by_stream_start = match &open {
                Open::Connect {
                    by_stream_start, ..
                }
                | Open::Accepted {
                    by_stream_start, ..
                } => *by_stream_start,
            };
            if by_stream_start {
                self.table.refuse_start(&service, stream);
            }
            let reset = protocol::reset_on_connect_failure(by_stream_start, stream, &service, wire);
            self.send(reset);
            return;
        }
        let (tx, rx) = mpsc::channel(self.limits.queue_depth.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let (closing, reset) = (CancellationToken::new(), CancellationToken::new());
        let (connected_tx, connected) = tokio::sync::watch::channel(false);
        let sink = super::local::Sink::default();
        self.next_id += 1;
        let task = ConnTask {
            id: self.next_id,
            service: service.clone(),
            stream_id: stream,
            conn_id: conn,
            wire_conn: wire,
            rx,
            queued: queued.clone(),
            written: written.clone(),
            out: self.out.clone(),
            closing: closing.clone(),
            reset: reset.clone(),
            connected: connected_tx,
            sink: sink.clone(),
            upward: self.upward.clone(),
            limits: self.limits,
            stats: self.stats.clone(),
            lookups: self.lookups.clone(),
            open: Arc::new(OpenGuard::new(self.stats.clone(), &service)),
        };
        // Inherit the session's span so connection logs carry the tunnel and token.
        self.tasks
            .spawn(task.run(open).instrument(tracing::Span::current()));
        let handle = ConnHandle {
            id: self.next_id,
            tx,
            queued,
            written,
            reset,
            closing,
            connected,
            sink,
        };
        self.table.insert(&service, conn, handle);
        self.stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
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
    }

    fn on_service_ids(&mut self, msg: Message) {
        if self.tunnel_services.is_some() {
            debug!("SERVICE_IDS during the session ignored");
            return;
        }
        let ids = protocol::distinct_services(msg.available_service_ids);
        info!(services = ?ids, "tunnel services");
        match &self.role {
            Role::Destination(map, _) => {
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

    /// Source: a local client connected; open a stream, or another connection on it (V3).
    fn on_accept(&mut self, accepted: Accepted) {
        let Role::Source(format) = self.role else {
            return;
        };
        let Some(service) = self.wire_service(&accepted.service, format) else {
            return;
        };
        // As `open_local`: running tasks count, flushing ones included.
        let waiting: usize = self.waiting.values().map(VecDeque::len).sum();
        let running = self.stats.open_connections.load(Ordering::Relaxed);
        if running + waiting >= self.limits.max_connections {
            if let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) {
                warn!(service = ?service, suppressed, "refusing local client: {} connections already open", self.limits.max_connections);
            }
            return;
        }
        if format != Format::V3 && self.table.active_stream(&service).is_some() {
            // Like the reference proxy: the client waits until the active one ends.
            debug!(service = ?service, "client waits: a {format:?} destination carries one connection per service at a time");
            self.waiting
                .entry(service)
                .or_default()
                .push_back(accepted.stream);
            return;
        }
        self.open_source_connection(service, format, accepted.stream);
    }

    fn resume_waiting(&mut self, service: String) {
        let Role::Source(format) = self.role else {
            return;
        };
        let Some(queue) = self.waiting.get_mut(&service) else {
            return;
        };
        let next = queue.pop_front();
        if queue.is_empty() {
            self.waiting.remove(&service);
        }
        if let Some(stream) = next {
            self.open_source_connection(service, format, stream);
        }
    }

    fn open_source_connection(&mut self, service: String, format: Format, local: LocalStream) {
        let (stream, conn, msg) = match self.table.active_stream(&service) {
            Some(stream) if format == Format::V3 => {
                let conn = self.table.next_connection_id(&service);
                (
                    stream,
                    conn,
                    Message::connection_start(stream, &service, conn),
                )
            }
            _ => {
                let v3 = format == Format::V3;
                let stream = self.table.open_stream(&service, v3);
                // V1/V2 destinations get no connection id; the table keys it as 1.
                let (key, wire) = if v3 {
                    let c = self.table.next_connection_id(&service);
                    (c, c)
                } else {
                    (1, 0)
                };
                (stream, key, Message::stream_start(stream, &service, wire))
            }
        };
        debug!(service = ?service, stream, conn, kind = ?msg.kind(), "opening tunnel connection");
        let msg_starts_stream = msg.kind() == Some(MessageType::StreamStart);
        // Starts keep their order; the task sends data only once its start is queued.
        let (queued, started) = oneshot::channel();
        self.send_then(msg, Some(queued));
        let by_stream_start = msg_starts_stream;
        let open = Open::Accepted {
            local,
            started,
            by_stream_start,
        };
        self.open_local(service, stream, conn, open);
    }

    /// The service id to put on the wire for a listener's service: none for V1 peers; the
    /// tunnel's only service for the unnamed listener.
    fn wire_service(&self, listener: &str, format: Format) -> Option<String> {
        let services = self.services();
        if format == Format::V1 {
            return Some(String::new());
        }
        if listener.is_empty() {
            return match services {
                [one] => Some(one.clone()),
                // As localproxy: a tunnel without services gets no service id.
                [] => Some(String::new()),
                _ => {
                    if let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) {
                        warn!(services = ?services, suppressed, "refusing local client: an unnamed listener needs a tunnel with exactly one service; name the mappings");
                    }
                    None
                }
            };
        }
        if !services.iter().any(|s| s == listener) {
            if let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) {
                warn!(service = ?listener, tunnel = ?services, suppressed, "refusing local client: the tunnel does not offer this service");
            }
            return None;
        }
        Some(listener.to_owned())
    }

    /// A connection task ended. If it ended on its own (not reset by the peer), tell the
    /// peer, after the data the task already queued.
    fn on_conn_exit(&mut self, exit: Result<ConnExit, JoinError>) {
        let Ok(exit) = exit else {
            return; // aborted by us
        };
        let ConnExit {
            id,
            service,
            stream_id: stream,
            conn_id: conn,
            wire_conn: wire,
            cause,
        } = exit;
        if self
            .table
            .remove_if(&service, conn, |h| h.id == id)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_writing_less_than_a_payload_per_window_is_stalled() {
        assert!(stalled(1000, 1000));
        assert!(stalled(1000, 1000 + 64511));
        assert!(!stalled(1000, 1000 + 64512));
        assert!(stalled(5, 0), "a counter that went back is no progress");
    }

    #[test]
    fn what_is_queued_is_a_copy_of_the_unwritten_rest_of_its_message() {
        let message = Bytes::from(vec![7u8; 4000]);
        let inside = message.as_ptr_range();
        let payload = message.slice(1000..3000);
        let rest = remainder_to_queue(&payload, 500);
        assert_eq!(rest, payload.slice(500..));
        assert!(
            !inside.contains(&rest.as_ptr()),
            "a queued slice pins the message"
        );
        // Even a rest that is nearly all of its message: the message may be twice its size.
        let rest = remainder_to_queue(&message, 1);
        assert!(!inside.contains(&rest.as_ptr()));
    }
}
