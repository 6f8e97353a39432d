//! `$aws/things/<thing>/tunnels/notify` over MQTT (rumqttc, mutual TLS): a persistent
//! session, QoS 1, resubscribed after every connect, reconnecting forever with backoff. Each
//! payload is parsed tolerantly (unknown fields ignored) but validated before the agent sees it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnectionError, Event, MqttOptions, Outgoing, Packet, QoS, StateError,
    SubscribeFilter, SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::MqttReconnect;
use crate::config::MqttConfig;
use crate::protocol::{self, is_valid_region, is_valid_service_id};
use crate::proxy_front::ProxyFront;
use crate::secret::Secret;

/// A notify that passed validation: a destination token for a region and 1-3 services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The thing whose notify topic carried it.
    pub thing: String,
    pub token: Secret,
    pub region: String,
    pub services: Vec<String>,
}

/// Acknowledges one notify to the broker, once the agent has acted on it (the session is
/// persisted): a crash or a stop before that means the broker delivers it again.
pub struct Ack {
    client: AsyncClient,
    /// The PUBLISH with its payload (the token) dropped: acking needs its id and QoS only.
    publish: rumqttc::Publish,
}

impl Ack {
    pub fn send(self) {
        if let Err(e) = self.client.try_ack(&self.publish) {
            debug!("notify not acknowledged: {e}");
        }
    }
}

/// A notify handed to the agent, with what acknowledges it.
pub struct Notice {
    pub notification: Notification,
    pub ack: Ack,
}

/// Why a notify was refused; never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("payload is not a JSON object: {0}")]
    Json(String),
    #[error("clientMode is {0:?}; this agent only serves \"destination\" tokens")]
    Mode(String),
    #[error("region {0:?} is not a region name such as us-east-1")]
    Region(String),
    #[error("clientAccessToken is invalid: {0}")]
    Token(&'static str),
    #[error("{0} services listed; a tunnel has 1 to 3")]
    ServiceCount(usize),
    #[error("service name {0:?} is invalid (1-128 of [a-zA-Z0-9:_-])")]
    ServiceName(String),
}

#[derive(Deserialize)]
struct RawNotify {
    #[serde(rename = "clientAccessToken")]
    token: Option<String>,
    #[serde(rename = "clientMode")]
    mode: Option<String>,
    region: Option<String>,
    services: Option<Vec<String>>,
}

/// Rule (docs/protocol.md §5): what a usable notify looks like.
pub fn parse(thing: &str, payload: &[u8]) -> Result<Notification, Refusal> {
    let text = std::str::from_utf8(payload).map_err(|_| Refusal::NotUtf8)?;
    // A string from the payload as a refusal quotes it: its start, enough to recognise it.
    fn shown(s: &str) -> String {
        s.chars().take(64).collect()
    }
    let raw: RawNotify = serde_json::from_str(text).map_err(|e| Refusal::Json(e.to_string()))?;
    // Wrap the token at once so it is wiped whatever happens next.
    let token = Secret::new(raw.token.unwrap_or_default());
    let mode = raw.mode.unwrap_or_default();
    if mode != "destination" {
        return Err(Refusal::Mode(shown(&mode)));
    }
    let region = raw.region.unwrap_or_default();
    if !is_valid_region(&region) {
        return Err(Refusal::Region(shown(&region)));
    }
    if let Some(problem) = protocol::access_token_problem(token.expose()) {
        return Err(Refusal::Token(problem));
    }
    let services = raw.services.unwrap_or_default();
    if !(1..=3).contains(&services.len()) {
        return Err(Refusal::ServiceCount(services.len()));
    }
    if let Some(bad) = services.iter().find(|s| !is_valid_service_id(s)) {
        return Err(Refusal::ServiceName(shown(bad)));
    }
    Ok(Notification {
        thing: thing.to_owned(),
        token,
        region,
        services,
    })
}

/// Where the MQTT connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttPhase {
    Connecting,
    Connected,
    /// Subscribed to the notify topic: notifications can arrive.
    Subscribed,
}

/// The MQTT connection's phase, since when, and why the last connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttState {
    pub phase: MqttPhase,
    pub since: SystemTime,
    pub last_error: Option<String>,
    /// Downstream things whose subscription the broker refused (kept across reconnects
    /// until granted or removed).
    pub refused_things: Vec<String>,
}

