//! `$aws/things/<thing>/tunnels/notify` over MQTT (rumqttc, mutual TLS): a persistent
//! session, QoS 1, resubscribed after every connect, reconnecting forever with backoff. Each
//! payload is parsed (`protocol::notify`) before the agent sees it. `connection` runs the
//! client; `subscriptions` keeps the topics and what the broker said of each.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rumqttc::{AsyncClient, ConnectionError, StateError};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::config::MqttConfig;
pub use crate::protocol::notify::Notification;
use crate::proxy_front::ProxyFront;
use subscriptions::{FILTERS_PER_SUBSCRIBE, MAX_UNSUBSCRIBE};

mod audit_out;
mod connection;
mod in_flight;
mod shadow_out;
mod subscriptions;

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
    config: MqttConfig,
    tls: Arc<rustls::ClientConfig>,
    /// The gateway's own thing, and its notify topic.
    thing: String,
    topic: String,
    /// The downstream things whose notify topics it also follows (changes on SIGHUP).
    downstream: watch::Receiver<Vec<String>>,
    /// HTTP proxy to the broker (`[proxy]`, unless `no_proxy` names it).
    proxy: Option<crate::proxy::HttpProxy>,
    /// The agent's shadow report, when `[shadow] enabled`.
    shadow: Option<watch::Receiver<crate::shadow::Report>>,
    /// Where refused notifies are recorded.
    audit: crate::audit::Trail,
    /// `audit.mqtt_topic` and the agent's queue of events for it.
    audit_out: Option<(String, mpsc::Receiver<String>)>,
}

/// Notifications waiting for the agent.
pub const QUEUE: usize = 16;
/// Largest incoming MQTT packet: AWS IoT's 128 KiB message limit plus topic and header.
/// A larger one cannot be read; `connection::Connection::poll_error` and `on_error` drop it by wiping the session.
pub const MAX_INCOMING_PACKET: usize = 128 * 1024 + 1024;
/// The agent only sends small packets (CONNECT, SUBSCRIBE, acks) and shadow documents
/// (`shadow::MAX_DOCUMENT`, 8 KiB).
const MAX_OUTGOING_PACKET: usize = 16 * 1024;
const RECONNECT_BASE: Duration = Duration::from_millis(500);
const RECONNECT_CAP: Duration = Duration::from_secs(60);
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);
/// Time one MQTT connection attempt may take, to its CONNACK.
const MQTT_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Requests waiting for rumqttc's event loop (subscribes, unsubscribes, acks), sized for the
/// worst case after a CONNACK: every SUBSCRIBE batch, every remembered unsubscribe, an ack
/// for each notify the agent may hold, one shadow document and one audit event (each one at
/// a time). A
/// request that still finds no room ends the connection
/// (`connection::Connection::drop_and_retry`): the next CONNACK queues everything again.
pub const REQUEST_QUEUE: usize = MAX_UNSUBSCRIBE
    + (crate::config::MAX_DOWNSTREAM_THINGS + 1).div_ceil(FILTERS_PER_SUBSCRIBE)
    + QUEUE
    + 1
    + 1
    + 2;
/// Rule (policy hint): the IoT policy statements that let the gateway's certificate follow a
/// thing's notify topic.
pub fn policy_statement(thing: &str) -> String {
    topic_statement(&crate::protocol::notify::notify_topic(thing))
}

/// The same for any topic (a remapped `mqtt.notify_topic`).
pub fn topic_statement(topic: &str) -> String {
    format!(
        r#"{{"Effect":"Allow","Action":"iot:Subscribe","Resource":"arn:aws:iot:REGION:ACCOUNT:topicfilter/{topic}"}}, {{"Effect":"Allow","Action":"iot:Receive","Resource":"arn:aws:iot:REGION:ACCOUNT:topic/{topic}"}}"#
    )
}

/// How the agent's error for a refused subscription of its own topic begins (`status`
/// shows it; `doctor` recognises it).
pub const OWN_TOPIC_REFUSED: &str = "the broker refused the subscription to";

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
    /// The client of `cfg`'s thing, its broker reached with `tls`; `downstream` names the
    /// downstream things to follow as they change; `shadow`, the report to publish.
    pub fn new(
        cfg: &crate::config::Config,
        tls: Arc<rustls::ClientConfig>,
        downstream: watch::Receiver<Vec<String>>,
        shadow: Option<watch::Receiver<crate::shadow::Report>>,
    ) -> Self {
        let proxy = cfg.proxy.as_ref();
        NotifyClient {
            config: cfg.mqtt.clone(),
            tls,
            thing: cfg.thing_name.clone(),
            topic: cfg.notify_topic(),
            downstream,
            proxy: proxy.and_then(|p| p.for_host(&cfg.mqtt.host)).cloned(),
            shadow,
            audit: crate::audit::Trail::default(),
            audit_out: None,
        }
    }

    /// Records refused notifies in `trail`, and publishes `events` to `cfg`'s
    /// `audit.mqtt_topic` when it has one.
    pub fn with_audit(
        mut self,
        cfg: &crate::config::Config,
        trail: crate::audit::Trail,
        events: Option<mpsc::Receiver<String>>,
    ) -> Self {
        self.audit = trail;
        self.audit_out = cfg.audit.mqtt_topic.clone().zip(events);
        self
    }

    /// Runs until `cancel`; valid notifications go to `out`, refusals are logged here.
    pub async fn run(
        self,
        out: mpsc::Sender<Notice>,
        state: watch::Sender<MqttState>,
        cancel: CancellationToken,
        spread: Duration,
    ) {
        if let Some(c) = connection::Connection::start(self, out, state, cancel, spread).await {
            c.run().await;
        }
    }
}
