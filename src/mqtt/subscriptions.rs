//! The notify topics the client follows (the gateway's own first, then each downstream
//! thing's), batched into SUBSCRIBE packets, with what the broker granted or refused.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use rumqttc::{AsyncClient, QoS, SubscribeFilter, SubscribeReasonCode};

use crate::protocol::notify::notify_topic;

/// Topic filters in one SUBSCRIBE (AWS IoT's limit).
pub const FILTERS_PER_SUBSCRIBE: usize = 8;

/// Rule (subscribe batches): topics go in SUBSCRIBE packets of at most
/// `FILTERS_PER_SUBSCRIBE` filters, in order (the gateway's own first).
pub fn batches(topics: &[String]) -> Vec<Vec<String>> {
    topics
        .chunks(FILTERS_PER_SUBSCRIBE)
        .map(<[String]>::to_vec)
        .collect()
}

/// The notify topics followed and what the broker said of each subscription. Bounded by
/// the configured things: at most one entry per topic.
pub(super) struct Subscriptions {
    own_topic: String,
    /// Topic -> thing, the gateway's own included.
    topics: BTreeMap<String, String>,
    /// SUBSCRIBE batches queued, waiting for their packet id.
    unsent: VecDeque<Vec<String>>,
    /// Batches sent, waiting for their SUBACK.
    pending: HashMap<u16, Vec<String>>,
    /// Downstream things whose refusal was logged (once per thing).
    refused: HashSet<String>,
    /// Topics of removed things, unsubscribed after every CONNACK (the persistent session
    /// may still hold them); at most `MAX_UNSUBSCRIBE`, a re-added topic leaves it.
    unsubscribe: VecDeque<String>,
}

/// Removed topics remembered for unsubscribing.
pub(super) const MAX_UNSUBSCRIBE: usize = 64;

/// What a SUBACK said.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct SubAcked {
    /// The gateway's own topic, when it was in this batch: granted or not.
    pub(super) own: Option<bool>,
    /// Downstream things refused for the first time.
    pub(super) refused: Vec<String>,
    /// Downstream things granted.
    pub(super) granted: Vec<String>,
}

/// A SUBACK that does not answer what was sent: the connection is dropped and made again.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum BadSubAck {
    #[error("a SUBACK for packet {0}, which no SUBSCRIBE used")]
    UnknownPacket(u16),
    #[error("a SUBACK with {codes} codes for a SUBSCRIBE of {filters} filters")]
    CodeCount { codes: usize, filters: usize },
}

impl Subscriptions {
    pub(super) fn new(own_thing: &str, own_topic: &str, downstream: &[String]) -> Self {
        let mut s = Subscriptions {
            own_topic: own_topic.to_owned(),
            topics: BTreeMap::from([(own_topic.to_owned(), own_thing.to_owned())]),
            unsent: VecDeque::new(),
            pending: HashMap::new(),
            refused: HashSet::new(),
            unsubscribe: VecDeque::new(),
        };
        s.set_downstream(downstream);
        s
    }

    /// The downstream things refused now, sorted.
    pub(super) fn refused_things(&self) -> Vec<String> {
        let mut v: Vec<String> = self.refused.iter().cloned().collect();
        v.sort();
        v
    }

    pub(super) fn thing_of(&self, topic: &str) -> Option<&str> {
        self.topics.get(topic).map(String::as_str)
    }

    /// Every topic, the gateway's own first.
    pub(super) fn all(&self) -> Vec<String> {
        let others = self
            .topics
            .keys()
            .filter(|t| **t != self.own_topic)
            .cloned();
        std::iter::once(self.own_topic.clone())
            .chain(others)
            .collect()
    }

    /// A new connection: nothing is in flight any more.
    pub(super) fn reset(&mut self) {
        self.unsent.clear();
        self.pending.clear();
    }

    pub(super) fn queued(&mut self, batch: Vec<String>) {
        self.unsent.push_back(batch);
    }

    /// rumqttc sent the next queued SUBSCRIBE with this packet id.
    pub(super) fn sent(&mut self, pkid: u16) {
        if let Some(batch) = self.unsent.pop_front() {
            self.pending.insert(pkid, batch);
        }
    }

    /// A SUBACK; `Err` when it does not answer the batch sent with that packet id.
    pub(super) fn acked(
        &mut self,
        pkid: u16,
        codes: &[SubscribeReasonCode],
    ) -> Result<SubAcked, BadSubAck> {
        let mut out = SubAcked {
            own: None,
            refused: Vec::new(),
            granted: Vec::new(),
        };
        let Some(batch) = self.pending.remove(&pkid) else {
            return Err(BadSubAck::UnknownPacket(pkid));
        };
        if batch.len() != codes.len() {
            return Err(BadSubAck::CodeCount {
                codes: codes.len(),
                filters: batch.len(),
            });
        }
        for (topic, code) in batch.iter().zip(codes) {
            let granted = !matches!(code, SubscribeReasonCode::Failure);
            if *topic == self.own_topic {
                out.own = Some(granted);
            } else if let Some(thing) = self.topics.get(topic) {
                if granted {
                    self.refused.remove(thing);
                    out.granted.push(thing.clone());
                } else if self.refused.insert(thing.clone()) {
                    out.refused.push(thing.clone());
                }
            }
        }
        Ok(out)
    }