impl MqttState {
    pub fn connecting() -> Self {
        MqttState {
            phase: MqttPhase::Connecting,
            since: SystemTime::now(),
            last_error: None,
            refused_things: Vec::new(),
        }
    }
}

pub struct NotifyClient {
    pub config: MqttConfig,
    pub tls: Arc<rustls::ClientConfig>,
    /// The gateway's own thing, and its notify topic.
    pub thing: String,
    pub topic: String,
    /// The downstream things whose notify topics it also follows (changes on SIGHUP).
    pub downstream: watch::Receiver<Vec<String>>,
    /// HTTP proxy to the broker (`[proxy]`, unless `no_proxy` names it).
    pub proxy: Option<crate::proxy::HttpProxy>,
}

/// Notifications waiting for the agent.
pub const QUEUE: usize = 16;
/// Largest incoming MQTT packet: AWS IoT's 128 KiB message limit plus topic and header.
/// A larger one cannot be read; see `NotifyClient::run` for how it is dropped.
pub const MAX_INCOMING_PACKET: usize = 128 * 1024 + 1024;
/// The agent only sends small packets (CONNECT, SUBSCRIBE, acks).
const MAX_OUTGOING_PACKET: usize = 16 * 1024;
const RECONNECT_BASE: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(60);
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Time one MQTT connection attempt may take, to its CONNACK.
const MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests waiting for rumqttc's event loop (subscribes, unsubscribes, acks), sized for the
/// worst case after a CONNACK: every SUBSCRIBE batch, every remembered unsubscribe, and an
/// ack for each notify the agent may hold. A request that still finds no room ends the
/// connection (`NotifyClient::run`): the next CONNACK queues everything again.
pub const REQUEST_QUEUE: usize = MAX_UNSUBSCRIBE
    + (crate::config::MAX_DOWNSTREAM_THINGS + 1).div_ceil(FILTERS_PER_SUBSCRIBE)
    + QUEUE
    + 2;
/// Topic filters in one SUBSCRIBE (AWS IoT's limit).
pub const FILTERS_PER_SUBSCRIBE: usize = 8;

/// A thing's notify topic.
pub fn notify_topic(thing: &str) -> String {
    format!("$aws/things/{thing}/tunnels/notify")
}

/// Rule (subscribe batches): topics go in SUBSCRIBE packets of at most
/// `FILTERS_PER_SUBSCRIBE` filters, in order (the gateway's own first).
pub fn batches(topics: &[String]) -> Vec<Vec<String>> {
    topics
        .chunks(FILTERS_PER_SUBSCRIBE)
        .map(<[String]>::to_vec)
        .collect()
}

/// Rule (policy hint): the IoT policy statements that let the gateway's certificate follow a
/// thing's notify topic.
pub fn policy_statement(thing: &str) -> String {
    format!(
        r#"{{"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:REGION:ACCOUNT:topicfilter/$aws/things/{thing}/tunnels/notify"}}, {{"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:REGION:ACCOUNT:topic/$aws/things/{thing}/tunnels/notify"}}"#
    )
}

