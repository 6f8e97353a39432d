//! One MQTT client's life: connect, subscribe after every CONNACK, hand notifies to the
//! agent, and reconnect with backoff when the connection ends. `Connection` holds what the
//! loop knows between events; each kind of event has its own method.

use std::time::{Duration, SystemTime};

use rumqttc::{
    AsyncClient, ConnAck, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet,
    StateError, SubAck, TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::audit_out::{self, AuditOut};
use super::shadow_out::{self, ShadowOut};
use super::subscriptions::Subscriptions;
use super::{
    Ack, DISCONNECT_GRACE, MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET, MQTT_CONNECT_TIMEOUT,
    MqttPhase, MqttState, Notice, NotifyClient, OWN_TOPIC_REFUSED, RECONNECT_BASE, RECONNECT_CAP,
    REQUEST_QUEUE, describe, policy_statement, silence_limit, topic_statement,
};
use crate::backoff::MqttReconnect;
use crate::protocol::notify::{notify_topic, parse};
use crate::proxy_front::ProxyFront;

/// Whether the loop goes on.
type Go = bool;

/// The client's state between events.
pub(super) struct Connection {
    cfg: NotifyClient,
    client: AsyncClient,
    events: EventLoop,
    front: Option<ProxyFront>,
    subs: Subscriptions,
    policy: MqttReconnect,
    /// Set from CONNACK until the connection ends.
    connected_at: Option<Instant>,
    last_rx: Instant,
    /// Set after an unreadable message: the next connection only wipes the session.
    purging: bool,
    downstream: watch::Receiver<Vec<String>>,
    state: watch::Sender<MqttState>,
    out: mpsc::Sender<Notice>,
    cancel: CancellationToken,
    broker: String,
    silence: Duration,
    /// The shadow document's pacing and source, when `[shadow] enabled`.
    shadow: Option<ShadowOut>,
    /// Audit events to publish, when `audit.mqtt_topic` is set.
    audit: Option<AuditOut>,
    /// Who queued each publish not yet sent, in order: rumqttc reports only packet ids.
    publishers: std::collections::VecDeque<Publisher>,
}

/// What published a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Publisher {
    Shadow,
    Audit,
}

