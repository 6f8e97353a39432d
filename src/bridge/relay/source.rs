//! The source role: accepted local clients become tunnel connections (V3), or wait for the
//! service's one connection (V1/V2).

use super::*;

/// A service whose waiting client can go now: its stream has ended.
pub(super) fn next_waiting(
    waiting: &HashMap<String, VecDeque<LocalStream>>,
    table: &StreamTable<ConnHandle>,
) -> std::future::Ready<Option<String>> {
    let free = waiting
        .keys()
        .find(|s| table.active_stream(s).is_none())
        .cloned();
    std::future::ready(free)
}

impl Session<'_> {
    /// Source: a local client connected; open a stream, or another connection on it (V3).
    pub(super) fn on_accept(&mut self, accepted: Accepted) {
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

    pub(super) fn resume_waiting(&mut self, service: String) {
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

    pub(super) fn open_source_connection(
        &mut self,
        service: String,
        format: Format,
        local: LocalStream,
    ) {
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
    pub(super) fn wire_service(&self, listener: &str, format: Format) -> Option<String> {
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
}
