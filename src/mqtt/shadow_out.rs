//! The shadow document's way out (`[shadow] enabled`): the agent's latest `shadow::Report`,
//! paced by `shadow::Pacer`, published QoS 1 by the connection's client while connected.

use std::time::SystemTime;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::in_flight::InFlight;
use crate::shadow::{Pacer, Report, document, policy_statement, topic};

pub(super) struct ShadowOut {
    thing: String,
    topic: String,
    reports: watch::Receiver<Report>,
    pacer: Pacer,
    /// Unix time of the last CONNACK.
    connected_since: u64,
    /// The document queued or unacknowledged: one at a time.
    flight: InFlight,
}

impl ShadowOut {
    pub(super) fn new(thing: &str, reports: watch::Receiver<Report>) -> Self {
        ShadowOut {
            thing: thing.to_owned(),
            topic: topic(thing),
            reports,
            pacer: Pacer::default(),
            connected_since: 0,
            flight: InFlight::default(),
        }
    }

    /// Whether `topic` is the shadow's (the client publishes nothing else).
    pub(super) fn is_ours(&self, topic: &str) -> bool {
        topic == self.topic
    }

    /// The queued document went out as packet `pkid`.
    pub(super) fn sent(&mut self, pkid: u16) {
        self.flight.sent(pkid);
    }

    /// A PUBACK: the broker took the document.
    pub(super) fn acked(&mut self, pkid: u16) {
        self.flight.acked(pkid);
    }

    /// The connection ended. A document still unacknowledged is not sent again (the next
    /// connection owes a fresh one); `false` once the policy plainly refuses the documents:
    /// the caller drops the shadow.
    pub(super) fn connection_ended(&mut self) -> bool {
        if !self.flight.refused_at_end() {
            return true;
        }
        warn!(
            topic = %self.topic,
            "the broker closed the connection after each shadow document: the shadow is off until a restart; allow it in the device policy with {} or set [shadow] enabled = false",
            policy_statement(&self.thing)
        );
        false
    }

    /// A CONNACK: the next document says since when, and one is owed.
    pub(super) fn connected(&mut self, at: SystemTime) {
        self.connected_since = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.pacer.owe();
    }

    /// Returns once a document is due, the client is `connected` and the last document was
    /// acknowledged; takes the agent's changes meanwhile. Pending forever once the agent is
    /// gone.
    pub(super) async fn due(&mut self, connected: bool) {
        loop {
            let idle = !self.flight.busy();
            let due = self.pacer.due(Instant::now()).filter(|_| connected && idle);
            tokio::select! {
                changed = self.reports.changed() => match changed {
                    Ok(()) => self.pacer.owe(),
                    Err(_) => std::future::pending().await,
                },
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    return;
                }
            }
        }
    }

    /// Queues the document (`true`); one that finds no room is owed again (the next try
    /// comes `shadow::MIN_INTERVAL` later).
    pub(super) fn publish(&mut self, client: &AsyncClient) -> bool {
        let doc = document(&self.reports.borrow_and_update(), self.connected_since);
        self.pacer.sent(Instant::now());
        match client.try_publish(&self.topic, QoS::AtLeastOnce, false, doc) {
            Ok(()) => {
                self.flight.queued();
                debug!(topic = %self.topic, "shadow document queued");
                return true;
            }
            Err(e) => {
                debug!(topic = %self.topic, "shadow document not queued: {e}");
                self.pacer.owe();
            }
        }
        false
    }
}

/// The shadow's next due document; pending forever without a shadow.
pub(super) async fn due(shadow: &mut Option<ShadowOut>, connected: bool) {
    match shadow {
        Some(s) => s.due(connected).await,
        None => std::future::pending().await,
    }
}
