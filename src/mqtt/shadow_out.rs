//! The shadow document's way out (`[shadow] enabled`): the agent's latest `shadow::Report`,
//! paced by `shadow::Pacer`, published QoS 1 by the connection's client while connected.

use std::time::SystemTime;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::shadow::{Pacer, Report, document, topic};

pub(super) struct ShadowOut {
    topic: String,
    reports: watch::Receiver<Report>,
    pacer: Pacer,
    /// Unix time of the last CONNACK.
    connected_since: u64,
}

impl ShadowOut {
    pub(super) fn new(thing: &str, reports: watch::Receiver<Report>) -> Self {
        ShadowOut {
            topic: topic(thing),
            reports,
            pacer: Pacer::default(),
            connected_since: 0,
        }
    }

    /// A CONNACK: the next document says since when, and one is owed.
    pub(super) fn connected(&mut self, at: SystemTime) {
        self.connected_since = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.pacer.owe();
    }

    /// Returns once a document is due and the client is `connected`; takes the agent's
    /// changes meanwhile. Pending forever once the agent is gone.
    pub(super) async fn due(&mut self, connected: bool) {
        loop {
            let due = self.pacer.due(Instant::now()).filter(|_| connected);
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

    /// Queues the document; one that finds no room is owed again (the next try comes
    /// `shadow::MIN_INTERVAL` later).
    pub(super) fn publish(&mut self, client: &AsyncClient) {
        let doc = document(&self.reports.borrow_and_update(), self.connected_since);
        self.pacer.sent(Instant::now());
        match client.try_publish(&self.topic, QoS::AtLeastOnce, false, doc) {
            Ok(()) => debug!(topic = %self.topic, "shadow document queued"),
            Err(e) => {
                debug!(topic = %self.topic, "shadow document not queued: {e}");
                self.pacer.owe();
            }
        }
    }
}

/// The shadow's next due document; pending forever without a shadow.
pub(super) async fn due(shadow: &mut Option<ShadowOut>, connected: bool) {
    match shadow {
        Some(s) => s.due(connected).await,
        None => std::future::pending().await,
    }
}