impl Connection {
    /// The client and its event loop; `None` (after waiting for `cancel`) when the proxy
    /// front cannot start.
    pub(super) async fn start(
        mut cfg: NotifyClient,
        out: mpsc::Sender<Notice>,
        state: watch::Sender<MqttState>,
        cancel: CancellationToken,
        spread: Duration,
    ) -> Option<Connection> {
        let mut opts = MqttOptions::new(&cfg.config.client_id, &cfg.config.host, cfg.config.port);
        opts.set_keep_alive(cfg.config.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                cfg.tls.clone(),
            )));
        let front = match start_front(&cfg, &mut opts, &state).await {
            Ok(front) => front,
            Err(()) => {
                cancel.cancelled().await;
                return None;
            }
        };
        let (client, mut events) = AsyncClient::new(opts, REQUEST_QUEUE);
        // Notifies are small and latency matters: no Nagle delay.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        // Connect, TLS and CONNACK; through a proxy, longer than the front gives the proxy
        // (`proxy_front`), so the proxy's failure is the one reported.
        net.set_connection_timeout(MQTT_CONNECT_TIMEOUT.as_secs());
        events.set_network_options(net);
        let mut downstream = cfg.downstream.clone();
        let subs = Subscriptions::new(&cfg.thing, &cfg.topic, &downstream.borrow_and_update());
        let shadow = cfg
            .shadow
            .clone()
            .map(|reports| ShadowOut::new(&cfg.thing, reports));
        let audit = cfg.audit_out.take().map(|(t, rx)| AuditOut::new(t, rx));
        Some(Connection {
            shadow,
            audit,
            publishers: Default::default(),
            broker: format!("{}:{}", cfg.config.host, cfg.config.port),
            silence: silence_limit(cfg.config.keep_alive),
            policy: MqttReconnect::new(RECONNECT_BASE, RECONNECT_CAP, spread),
            cfg,
            client,
            events,
            front,
            subs,
            connected_at: None,
            last_rx: Instant::now(),
            purging: false,
            downstream,
            state,
            out,
            cancel,
        })
    }

    /// Runs until `cancel`.
    pub(super) async fn run(mut self) {
        self.policy.connecting(Instant::now());
        while self.step().await {}
    }

    /// Waits for the next event and handles it.
    async fn step(&mut self) -> Go {
        let connected = self.connected_at.is_some();
        let event = tokio::select! {
            _ = self.cancel.cancelled() => {
                disconnect(&self.client, &mut self.events).await;
                return false;
            }
            Ok(()) = self.downstream.changed() => match self.on_downstream_changed() {
                Ok(()) => return true,
                Err(why) => Err(why),
            },
            () = shadow_out::due(&mut self.shadow, connected) => {
                if let Some(s) = &mut self.shadow
                    && s.publish(&self.client)
                {
                    self.publishers.push_back(Publisher::Shadow);
                }
                return true;
            }
            () = audit_out::due(&mut self.audit, connected) => {
                if let Some(a) = &mut self.audit
                    && a.publish(&self.client)
                {
                    self.publishers.push_back(Publisher::Audit);
                }
                return true;
            }
            _ = tokio::time::sleep_until(self.last_rx + self.silence), if connected => {
                // Drop the dead connection; the next poll reconnects.
                self.events.clean();
                Err(format!("nothing from the broker for {:?} (1.5 x keep-alive): the link is dead", self.silence))
            }
            e = self.events.poll() => e.map_err(|e| self.poll_error(e)),
        };
        if matches!(event, Ok(Event::Incoming(_))) {
            self.last_rx = Instant::now();
        }
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => self.on_connack(ack).await,
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                self.subs.sent(pkid);
                true
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => match self.on_suback(&ack) {
                Ok(()) => true,
                Err(why) => self.drop_and_retry(why).await,
            },
            Ok(Event::Incoming(Packet::Publish(p))) => self.on_publish(p).await,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                self.on_sent(pkid);
                true
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(s) = &mut self.shadow {
                    s.acked(ack.pkid);
                }
                if let Some(a) = &mut self.audit {
                    a.acked(ack.pkid);
                }
                true
            }
            Ok(_) => true,
            Err(why) => self.on_error(why).await,
        }
    }

    /// A publish went out: its packet id belongs to whoever queued it first.
    fn on_sent(&mut self, pkid: u16) {
        match self.publishers.pop_front() {
            Some(Publisher::Shadow) => self.shadow.as_mut().map(|s| s.sent(pkid)),
            Some(Publisher::Audit) => self.audit.as_mut().map(|a| a.sent(pkid)),
            None => None,
        };
    }

    /// What ended a poll; an unreadable (oversized) message starts a purge.
    fn poll_error(&mut self, e: ConnectionError) -> String {
        if matches!(
            &e,
            ConnectionError::MqttState(StateError::Deserialization(
                rumqttc::Error::PayloadSizeLimitExceeded(_)
            ))
        ) {
            self.purging = true;
        }
        describe(&e, self.front.as_ref())
    }

    /// SIGHUP changed the downstream things: (un)subscribe now when connected; otherwise
    /// the next CONNACK subscribes to everything.
    fn on_downstream_changed(&mut self) -> Result<(), String> {
        let things = self.downstream.borrow_and_update().clone();
        let (added, removed) = self.subs.set_downstream(&things);
        if self.connected_at.is_none() {
            return Ok(());
        }
        let queued = self.subs.subscribe(&self.client, &added).and_then(|()| {
            removed.iter().try_for_each(|topic| {
                self.client
                    .try_unsubscribe(topic.clone())
                    .map_err(|e| format!("cannot queue the unsubscribe from {topic}: {e}"))
            })
        });
        // On failure the next CONNACK queues the complete sets.
        queued.inspect_err(|_| self.events.clean())
    }

    async fn on_connack(&mut self, ack: ConnAck) -> Go {
        self.connected_at = Some(Instant::now());
        harden_socket(&self.cfg).await;
        if self.purging {
            // A clean session wiped the unreadable message the broker kept redelivering;
            // go back to a persistent session at once.
            self.purging = false;
            self.events.mqtt_options.set_clean_session(false);
            self.events.clean();
            self.connected_at = None;
            info!(broker = %self.broker, "MQTT session wiped; reconnecting with a persistent session");
            return self.pause(None).await;
        }
        debug!(broker = %self.broker, session_present = ack.session_present, "MQTT connected");
        let now = SystemTime::now();
        self.state.send_modify(|s| {
            s.phase = MqttPhase::Connected;
            s.since = now;
        });
        if let Some(s) = &mut self.shadow {
            s.connected(now);
        }
        // Always resubscribe: a broker may have lost the persistent session. Requests of the
        // last connection still queued would be replayed ahead of these and break the
        // packet-id bookkeeping: drop them; the sets below are complete.
        // A shadow document of the last connection is stale: this one owes a fresh one. An
        // audit event unacknowledged is sent again by `AuditOut` itself.
        let (shadow, audit) = (self.shadow.as_ref(), self.audit.as_ref());
        self.events.pending.retain(|r| match r {
            rumqttc::Request::Subscribe(_) | rumqttc::Request::Unsubscribe(_) => false,
            rumqttc::Request::Publish(p) => {
                !shadow.is_some_and(|s| s.is_ours(&p.topic))
                    && !audit.is_some_and(|a| a.is_ours(&p.topic))
            }
            _ => true,
        });
        match self.subs.after_connack(&self.client) {
            Ok(()) => true,
            Err(why) => self.drop_and_retry(why).await,
        }
    }

    /// A refused subscription of the own topic leaves the agent deaf: reconnect with
    /// backoff and ask again (a fixed device policy is picked up), as AWS IoT would
    /// disconnect anyway. A downstream thing refused is logged once; the others keep working.
    fn on_suback(&mut self, ack: &SubAck) -> Result<(), String> {
        let outcome = self
            .subs
            .acked(ack.pkid, &ack.return_codes)
            .map_err(|e| e.to_string())?;
        let refused = self.subs.refused_things();
        self.state.send_if_modified(|s| {
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
        match outcome.own {
            Some(false) => Err(format!(
                "{OWN_TOPIC_REFUSED} {}: check that the device policy allows iot:Subscribe and iot:Receive on it ({})",
                self.cfg.topic,
                topic_statement(&self.cfg.topic)
            )),
            Some(true) => {
                self.on_subscribed();
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn on_subscribed(&mut self) {
        let (broker, topic) = (&self.broker, &self.cfg.topic);
        if self.policy.failures() > 0 {
            info!(broker = %broker, attempts = self.policy.failures() + 1, topic = %topic, "MQTT reconnected; subscribed to tunnel notifications");
        } else {
            info!(broker = %broker, topic = %topic, "subscribed to tunnel notifications");
        }
        self.state.send_modify(|s| {
            s.phase = MqttPhase::Subscribed;
            s.since = SystemTime::now();
        });
    }

    /// Acknowledged by the agent once it acted on it, or here if refused; not at all when
    /// the agent stops first (the broker delivers it again).
    async fn on_publish(&mut self, p: rumqttc::Publish) -> Go {
        let mut header = p.clone();
        header.payload = bytes::Bytes::new();
        let ack = Ack {
            client: self.client.clone(),
            publish: header,
        };
        let thing = self.subs.thing_of(&p.topic);
        tokio::select! {
            _ = self.cancel.cancelled() => {
                disconnect(&self.client, &mut self.events).await;
                false
            }
            () = hand_over(thing, &p.topic, &p.payload, ack, &self.out, &self.cfg.audit) => true,
        }
    }

    /// Ends a connection the broker still holds, then as `on_error`.
    async fn drop_and_retry(&mut self, why: String) -> Go {
        self.events.clean();
        self.on_error(why).await
    }

    /// The connection ended (or could not be made): says why, then waits as the reconnect
    /// policy says; `false` if cancelled meanwhile.
    async fn on_error(&mut self, why: String) -> Go {
        let up_for = self.connected_at.take().map(|t| t.elapsed());
        if self.shadow.as_mut().is_some_and(|s| !s.connection_ended()) {
            self.shadow = None;
        }
        if self.audit.as_mut().is_some_and(|a| !a.connection_ended()) {
            self.audit = None;
        }
        self.publishers.clear();
        if self.purging {
            self.events.mqtt_options.set_clean_session(true);
            warn!(broker = %self.broker, "{why}: it cannot be read, and with a persistent session the broker would redeliver it on every reconnect; wiping the MQTT session to drop it (notifies queued behind it are lost)");
        } else if self.policy.failures() == 0 {
            warn!(broker = %self.broker, "MQTT connection ended: {why}; reconnecting with backoff");
        } else {
            debug!(broker = %self.broker, attempt = self.policy.failures() + 1, "MQTT connection failed: {why}");
        }
        self.state.send_modify(|s| {
            s.phase = MqttPhase::Connecting;
            s.since = SystemTime::now();
            s.last_error = Some(why);
        });
        self.pause(up_for).await
    }

    /// Waits before the next CONNECT, as the reconnect policy says; `false` if cancelled.
    async fn pause(&mut self, up_for: Option<Duration>) -> Go {
        let delay = self.policy.next_delay(Instant::now(), up_for);
        tokio::select! {
            _ = self.cancel.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        self.policy.connecting(Instant::now());
        true
    }
}

/// Through a proxy, rumqttc goes through the bounded front (`proxy_front`). `Err` when the
/// front cannot start: MQTT stays down (said in the status).
async fn start_front(
    cfg: &NotifyClient,
    opts: &mut MqttOptions,
    state: &watch::Sender<MqttState>,
) -> Result<Option<ProxyFront>, ()> {
    let Some(p) = &cfg.proxy else {
        return Ok(None);
    };
    match ProxyFront::start(p.clone(), &cfg.config.host, cfg.config.port).await {
        Ok(front) => {
            opts.set_proxy(front.for_rumqttc());
            Ok(Some(front))
        }
        Err(e) => {
            state.send_modify(|s| {
                s.last_error = Some(format!("cannot start the local proxy front: {e}"));
            });
            warn!("MQTT through proxy {p}: cannot start the local front: {e}; MQTT stays down");
            Err(())
        }
    }
}

/// Keepalive and user timeout on rumqttc's socket, found by the broker's address.
async fn harden_socket(cfg: &NotifyClient) {
    // Through a proxy, the front hardened its own socket to the proxy.
    if cfg.proxy.is_some() {
        return;
    }
    // Bounded: a slow resolver must not hold up the subscription.
    let (host, port) = (cfg.config.host.as_str(), cfg.config.port);
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(addrs)) => {
            let addrs: Vec<_> = addrs.collect();
            let n = crate::net::harden_sockets_to(&addrs);
            debug!(sockets = n, "keepalive set on the MQTT socket");
        }
        Ok(Err(e)) => debug!("keepalive on the MQTT socket: cannot resolve the broker: {e}"),
        Err(_) => debug!("keepalive on the MQTT socket: the broker's name did not resolve in 2 s"),
    }
}

/// A notify to the agent, or refused (and acknowledged) here.
async fn hand_over(
    thing: Option<&str>,
    topic: &str,
    payload: &[u8],
    ack: Ack,
    out: &mpsc::Sender<Notice>,
    audit: &crate::audit::Trail,
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
            let e = crate::audit::Event::new(crate::audit::Kind::NotifyRefused, thing);
            audit.record(&e.because(&refusal.to_string()));
            ack.send();
        }
    }
}

/// A clean DISCONNECT, so the broker does not log a dropped connection.
async fn disconnect(client: &AsyncClient, events: &mut EventLoop) {
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
