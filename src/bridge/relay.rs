//! One websocket session: reads tunnel frames, applies them to the stream table, opens and
//! closes local connections, and reports local events back as resets. Ends on close, loss,
//! protocol error or cancellation; every local connection of the session ends with it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage, protocol::CloseFrame};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, trace, warn};

use std::collections::{HashMap, VecDeque};

use super::local::{ConnExit, ConnHandle, ConnTask, ExitCause, LocalStream, Open, OpenGuard};
use super::source::Accepted;
use super::streams::{Route, StreamTable};
use super::ws::{Outbound, WsStream};
use super::{Limits, Phase, State, Stats};
use crate::protocol::{
    self, Format, FrameCodec, FrameReader, Incoming, Message, MessageType, Mode, ProtocolError,
};
use crate::services::SharedServiceMap;

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

/// What differs between the two ends.
pub enum Role<'a> {
    Destination(&'a SharedServiceMap),
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
    /// Control messages waiting for room in the writer's queue. Bounded by construction:
    /// each comes from one event on one of at most `max_connections` connections.
    pub backlog: VecDeque<(Message, Option<oneshot::Sender<()>>)>,
}

type Writer = tokio_util::task::AbortOnDropHandle<Result<(), tungstenite::Error>>;

impl Session<'_> {
    fn mode(&self) -> Mode {
        match self.role {
            Role::Destination(_) => Mode::Destination,
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
        // Dead-link detection: anything received (data, ping, pong) proves the link alive.
        // The timer is re-armed lazily, once per idle period, not once per message.
        let idle = self.limits.idle_timeout;
        let mut last_rx = Instant::now();
        let idle_check = tokio::time::sleep(idle);
        tokio::pin!(idle_check);
        loop {
            let ready = accepting && self.tunnel_services.is_some();
            tokio::select! {
                _ = cancel.cancelled() => return SessionEnd::Cancelled,
                _ = &mut idle_check, if !idle.is_zero() => {
                    let deadline = last_rx + idle;
                    if Instant::now() >= deadline {
                        return SessionEnd::Lost(format!(
                            "nothing received for {idle:?} (no data, no ping, no pong): the link is dead"
                        ));
                    }
                    idle_check.as_mut().reset(deadline);
                }
                ws = incoming.next() => {
                    last_rx = Instant::now();
                    if let Err(end) = self.on_ws(ws, &mut reader, cancel).await {
                        return end;
                    }
                }
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

    /// Closes every local connection of the session and waits for their tasks to end.
    pub async fn shutdown(&mut self) {
        drop(self.table.reset_all());
        self.tasks.shutdown().await;
    }

    async fn on_ws(
        &mut self,
        ws: Option<Result<WsMessage, tungstenite::Error>>,
        reader: &mut FrameReader<FrameCodec>,
        cancel: &CancellationToken,
    ) -> Result<(), SessionEnd> {
        match ws {
            None => Err(SessionEnd::Lost(
                "websocket ended without a close frame".into(),
            )),
            Some(Err(e)) => Err(SessionEnd::Lost(format!("websocket read failed: {e}"))),
            Some(Ok(WsMessage::Binary(data))) => {
                reader.push(data).map_err(SessionEnd::Protocol)?;
                while let Some(msg) = reader.next_frame().map_err(SessionEnd::Protocol)? {
                    self.on_message(msg, cancel)
                        .await
                        .map_err(SessionEnd::Protocol)?;
                }
                Ok(())
            }
            Some(Ok(WsMessage::Text(_))) => Err(SessionEnd::Protocol(ProtocolError::TextFrame)),
            Some(Ok(WsMessage::Close(frame))) => Err(SessionEnd::Closed(frame)),
            Some(Ok(WsMessage::Pong(_))) => {
                // Informational only: the service may not answer pings (spec §1.5).
                self.stats.pongs_received.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // tungstenite answers pings itself.
            Some(Ok(_)) => Ok(()),
        }
    }

    async fn on_message(
        &mut self,
        msg: Message,
        cancel: &CancellationToken,
    ) -> Result<(), ProtocolError> {
        let kind = match protocol::admit(self.mode(), &msg)? {
            Incoming::Ignore => {
                trace!(kind = msg.r#type, stream = msg.stream_id, "ignored message");
                return Ok(());
            }
            Incoming::Handle(kind) => kind,
        };
        match kind {
            MessageType::Data => self.on_data(msg, cancel).await,
            MessageType::StreamStart => self.on_stream_start(msg),
            MessageType::ConnectionStart => self.on_connection_start(msg),
            MessageType::StreamReset => self.on_stream_reset(&msg),
            MessageType::ConnectionReset => self.on_connection_reset(&msg),
            MessageType::SessionReset => self.on_session_reset(),
            MessageType::ServiceIds => self.on_service_ids(msg),
            MessageType::Unknown => {}
        }
        Ok(())
    }

    /// Queues a control message without ever waiting: the session is the websocket's only
    /// reader, and blocking it on the writer could close a wait cycle through the service's
    /// relay. Order is kept: once anything is in the backlog, everything goes behind it.
    fn send(&mut self, msg: Message) {
        self.send_then(msg, None);
    }

    /// As `send`; `queued` fires once the message is in the writer's queue.
    fn send_then(&mut self, msg: Message, queued: Option<oneshot::Sender<()>>) {
        if matches!(
            msg.kind(),
            Some(MessageType::StreamReset | MessageType::ConnectionReset)
        ) {
            self.stats.resets_sent.fetch_add(1, Ordering::Relaxed);
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

    /// Backpressure policy: a full connection queue pauses the websocket reader (and so the
    /// whole tunnel) for at most `stall_timeout`; a connection whose local consumer makes no
    /// progress for that long is reset so the other connections go on.
    async fn on_data(&mut self, msg: Message, cancel: &CancellationToken) {
        let (service, stream, conn) = (msg.service_id, msg.stream_id, msg.connection_id);
        let handle = match self.table.route(&service, stream, conn) {
            Route::Deliver(h) => h,
            Route::StaleStream => {
                trace!(service = %service, stream, "stale stream: dropping DATA");
                return;
            }
            Route::UnknownConnection => {
                debug!(service = %service, stream, conn, "no such connection: dropping DATA");
                return;
            }
        };
        let len = msg.payload.len();
        // Count the bytes before the message becomes visible to the receiver, which
        // subtracts them: a permit first, then the count, then the send.
        match handle.tx.try_reserve() {
            Ok(permit) => {
                ConnHandle::note_queued(&handle.queued, len, self.stats);
                permit.send(msg.payload);
                return;
            }
            // The task is ending; its exit is handled in `on_conn_exit`.
            Err(TrySendError::Closed(())) => return,
            Err(TrySendError::Full(())) => {}
        }
        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        let (tx, queued, id) = (handle.tx.clone(), handle.queued.clone(), handle.id);
        let waited = tokio::select! {
            _ = cancel.cancelled() => return,
            r = tokio::time::timeout(self.limits.stall_timeout, tx.reserve()) => r,
        };
        match waited {
            Ok(Ok(permit)) => {
                ConnHandle::note_queued(&queued, len, self.stats);
                permit.send(msg.payload);
            }
            Ok(Err(_)) => {}
            Err(_) => self.reset_stalled(&service, stream, conn, id),
        }
    }

    fn reset_stalled(&mut self, service: &str, stream: i32, conn: u32, id: u64) {
        let Some(handle) = self.table.remove_if(service, conn, |h| h.id == id) else {
            return;
        };
        handle.reset.cancel();
        self.stats.stall_resets.fetch_add(1, Ordering::Relaxed);
        warn!(
            service = %service, stream, conn,
            "local consumer stopped reading for {:?}: resetting this connection to keep the tunnel moving",
            self.limits.stall_timeout
        );
        if conn == 0 {
            drop(self.table.reset_stream(service, stream));
        }
        self.send(protocol::reset_on_local_close(stream, service, conn));
    }

    fn services(&self) -> &[String] {
        self.tunnel_services.as_deref().unwrap_or(&[])
    }

    fn on_stream_start(&mut self, msg: Message) {
        let (service, stream, conn) = (msg.service_id, msg.stream_id, msg.connection_id);
        let Role::Destination(map) = self.role else {
            return;
        };
        let Some(endpoint) = map.current().resolve(&service, self.services()).cloned() else {
            warn!(
                service = %service, stream,
                "refusing stream: service {service:?} is not in the service map"
            );
            self.stats.refused_streams.fetch_add(1, Ordering::Relaxed);
            self.send(Message::stream_reset(stream, &service));
            return;
        };
        let replaced = self.table.start_stream(&service, stream);
        if !replaced.is_empty() {
            info!(service = %service, stream, closed = replaced.len(), "new stream replaces the active one");
        }
        drop(replaced);
        debug!(
            service = %service, stream, conn,
            format = ?protocol::format_of_stream_start(&service, conn), "stream start"
        );
        let open = Open::Connect {
            endpoint,
            by_stream_start: true,
        };
        self.open_local(service, stream, conn, open);
    }

    fn on_connection_start(&mut self, msg: Message) {
        let (service, stream, conn) = (msg.service_id, msg.stream_id, msg.connection_id);
        let Role::Destination(map) = self.role else {
            return;
        };
        match self.table.active_stream(&service) {
            None => {
                // The source believes in a stream we do not have (we were reset, it was
                // not): reset it so its next connection starts a fresh stream.
                debug!(service = %service, stream, "CONNECTION_START without a stream: resetting it");
                self.send(Message::stream_reset(stream, &service));
                return;
            }
            Some(active) if active != stream => {
                trace!(service = %service, stream, active, "stale CONNECTION_START dropped");
                return;
            }
            Some(_) => {}
        }
        if conn == 0 {
            warn!(service = %service, stream, "CONNECTION_START without a connection id ignored");
            return;
        }
        if self.table.contains(&service, conn) {
            warn!(service = %service, stream, conn, "CONNECTION_START reuses a live connection id: resetting it");
            drop(self.table.reset_connection(&service, stream, conn));
            self.send(Message::connection_reset(stream, &service, conn));
            return;
        }
        let Some(endpoint) = map.current().resolve(&service, self.services()).cloned() else {
            self.send(Message::connection_reset(stream, &service, conn));
            return;
        };
        let open = Open::Connect {
            endpoint,
            by_stream_start: false,
        };
        self.open_local(service, stream, conn, open);
    }

    /// Registers the connection (its queue exists at once, so DATA that arrives while the
    /// local connect is under way waits in it) and starts its task.
    fn open_local(&mut self, service: String, stream: i32, conn: u32, open: Open) {
        if self.table.connection_count() >= self.limits.max_connections {
            warn!(
                service = %service, stream, conn,
                "refusing connection: {} connections already open on this tunnel", self.limits.max_connections
            );
            let by_stream_start = matches!(
                open,
                Open::Connect {
                    by_stream_start: true,
                    ..
                }
            );
            let reset = protocol::reset_on_connect_failure(by_stream_start, stream, &service, conn);
            self.send(reset);
            return;
        }
        let (tx, rx) = mpsc::channel(self.limits.queue_depth.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        let (closing, reset) = (CancellationToken::new(), CancellationToken::new());
        self.next_id += 1;
        let task = ConnTask {
            id: self.next_id,
            service: service.clone(),
            stream_id: stream,
            conn_id: conn,
            rx,
            queued: queued.clone(),
            out: self.out.clone(),
            closing: closing.clone(),
            reset: reset.clone(),
            limits: self.limits,
            stats: self.stats.clone(),
            _open: OpenGuard::new(self.stats.clone()),
        };
        // Inherit the session's span so connection logs carry the tunnel and token.
        self.tasks
            .spawn(task.run(open).instrument(tracing::Span::current()));
        let handle = ConnHandle {
            id: self.next_id,
            tx,
            queued,
            reset,
            closing,
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
            Some(closed) => info!(
                service = %msg.service_id, stream = msg.stream_id, closed = closed.len(),
                "stream reset by peer"
            ),
            None => trace!(service = %msg.service_id, stream = msg.stream_id, "stale STREAM_RESET"),
        }
    }

    fn on_connection_reset(&mut self, msg: &Message) {
        self.stats
            .connection_resets_received
            .fetch_add(1, Ordering::Relaxed);
        let closed = self
            .table
            .reset_connection(&msg.service_id, msg.stream_id, msg.connection_id);
        debug!(
            service = %msg.service_id, stream = msg.stream_id, conn = msg.connection_id,
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
        let mut ids = msg.available_service_ids;
        ids.dedup();
        info!(services = ?ids, "tunnel services");
        match &self.role {
            Role::Destination(map) => {
                for s in map.current().unmapped(&ids) {
                    warn!(service = %s, "service {s:?} is not in the service map: its streams will be refused");
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
        let waiting: usize = self.waiting.values().map(VecDeque::len).sum();
        if self.table.connection_count() + waiting >= self.limits.max_connections {
            warn!(service = %service, "refusing local client: {} connections already open", self.limits.max_connections);
            return;
        }
        if format != Format::V3 && self.table.active_stream(&service).is_some() {
            // Like the reference proxy: the client waits until the active one ends.
            debug!(service = %service, "client waits: a {format:?} destination carries one connection per service at a time");
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
                let stream = self.table.open_stream(&service);
                let conn = if format == Format::V3 {
                    self.table.next_connection_id(&service)
                } else {
                    0
                };
                (stream, conn, Message::stream_start(stream, &service, conn))
            }
        };
        debug!(service = %service, stream, conn, kind = ?msg.kind(), "opening tunnel connection");
        // Starts keep their order; the task sends data only once its start is queued.
        let (queued, started) = oneshot::channel();
        self.send_then(msg, Some(queued));
        let open = Open::Accepted { local, started };
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
                _ => {
                    warn!(services = ?services, "refusing local client: an unnamed listener needs a tunnel with exactly one service; name the mappings");
                    None
                }
            };
        }
        if !services.iter().any(|s| s == listener) {
            warn!(service = %listener, tunnel = ?services, "refusing local client: the tunnel does not offer this service");
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
                protocol::reset_on_connect_failure(by_stream_start, stream, &service, conn)
            }
            ExitCause::LocalClosed => {
                if conn == 0 {
                    drop(self.table.reset_stream(&service, stream));
                }
                protocol::reset_on_local_close(stream, &service, conn)
            }
            ExitCause::Flushed => return,
        };
        debug!(service = %service, stream, conn, kind = ?reset.kind(), "local side ended");
        self.send(reset);
    }
}
