//! The audit trail's way out over MQTT (`audit.mqtt_topic`): events from the agent's
//! bounded queue, published QoS 1 while connected, one at a time and at most
//! `audit::MQTT_RATE` per second. An event unacknowledged when a connection ends is sent
//! again on the next one (at least once).

use std::time::Duration;

use rumqttc::{AsyncClient, QoS};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::in_flight::InFlight;
use crate::audit::{MQTT_RATE, policy_statement};

pub(super) struct AuditOut {
    topic: String,
    events: mpsc::Receiver<String>,
    /// The event being published: taken from the queue, not yet acknowledged.
    current: Option<String>,
    /// It, queued or unacknowledged.
    flight: InFlight,
    /// The next publish may not start before this (the rate).
    next_at: Instant,
}

impl AuditOut {
    pub(super) fn new(topic: String, events: mpsc::Receiver<String>) -> Self {
        AuditOut {
            topic,
            events,
            current: None,
            flight: InFlight::default(),
            next_at: Instant::now(),
        }
    }

    /// Whether `topic` is the audit topic.
    pub(super) fn is_ours(&self, topic: &str) -> bool {
        topic == self.topic
    }

    /// The queued event went out as packet `pkid`.
    pub(super) fn sent(&mut self, pkid: u16) {
        self.flight.sent(pkid);
    }

    /// A PUBACK: the broker took the event; the next one may go.
    pub(super) fn acked(&mut self, pkid: u16) {
        if self.flight.acked(pkid) {
            self.current = None;
        }
    }

    /// The connection ended: the event unacknowledged is sent again on the next one.
    /// `false` once the policy plainly refuses the topic: the caller drops the sink (the
    /// agent then counts the events it cannot queue as dropped).
    pub(super) fn connection_ended(&mut self) -> bool {
        if !self.flight.refused_at_end() {
            return true;
        }
        warn!(
            topic = %self.topic,
            "the broker closed the connection after each audit event: publishing them is off until a restart (the journal and the file go on); allow it in the device policy with {} or remove audit.mqtt_topic",
            policy_statement(&self.topic)
        );
        false
    }

    /// Returns once an event may be published: one is at hand, the client is `connected`,
    /// the last one was acknowledged and the rate allows. Pending forever once the agent
    /// is gone and nothing is left.
    pub(super) async fn due(&mut self, connected: bool) {
        if self.current.is_none() {
            match self.events.recv().await {
                Some(line) => self.current = Some(line),
                None => std::future::pending().await,
            }
        }
        if !connected || self.flight.busy() {
            // The connection's other events change that; this is asked again after them.
            std::future::pending().await
        }
        tokio::time::sleep_until(self.next_at).await;
    }

    /// Queues the event at hand (`true`); one that finds no room is tried again after the
    /// next gap.
    pub(super) fn publish(&mut self, client: &AsyncClient) -> bool {
        let Some(line) = &self.current else {
            return false;
        };
        self.next_at = Instant::now() + Duration::from_secs(1) / MQTT_RATE;
        match client.try_publish(&self.topic, QoS::AtLeastOnce, false, line.clone()) {
            Ok(()) => {
                self.flight.queued();
                true
            }
            Err(e) => {
                debug!(topic = %self.topic, "audit event not queued: {e}");
                false
            }
        }
    }
}

/// The next event due; pending forever without the sink.
pub(super) async fn due(audit: &mut Option<AuditOut>, connected: bool) {
    match audit {
        Some(a) => a.due(connected).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out() -> (mpsc::Sender<String>, AuditOut) {
        let (tx, rx) = mpsc::channel(4);
        (tx, AuditOut::new("sites/a/audit".into(), rx))
    }

    #[tokio::test(start_paused = true)]
    async fn an_event_is_due_only_while_connected_and_nothing_is_in_flight() {
        let (tx, mut a) = out();
        tx.send("e1".into()).await.unwrap();
        let disconnected = tokio::time::timeout(Duration::from_secs(60), a.due(false)).await;
        assert!(disconnected.is_err(), "due while disconnected");
        a.due(true).await;
        a.flight.queued();
        let busy = tokio::time::timeout(Duration::from_secs(60), a.due(true)).await;
        assert!(busy.is_err(), "due with one queued");
        a.sent(7);
        a.acked(7);
        assert_eq!(a.current, None, "acknowledged: the next one may go");
    }

    #[tokio::test(start_paused = true)]
    async fn events_are_spaced_by_the_rate() {
        let (_tx, mut a) = out();
        a.current = Some("e".into());
        a.next_at = Instant::now() + Duration::from_secs(1) / MQTT_RATE;
        let start = Instant::now();
        a.due(true).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[test]
    fn an_event_unacknowledged_when_the_connection_ends_is_sent_again() {
        let (_tx, mut a) = out();
        a.current = Some("e".into());
        a.flight.queued();
        a.sent(3);
        assert!(a.connection_ended());
        assert_eq!(a.current.as_deref(), Some("e"));
        assert!(!a.flight.busy());
        a.acked(3);
        assert_eq!(
            a.current.as_deref(),
            Some("e"),
            "a stale ack does not drop it"
        );
    }

    #[test]
    fn the_sink_stops_after_connections_lost_with_an_event_unacknowledged() {
        let (_tx, mut a) = out();
        let mut ended = Vec::new();
        for _ in 0..crate::shadow::REFUSALS {
            a.current = Some("e".into());
            a.flight.queued();
            ended.push(a.connection_ended());
        }
        assert_eq!(ended.last(), Some(&false), "{ended:?}");
        assert!(ended[..ended.len() - 1].iter().all(|e| *e));
    }
}