    /// The downstream things now configured: the topics to subscribe and to unsubscribe.
    pub(super) fn set_downstream(&mut self, things: &[String]) -> (Vec<String>, Vec<String>) {
        let wanted: BTreeMap<String, String> = things
            .iter()
            .map(|t| (notify_topic(t), t.clone()))
            .filter(|(topic, _)| *topic != self.own_topic)
            .collect();
        let removed: Vec<String> = self
            .topics
            .keys()
            .filter(|t| **t != self.own_topic && !wanted.contains_key(*t))
            .cloned()
            .collect();
        let added: Vec<String> = wanted
            .keys()
            .filter(|t| !self.topics.contains_key(*t))
            .cloned()
            .collect();
        for t in &removed {
            if let Some(thing) = self.topics.remove(t) {
                self.refused.remove(&thing);
            }
            if self.unsubscribe.len() == MAX_UNSUBSCRIBE {
                self.unsubscribe.pop_front();
            }
            self.unsubscribe.push_back(t.clone());
        }
        self.unsubscribe.retain(|t| !wanted.contains_key(t));
        // Refused things are asked again: the operator may have fixed the policy.
        let retry: Vec<String> = wanted
            .iter()
            .filter(|(t, thing)| self.topics.contains_key(*t) && self.refused.contains(*thing))
            .map(|(t, _)| t.clone())
            .collect();
        self.topics.extend(wanted);
        (added.into_iter().chain(retry).collect(), removed)
    }

    /// After a CONNACK: what the broker may still hold for removed things.
    pub(super) fn unsubscribes(&self) -> Vec<String> {
        self.unsubscribe.iter().cloned().collect()
    }

    /// Queues SUBSCRIBEs for `topics` in batches; `Err` when rumqttc's queue is full.
    pub(super) fn subscribe(
        &mut self,
        client: &AsyncClient,
        topics: &[String],
    ) -> Result<(), String> {
        for batch in batches(topics) {
            let filters = batch
                .iter()
                .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
            client
                .try_subscribe_many(filters)
                .map_err(|e| format!("cannot queue the subscription to {batch:?}: {e}"))?;
            self.queued(batch);
        }
        Ok(())
    }

