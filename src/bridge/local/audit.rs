//! A local connection's audit events: opened (or failed), then closed with its bytes each
//! way, its duration and how it ended. The closing event is written when the connection's
//! task ends, aborted or not.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::ConnIds;
use super::downward::Progress;
use crate::audit::{End, EndCell, Event, Kind, TunnelTrail};

pub(super) struct ConnAudit {
    trail: TunnelTrail,
    service: String,
    stream: i32,
    connection: u32,
    endpoint: Option<String>,
    opened: Option<Instant>,
    /// Bytes read from the local socket and sent into the tunnel.
    pub(super) up: AtomicU64,
    down: Option<Progress>,
    /// How it ended, as the session or the task saw it first.
    pub(super) end: Arc<EndCell>,
}

impl ConnAudit {
    pub(super) fn new(trail: TunnelTrail, ids: &ConnIds, end: Arc<EndCell>) -> Self {
        ConnAudit {
            trail,
            service: ids.named.clone(), // empty without a trail
            stream: ids.stream_id,
            connection: ids.conn_id,
            endpoint: None,
            opened: None,
            up: AtomicU64::new(0),
            down: None,
            end,
        }
    }

    fn event(&self, kind: Kind) -> Event {
        Event {
            service: Some(self.service.clone()),
            stream: Some(self.stream),
            connection: Some(self.connection),
            endpoint: self.endpoint.clone(),
            ..self.trail.event(kind)
        }
    }

    /// The local socket is up (`endpoint`: where it connected; none for an accepted one).
    pub(super) fn opened(&mut self, endpoint: Option<String>, down: Progress) {
        self.opened = Some(Instant::now());
        self.endpoint = endpoint;
        self.down = Some(down);
        if self.trail.is_on() {
            self.trail.record(&self.event(Kind::ConnectionOpened));
        }
    }

    /// The local service could not be reached.
    pub(super) fn failed(&mut self, endpoint: String) {
        self.endpoint = Some(endpoint);
        if self.trail.is_on() {
            let e = self.event(Kind::ConnectionFailed);
            self.trail
                .record(&e.because("the local service could not be reached"));
        }
    }
}

impl Drop for ConnAudit {
    fn drop(&mut self) {
        let Some(opened) = self.opened.filter(|_| self.trail.is_on()) else {
            return;
        };
        let e = Event {
            bytes_from_tunnel: Some(self.down.as_ref().map_or(0, Progress::written)),
            bytes_to_tunnel: Some(self.up.load(Ordering::Relaxed)),
            duration_ms: Some(opened.elapsed().as_millis() as u64),
            ended: Some(self.end.get_or(End::Reset)),
            ..self.event(Kind::ConnectionClosed)
        };
        self.trail.record(&e);
    }
}
