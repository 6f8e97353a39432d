//! The destination role: a stream or connection start is checked against the tunnel's
//! scope and the thing's map (`endpoint_for`), then its local connection is opened.

use super::*;

impl Session<'_> {
    /// Where a new stream or connection of `service` goes: nowhere unless the tunnel's
    /// scope admits it (`Scope::admits`) and its thing's map has it. A refusal is counted
    /// and logged (rate-limited) with the service; the span names the tunnel.
    pub(super) fn endpoint_for(
        &mut self,
        service: &str,
        stream: i32,
    ) -> Result<LocalEndpoint, Refused> {
        let Role::Destination(map, scope, consent) = self.role else {
            return Err(Refused::Unmapped);
        };
        let named = scope.named(service, self.services()).unwrap_or(service);
        let (refused, why) = if !scope.admits(service, self.services()) {
            (
                Refused::OutOfScope,
                "the tunnel was not opened for this service",
            )
        } else if !consent.admits(named) {
            (
                Refused::NoConsent,
                "site consent is withheld for this service",
            )
        } else if let Some(endpoint) = map.current().resolve(service, self.services()) {
            return Ok(endpoint.clone());
        } else {
            (Refused::Unmapped, "the service is not in the service map")
        };
        self.stats.refused_streams.fetch_add(1, Ordering::Relaxed);
        self.note_refusal(service, stream, "refusing stream", why);
        Err(refused)
    }

    /// A refusal the peer can provoke at will: one log line and one audit event
    /// (`stream_refused`) within the log's rate (`log_rate::Kind::Refusal`); those beyond it
    /// are counted in the next one's `suppressed`, so a flood cannot rotate the trail away.
    pub(super) fn note_refusal(&mut self, service: &str, stream: i32, what: &str, why: &str) {
        let Some(suppressed) = self.stats.logs.admit(Kind::Refusal) else {
            return;
        };
        let refused = self.stats.refused_streams.load(Ordering::Relaxed);
        warn!(service = ?service, stream, tunnel_services = ?self.services(), refused, suppressed, "{what}: {why}");
        if self.audit.is_on() {
            let e = Event {
                service: Some(self.named(service).to_owned()),
                stream: Some(stream),
                suppressed: (suppressed > 0).then_some(suppressed),
                ..self.audit.event(AuditKind::StreamRefused)
            };
            self.audit.record(&e.because(why));
        }
    }

    /// Site consent changed: the streams of the services it no longer admits are reset,
    /// their local connections closed at once (what is queued for them is dropped).
    pub(super) fn on_consent(&mut self, consent: &Gate) {
        let revoked: Vec<(String, i32)> = self
            .table
            .active_streams()
            .filter(|(service, _)| !consent.admits(self.named(service)))
            .map(|(service, stream)| (service.to_owned(), stream))
            .collect();
        let mut closed = 0;
        for (service, stream) in &revoked {
            let conns = self
                .table
                .reset_stream(service, *stream)
                .unwrap_or_default();
            closed += conns.len();
            conns.into_iter().for_each(|c| c.reset(End::Consent));
            self.send(Message::stream_reset(*stream, service));
        }
        if !revoked.is_empty() {
            let services: Vec<&str> = revoked.iter().map(|(s, _)| self.named(s)).collect();
            info!(
                ?services,
                closed, "site consent withdrawn: closing the connections of these services"
            );
        }
    }

    pub(super) fn services(&self) -> &[String] {
        self.tunnel_services.as_deref().unwrap_or(&[])
    }

    pub(super) fn on_stream_start(&mut self, msg: Message) {
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

    pub(super) fn on_connection_start(&mut self, msg: Message) -> Result<(), SessionEnd> {
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
            close_all(
                self.table.reset_connection(&service, stream, conn),
                End::Reset,
            );
            self.send(Message::connection_reset(stream, &service, conn));
            return Ok(());
        }
        let endpoint = match self.endpoint_for(&service, stream) {
            Ok(endpoint) => endpoint,
            Err(why @ (Refused::OutOfScope | Refused::NoConsent)) => {
                let end = match why {
                    Refused::NoConsent => End::Consent,
                    _ => End::Reset,
                };
                let closed = self.table.reset_stream(&service, stream);
                closed.into_iter().flatten().for_each(|c| c.reset(end));
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
    pub(super) fn open_local(&mut self, service: String, stream: i32, conn: u32, open: Open) {
        let wire = self.table.wire_connection_id(&service, conn);
        let running = self.stats.open_connections.load(Ordering::Relaxed);
        if running >= self.limits.max_connections {
            let why = format!(
                "{running} connections already open on this tunnel (limits.max_connections_per_tunnel)"
            );
            self.note_refusal(
                &service,
                stream,
                &format!("refusing connection {conn}"),
                &why,
            );
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
        self.next_id += 1;
        let ids = ConnIds {
            id: self.next_id,
            service: service.clone(),
            stream_id: stream,
            conn_id: conn,
            wire_conn: wire,
            // Only the audit trail uses it: nothing is held for it without one.
            named: match self.audit.is_on() {
                true => self.named(&service).to_owned(),
                false => String::new(),
            },
        };
        let shared = ConnShared {
            out: self.out.clone(),
            upward: self.upward.clone(),
            limits: self.limits,
            stats: self.stats.clone(),
            lookups: self.lookups.clone(),
            audit: self.audit.clone(),
        };
        let (handle, task) = connection(ids, shared);
        // Inherit the session's span so connection logs carry the tunnel and token.
        self.tasks
            .spawn(task.run(open).instrument(tracing::Span::current()));
        self.table.insert(&service, conn, handle);
        self.stats
            .connections_opened
            .fetch_add(1, Ordering::Relaxed);
    }
}