    /// After a CONNACK: every topic, the gateway's own first, then the unsubscribes of
    /// removed things. Rule (subscriptions never starve): the own topic is never queued
    /// behind anything else.
    pub(super) fn after_connack(&mut self, client: &AsyncClient) -> Result<(), String> {
        self.reset();
        let all = self.all();
        self.subscribe(client, &all)?;
        for topic in self.unsubscribes() {
            client
                .try_unsubscribe(topic.clone())
                .map_err(|e| format!("cannot queue the unsubscribe from {topic}: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::{QUEUE, REQUEST_QUEUE, policy_statement};
    use rumqttc::MqttOptions;

    #[test]
    fn subscriptions_go_in_batches_of_eight_own_topic_first() {
        let things: Vec<String> = (0..17).map(|i| format!("t{i:02}")).collect();
        let subs = Subscriptions::new("gw", "$aws/things/gw/tunnels/notify", &things);
        let b = batches(&subs.all());
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![8, 8, 2]);
        assert_eq!(b[0][0], "$aws/things/gw/tunnels/notify");
        assert_eq!(subs.thing_of("$aws/things/t16/tunnels/notify"), Some("t16"));
        assert_eq!(subs.thing_of("$aws/things/t99/tunnels/notify"), None);
    }

    #[test]
    fn a_refused_downstream_thing_is_reported_once_and_the_own_topic_decides_the_connection() {
        let down = vec!["PLC-1".to_owned(), "PLC-2".to_owned()];
        let mut subs = Subscriptions::new("gw", "$aws/things/gw/tunnels/notify", &down);
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        let no = SubscribeReasonCode::Failure;
        for round in 0..2 {
            subs.reset();
            subs.queued(subs.all());
            subs.sent(7);
            let out = subs.acked(7, &[ok, no, ok]).unwrap();
            let refused: Vec<String> = if round == 0 {
                vec!["PLC-1".into()]
            } else {
                vec![]
            };
            let granted = vec!["PLC-2".to_owned()];
            assert_eq!(
                out,
                SubAcked {
                    own: Some(true),
                    refused,
                    granted
                }
            );
        }
        // Removing a thing unsubscribes it and forgets its refusal; re-adding reports again.
        let plc1 = "$aws/things/PLC-1/tunnels/notify".to_owned();
        let (added, removed) = subs.set_downstream(&["PLC-2".to_owned()]);
        assert_eq!((added.len(), removed), (0, vec![plc1.clone()]));
        assert_eq!(subs.unsubscribes(), vec![plc1.clone()]);
        let (added, _) = subs.set_downstream(&down);
        assert_eq!(added, vec![plc1.clone()]);
        assert!(subs.unsubscribes().is_empty());
        subs.queued(added);
        subs.sent(8);
        let out = subs.acked(8, &[no]).unwrap();
        assert_eq!((out.own, out.refused), (None, vec!["PLC-1".to_owned()]));
        // A reload asks a refused thing again (the policy may be fixed).
        let (added, _) = subs.set_downstream(&down);
        assert_eq!(added, vec![plc1]);
        // The own topic refused: the caller ends the connection.
        subs.queued(vec!["$aws/things/gw/tunnels/notify".into()]);
        subs.sent(9);
        assert_eq!(subs.acked(9, &[no]).unwrap().own, Some(false));
        // A SUBACK that does not answer what was sent is a protocol error.
        subs.queued(vec!["$aws/things/gw/tunnels/notify".into(), "x".into()]);
        subs.sent(10);
        assert_eq!(
            subs.acked(10, &[ok]).err(),
            Some(BadSubAck::CodeCount {
                codes: 1,
                filters: 2
            })
        );
        assert_eq!(
            subs.acked(11, &[ok]).err(),
            Some(BadSubAck::UnknownPacket(11))
        );
        assert!(policy_statement("PLC-1").contains("topicfilter/$aws/things/PLC-1/tunnels/notify"));
    }

    #[test]
    fn the_refused_things_are_listed_sorted_until_granted() {
        let down = vec!["PLC-2".to_owned(), "PLC-1".to_owned()];
        let mut subs = Subscriptions::new("gw", "$aws/things/gw/tunnels/notify", &down);
        assert!(subs.refused_things().is_empty());
        subs.queued(subs.all());
        subs.sent(1);
        let no = SubscribeReasonCode::Failure;
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        subs.acked(1, &[ok, no, no]).unwrap();
        assert_eq!(subs.refused_things(), ["PLC-1", "PLC-2"]);
        subs.queued(vec!["$aws/things/PLC-1/tunnels/notify".into()]);
        subs.sent(2);
        subs.acked(2, &[ok]).unwrap();
        assert_eq!(subs.refused_things(), ["PLC-2"]);
    }

    #[test]
    fn a_new_connection_forgets_what_was_in_flight() {
        let mut subs = Subscriptions::new("gw", "$aws/things/gw/tunnels/notify", &[]);
        subs.queued(subs.all());
        subs.queued(subs.all());
        subs.sent(1);
        subs.reset();
        // Neither the batch sent nor the one still queued belongs to the new connection.
        subs.sent(2);
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        assert_eq!(
            subs.acked(1, &[ok]).err(),
            Some(BadSubAck::UnknownPacket(1))
        );
        assert_eq!(
            subs.acked(2, &[ok]).err(),
            Some(BadSubAck::UnknownPacket(2))
        );
    }

    /// 49 things, then sets of 49 others swapped in until 147 were removed.
    fn worst_case_subscriptions() -> Subscriptions {
        let set = |n: usize| -> Vec<String> {
            (0..crate::config::MAX_DOWNSTREAM_THINGS)
                .map(|i| format!("t{n}-{i}"))
                .collect()
        };
        let mut subs = Subscriptions::new("gw", "$aws/things/gw/tunnels/notify", &set(0));
        for n in 1..4 {
            subs.set_downstream(&set(n));
        }
        assert_eq!(subs.unsubscribes().len(), MAX_UNSUBSCRIBE);
        subs
    }

    #[tokio::test]
    async fn after_a_connack_every_subscription_and_unsubscribe_fits_with_room_for_acks_and_a_shadow_document()
     {
        let mut subs = worst_case_subscriptions();
        let opts = MqttOptions::new("gw", "127.0.0.1", 1);
        let (client, _events) = AsyncClient::new(opts, REQUEST_QUEUE);
        subs.after_connack(&client).unwrap();
        assert_eq!(subs.unsent.len(), 7, "50 topics in batches of 8");
        assert_eq!(subs.unsent[0][0], "$aws/things/gw/tunnels/notify");
        for _ in 0..QUEUE {
            client.try_unsubscribe("ack stand-in").unwrap();
        }
        let doc = crate::shadow::topic("gw");
        client
            .try_publish(doc, rumqttc::QoS::AtLeastOnce, false, "{}")
            .unwrap();
    }

    #[tokio::test]
    async fn a_subscription_that_finds_no_room_is_an_error_not_a_log_line() {
        let mut subs = worst_case_subscriptions();
        let opts = MqttOptions::new("gw", "127.0.0.1", 1);
        let (client, _events) = AsyncClient::new(opts, 8);
        let err = subs.after_connack(&client).unwrap_err();
        assert!(err.contains("cannot queue"), "{err}");
        // The own topic went first: it is queued even though the rest did not fit.
        assert_eq!(subs.unsent[0][0], "$aws/things/gw/tunnels/notify");
    }
}