/// The notify topics followed and what the broker said of each subscription. Bounded by
/// the configured things: at most one entry per topic.
struct Subscriptions {
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
const MAX_UNSUBSCRIBE: usize = 64;

/// What a SUBACK said.
#[derive(Debug, PartialEq, Eq)]
struct SubAcked {
    /// The gateway's own topic, when it was in this batch: granted or not.
    own: Option<bool>,
    /// Downstream things refused for the first time.
    refused: Vec<String>,
    /// Downstream things granted.
    granted: Vec<String>,
}

impl Subscriptions {
    fn new(own_thing: &str, own_topic: &str, downstream: &[String]) -> Self {
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
    fn refused_things(&self) -> Vec<String> {
        let mut v: Vec<String> = self.refused.iter().cloned().collect();
        v.sort();
        v
    }

    fn thing_of(&self, topic: &str) -> Option<&str> {
        self.topics.get(topic).map(String::as_str)
    }

    /// Every topic, the gateway's own first.
    fn all(&self) -> Vec<String> {
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
    fn reset(&mut self) {
        self.unsent.clear();
        self.pending.clear();
    }

    fn queued(&mut self, batch: Vec<String>) {
        self.unsent.push_back(batch);
    }

    /// rumqttc sent the next queued SUBSCRIBE with this packet id.
    fn sent(&mut self, pkid: u16) {
        if let Some(batch) = self.unsent.pop_front() {
            self.pending.insert(pkid, batch);
        }
    }

    /// A SUBACK; `Err` when it does not answer the batch sent with that packet id.
    fn acked(&mut self, pkid: u16, codes: &[SubscribeReasonCode]) -> Result<SubAcked, String> {
        let mut out = SubAcked {
            own: None,
            refused: Vec::new(),
            granted: Vec::new(),
        };
        let Some(batch) = self.pending.remove(&pkid) else {
            return Err(format!(
                "a SUBACK for packet {pkid}, which no SUBSCRIBE used"
            ));
        };
        if batch.len() != codes.len() {
            return Err(format!(
                "a SUBACK with {} codes for a SUBSCRIBE of {} filters",
                codes.len(),
                batch.len()
            ));
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
    fn set_downstream(&mut self, things: &[String]) -> (Vec<String>, Vec<String>) {
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
    fn unsubscribes(&self) -> Vec<String> {
        self.unsubscribe.iter().cloned().collect()
    }

    /// Queues SUBSCRIBEs for `topics` in batches; `Err` when rumqttc's queue is full.
    fn subscribe(&mut self, client: &AsyncClient, topics: &[String]) -> Result<(), String> {
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
    fn after_connack(&mut self, client: &AsyncClient) -> Result<(), String> {
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

/// Rule: a broker that sends nothing (not even the PINGRESP due every keep-alive) for 1.5
/// keep-alives is gone.
pub fn silence_limit(keep_alive: Duration) -> Duration {
    keep_alive.mul_f64(1.5)
}

/// What ended an MQTT connection, for the log and the status.
fn describe(e: &ConnectionError, front: Option<&ProxyFront>) -> String {
    match (e, front.and_then(ProxyFront::last_error)) {
        (
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::Error::PayloadSizeLimitExceeded(n),
            )),
            _,
        ) => format!("a {n}-byte message arrived, above the {MAX_INCOMING_PACKET}-byte limit"),
        // The front knows what the real proxy said; rumqttc only saw the front's 502.
        (ConnectionError::Proxy(_), Some(why)) => why,
        (other, _) => other.to_string(),
    }
}

impl NotifyClient {
    /// Runs until `cancel`; valid notifications go to `out`, refusals are logged here.
    pub async fn run(
        self,
        out: mpsc::Sender<Notice>,
        state: watch::Sender<MqttState>,
        cancel: CancellationToken,
        spread: Duration,
    ) {
        let mut opts =
            MqttOptions::new(&self.config.client_id, &self.config.host, self.config.port);
        opts.set_keep_alive(self.config.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        // Through a proxy, rumqttc goes through the bounded front (`proxy_front`).
        let front = match &self.proxy {
            Some(p) => {
                match ProxyFront::start(p.clone(), &self.config.host, self.config.port).await {
                    Ok(front) => {
                        opts.set_proxy(front.for_rumqttc());
                        Some(front)
                    }
                    Err(e) => {
                        state.send_modify(|s| {
                            s.last_error = Some(format!("cannot start the local proxy front: {e}"));
                        });
                        warn!(
                            "MQTT through proxy {p}: cannot start the local front: {e}; MQTT stays down"
                        );
                        cancel.cancelled().await;
                        return;
                    }
                }
            }
            None => None,
        };
        let (client, mut events) = AsyncClient::new(opts, REQUEST_QUEUE);
        // Notifies are small and latency matters: no Nagle delay.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        // Connect, TLS and CONNACK; through a proxy, longer than the front gives the proxy
        // (`proxy_front`), so the proxy's failure is the one reported.
        net.set_connection_timeout(MQTT_CONNECT_TIMEOUT.as_secs());
        events.set_network_options(net);
        let broker = format!("{}:{}", self.config.host, self.config.port);
        let silence = silence_limit(self.config.keep_alive);
        let mut policy = MqttReconnect::new(RECONNECT_BASE, RECONNECT_CAP, spread);
        let mut connected_at: Option<Instant> = None;
        let mut last_rx = Instant::now();
        // Set after an unreadable message: the next connection only wipes the session.
        let mut purging = false;
        let mut downstream = self.downstream.clone();
        let mut subs =
            Subscriptions::new(&self.thing, &self.topic, &downstream.borrow_and_update());
        policy.connecting(Instant::now());
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => {
                    disconnect(&client, &mut events).await;
                    return;
                }
                Ok(()) = downstream.changed() => {
                    let things = downstream.borrow_and_update().clone();
                    let (added, removed) = subs.set_downstream(&things);
                    // Not connected: the next CONNACK subscribes to everything.
                    if connected_at.is_none() {
                        continue;
                    }
                    let queued = subs.subscribe(&client, &added).and_then(|()| {
                        removed.iter().try_for_each(|topic| {
                            client.try_unsubscribe(topic.clone()).map_err(|e| {
                                format!("cannot queue the unsubscribe from {topic}: {e}")
                            })
                        })
                    });
                    match queued {
                        Ok(()) => continue,
                        // The next CONNACK queues the complete sets.
                        Err(why) => {
                            events.clean();
                            Err(why)
                        }
                    }
                }
                _ = tokio::time::sleep_until(last_rx + silence), if connected_at.is_some() => {
                    // Drop the dead connection; the next poll reconnects.
                    events.clean();
                    Err(format!("nothing from the broker for {silence:?} (1.5 x keep-alive): the link is dead"))
                }
                e = events.poll() => e.map_err(|e| {
                    if matches!(&e, ConnectionError::MqttState(StateError::Deserialization(
                        rumqttc::Error::PayloadSizeLimitExceeded(_)))) {
                        purging = true;
                    }
                    describe(&e, front.as_ref())
                }),
            };
            if matches!(event, Ok(Event::Incoming(_))) {
                last_rx = Instant::now();
            }
            // A refused subscription leaves the agent deaf: reconnect with backoff and ask
            // again (a fixed device policy is picked up), as AWS IoT would disconnect anyway.
            // A downstream thing refused is logged once and the others keep working.
            let mut own_granted = false;
            let event = match event {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    match subs.acked(ack.pkid, &ack.return_codes) {
                        Err(why) => {
                            events.clean();
                            Err(why)
                        }
                        Ok(outcome) => {
                            let refused = subs.refused_things();
                            state.send_if_modified(|s| {
                                let changed = s.refused_things != refused;
                                s.refused_things = refused;
                                changed
                            });
                            for thing in &outcome.refused {
                                warn!(thing = %thing, "the broker refused the subscription to {}: tunnels to this thing cannot be served until the device policy allows it; the other things keep working. Policy statements to add: {}", notify_topic(thing), policy_statement(thing));
                            }
                            if !outcome.granted.is_empty() {
                                info!(things = ?outcome.granted, "subscribed to downstream things' notifications");
                            }
                            if outcome.own == Some(false) {
                                events.clean();
                                Err(format!(
                                    "the broker refused the subscription to {}: check that the device policy allows iot:Subscribe and iot:Receive on it ({})",
                                    self.topic,
                                    policy_statement(&self.thing)
                                ))
                            } else {
                                own_granted = outcome.own == Some(true);
                                Ok(Event::Incoming(Packet::SubAck(ack)))
                            }
                        }
                    }
                }
                other => other,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    connected_at = Some(Instant::now());
                    self.harden_socket().await;
                    if purging {
                        // A clean session wiped the unreadable message the broker kept
                        // redelivering; go back to a persistent session at once.
                        purging = false;
                        events.mqtt_options.set_clean_session(false);
                        events.clean();
                        connected_at = None;
                        info!(broker = %broker, "MQTT session wiped; reconnecting with a persistent session");
                        if !self.pause(&cancel, &mut policy, None).await {
                            return;
                        }
                        continue;
                    }
                    debug!(broker = %broker, session_present = ack.session_present, "MQTT connected");
                    state.send_modify(|s| {
                        s.phase = MqttPhase::Connected;
                        s.since = SystemTime::now();
                    });
                    // Always resubscribe: a broker may have lost the persistent session. Requests
                    // of the last connection still queued would be replayed ahead of these and
                    // break the packet-id bookkeeping: drop them; the sets below are complete.
                    events.pending.retain(|r| {
                        !matches!(
                            r,
                            rumqttc::Request::Subscribe(_) | rumqttc::Request::Unsubscribe(_)
                        )
                    });
                    if let Err(why) = subs.after_connack(&client) {
                        events.clean();
                        let up_for = connected_at.take().map(|t| t.elapsed());
                        if !self
                            .lost(why, up_for, false, &state, &cancel, &mut policy)
                            .await
                        {
                            return;
                        }
                    }
                }
                Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => subs.sent(pkid),
                Ok(Event::Incoming(Packet::SubAck(_))) if own_granted => {
                    if policy.failures() > 0 {
                        info!(broker = %broker, attempts = policy.failures() + 1, topic = %self.topic, "MQTT reconnected; subscribed to tunnel notifications");
                    } else {
                        info!(broker = %broker, topic = %self.topic, "subscribed to tunnel notifications");
                    }
                    state.send_modify(|s| {
                        s.phase = MqttPhase::Subscribed;
                        s.since = SystemTime::now();
                    });
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    // Acknowledged by the agent once it acted on it, or here if refused; not
                    // at all when the agent stops first (the broker delivers it again).
                    let mut header = p.clone();
                    header.payload = bytes::Bytes::new();
                    let ack = Ack {
                        client: client.clone(),
                        publish: header,
                    };
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            disconnect(&client, &mut events).await;
                            return;
                        }
                        () = self.on_publish(subs.thing_of(&p.topic), &p.topic, &p.payload, ack, &out) => {}
                    }
                }
                Ok(_) => {}
                Err(why) => {
                    let up_for = connected_at.take().map(|t| t.elapsed());
                    if purging {
                        events.mqtt_options.set_clean_session(true);
                    }
                    if !self
                        .lost(why, up_for, purging, &state, &cancel, &mut policy)
                        .await
                    {
                        return;
                    }
                }
            }
        }
    }

    /// The connection ended (or could not be made): says why, then waits as the reconnect
    /// policy says; `false` if cancelled meanwhile.
    async fn lost(
        &self,
        why: String,
        up_for: Option<Duration>,
        purging: bool,
        state: &watch::Sender<MqttState>,
        cancel: &CancellationToken,
        policy: &mut MqttReconnect,
    ) -> bool {
        let broker = format!("{}:{}", self.config.host, self.config.port);
        if purging {
            warn!(broker = %broker, "{why}: it cannot be read, and with a persistent session the broker would redeliver it on every reconnect; wiping the MQTT session to drop it (notifies queued behind it are lost)");
        } else if policy.failures() == 0 {
            warn!(broker = %broker, "MQTT connection ended: {why}; reconnecting with backoff");
        } else {
            debug!(broker = %broker, attempt = policy.failures() + 1, "MQTT connection failed: {why}");
        }
        state.send_modify(|s| {
            s.phase = MqttPhase::Connecting;
            s.since = SystemTime::now();
            s.last_error = Some(why);
        });
        self.pause(cancel, policy, up_for).await
    }

    /// Waits before the next CONNECT, as the reconnect policy says; `false` if cancelled.
    async fn pause(
        &self,
        cancel: &CancellationToken,
        policy: &mut MqttReconnect,
        up_for: Option<Duration>,
    ) -> bool {
        let delay = policy.next_delay(Instant::now(), up_for);
        tokio::select! {
            _ = cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        policy.connecting(Instant::now());
        true
    }

    /// Keepalive and user timeout on rumqttc's socket, found by the broker's address.
    async fn harden_socket(&self) {
        // Through a proxy, the front hardened its own socket to the proxy.
        if self.proxy.is_some() {
            return;
        }
        // Bounded: a slow resolver must not hold up the subscription.
        let (host, port) = (self.config.host.as_str(), self.config.port);
        let lookup = tokio::net::lookup_host((host, port));
        match tokio::time::timeout(Duration::from_secs(2), lookup).await {
            Ok(Ok(addrs)) => {
                let addrs: Vec<_> = addrs.collect();
                let n = crate::net::harden_sockets_to(&addrs);
                debug!(sockets = n, "keepalive set on the MQTT socket");
            }
            Ok(Err(e)) => debug!("keepalive on the MQTT socket: cannot resolve the broker: {e}"),
            Err(_) => {
                debug!("keepalive on the MQTT socket: the broker's name did not resolve in 2 s")
            }
        }
    }

    async fn on_publish(
        &self,
        thing: Option<&str>,
        topic: &str,
        payload: &[u8],
        ack: Ack,
        out: &mpsc::Sender<Notice>,
    ) {
        let Some(thing) = thing else {
            warn!(topic = ?topic, "message on an unexpected topic ignored");
            ack.send();
            return;
        };
        match parse(thing, payload) {
            Ok(n) => {
                info!(region = %n.region, services = ?n.services, token = %n.token, "tunnel notification received");
                let notice = Notice {
                    notification: n,
                    ack,
                };
                // The agent gone (stopping): the notice drops unacknowledged.
                let _ = out.send(notice).await;
            }
            Err(refusal) => {
                warn!(bytes = payload.len(), "notify refused: {refusal}");
                ack.send();
            }
        }
    }
}

/// A clean DISCONNECT, so the broker does not log a dropped connection.
async fn disconnect(client: &AsyncClient, events: &mut rumqttc::EventLoop) {
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(subs.acked(10, &[ok]).is_err());
        assert!(subs.acked(11, &[ok]).is_err());
        assert!(policy_statement("PLC-1").contains("topicfilter/$aws/things/PLC-1/tunnels/notify"));
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
    async fn after_a_connack_every_subscription_and_unsubscribe_fits_with_room_for_acks() {
        let mut subs = worst_case_subscriptions();
        let opts = MqttOptions::new("gw", "127.0.0.1", 1);
        let (client, _events) = AsyncClient::new(opts, REQUEST_QUEUE);
        subs.after_connack(&client).unwrap();
        assert_eq!(subs.unsent.len(), 7, "50 topics in batches of 8");
        assert_eq!(subs.unsent[0][0], "$aws/things/gw/tunnels/notify");
        for _ in 0..QUEUE {
            client.try_unsubscribe("ack stand-in").unwrap();
        }
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

    fn notify(mode: &str, token: &str, region: &str, services: &str) -> Vec<u8> {
        format!(r#"{{"clientAccessToken":"{token}","clientMode":"{mode}","region":"{region}","services":{services},"extra":1}}"#).into_bytes()
    }

    #[test]
    fn a_valid_notify_parses_and_unknown_fields_are_ignored() {
        let n = parse(
            "gw",
            &notify("destination", "AQGA", "eu-west-1", r#"["SSH","HTTP"]"#),
        )
        .unwrap();
        assert_eq!(n.region, "eu-west-1");
        assert_eq!(n.services, ["SSH", "HTTP"]);
        assert_eq!(n.token.expose(), "AQGA");
    }

    #[test]
    fn each_invalid_notify_is_refused_with_its_reason() {
        type Case = (Vec<u8>, fn(&Refusal) -> bool);
        let cases: Vec<Case> = vec![
            (notify("source", "AQGA", "us-east-1", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Mode(_))
            }),
            (notify("destination", "", "us-east-1", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Token(_))
            }),
            (
                notify("destination", &"a".repeat(4097), "us-east-1", r#"["SSH"]"#),
                |r| matches!(r, Refusal::Token(_)),
            ),
            (notify("destination", "AQGA", "mars", r#"["SSH"]"#), |r| {
                matches!(r, Refusal::Region(_))
            }),
            (
                notify("destination", "AQGA", "us-east-1", r#"["A","B","C","D"]"#),
                |r| matches!(r, Refusal::ServiceCount(4)),
            ),
            (notify("destination", "AQGA", "us-east-1", "[]"), |r| {
                matches!(r, Refusal::ServiceCount(0))
            }),
            (
                notify("destination", "AQGA", "us-east-1", r#"["no space"]"#),
                |r| matches!(r, Refusal::ServiceName(_)),
            ),
            (b"{not json".to_vec(), |r| matches!(r, Refusal::Json(_))),
            (vec![0xff, 0xfe, 0x00], |r| matches!(r, Refusal::NotUtf8)),
        ];
        for (payload, expected) in cases {
            let refusal = parse("gw", &payload).unwrap_err();
            assert!(expected(&refusal), "{refusal:?}");
            assert!(!refusal.to_string().contains("AQGA"));
        }
    }
}
