//! `$aws/things/<thing>/tunnels/notify` over MQTT (rumqttc, mutual TLS): a persistent
//! session, QoS 1, resubscribed after every connect, reconnecting forever with backoff. Each
//! payload is parsed tolerantly (unknown fields ignored) but validated before the agent sees it.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode, TlsConfiguration,
    Transport,
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::bridge::reconnect_delay;
use crate::config::MqttConfig;
use crate::protocol::{self, is_valid_region, is_valid_service_id};
use crate::secret::Secret;

/// A notify that passed validation: a destination token for a region and 1-3 services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub token: Secret,
    pub region: String,
    pub services: Vec<String>,
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

/// Rule (spec §5): what a usable notify looks like.
pub fn parse(payload: &[u8]) -> Result<Notification, Refusal> {
    let text = std::str::from_utf8(payload).map_err(|_| Refusal::NotUtf8)?;
    let raw: RawNotify = serde_json::from_str(text).map_err(|e| Refusal::Json(e.to_string()))?;
    // Wrap the token at once so it is wiped whatever happens next.
    let token = Secret::new(raw.token.unwrap_or_default());
    let mode = raw.mode.unwrap_or_default();
    if mode != "destination" {
        return Err(Refusal::Mode(mode));
    }
    let region = raw.region.unwrap_or_default();
    if !is_valid_region(&region) {
        return Err(Refusal::Region(region));
    }
    if let Some(problem) = protocol::access_token_problem(token.expose()) {
        return Err(Refusal::Token(problem));
    }
    let services = raw.services.unwrap_or_default();
    if !(1..=3).contains(&services.len()) {
        return Err(Refusal::ServiceCount(services.len()));
    }
    if let Some(bad) = services.iter().find(|s| !is_valid_service_id(s)) {
        return Err(Refusal::ServiceName(bad.clone()));
    }
    Ok(Notification {
        token,
        region,
        services,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MqttState {
    Connecting,
    Connected,
    /// Subscribed to the notify topic: notifications can arrive.
    Subscribed,
}

pub struct NotifyClient {
    pub config: MqttConfig,
    pub tls: Arc<rustls::ClientConfig>,
    pub topic: String,
}

/// Notifications waiting for the agent.
pub const QUEUE: usize = 16;
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(60);
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

impl NotifyClient {
    /// Runs until `cancel`; valid notifications go to `out`, refusals are logged here.
    pub async fn run(
        self,
        out: mpsc::Sender<Notification>,
        state: watch::Sender<MqttState>,
        cancel: CancellationToken,
    ) {
        let mut opts =
            MqttOptions::new(&self.config.client_id, &self.config.host, self.config.port);
        opts.set_keep_alive(self.config.keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(16 * 1024, 16 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.tls.clone(),
            )));
        let (client, mut events) = AsyncClient::new(opts, 10);
        // Notifies are small and latency matters: no Nagle delay.
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let broker = format!("{}:{}", self.config.host, self.config.port);
        let mut failures: u32 = 0;
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => {
                    // A clean DISCONNECT, so the broker does not log a dropped connection.
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
                    return;
                }
                e = events.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    debug!(broker = %broker, session_present = ack.session_present, "MQTT connected");
                    state.send_replace(MqttState::Connected);
                    // Always resubscribe: a broker may have lost the persistent session.
                    if let Err(e) = client.try_subscribe(&self.topic, QoS::AtLeastOnce) {
                        error!("cannot queue the subscription to {}: {e}", self.topic);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure))
                    {
                        error!(topic = %self.topic, "the broker refused the subscription: check the device policy allows iot:Subscribe and iot:Receive on this topic");
                    } else {
                        // Only a confirmed subscription ends a failure streak: a broker that
                        // accepts and then drops us must not reset the backoff.
                        if failures > 0 {
                            info!(broker = %broker, attempts = failures + 1, topic = %self.topic, "MQTT reconnected; subscribed to tunnel notifications");
                        } else {
                            info!(broker = %broker, topic = %self.topic, "subscribed to tunnel notifications");
                        }
                        failures = 0;
                        state.send_replace(MqttState::Subscribed);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    self.on_publish(&p.topic, &p.payload, &out).await;
                    // Acknowledged once handed over: a crash before that means redelivery.
                    let _ = client.try_ack(&p);
                }
                Ok(_) => {}
                Err(e) => {
                    if failures == 0 {
                        warn!(broker = %broker, "MQTT connection failed: {e}; reconnecting with backoff");
                    } else {
                        debug!(broker = %broker, attempt = failures + 1, "MQTT connection failed: {e}");
                    }
                    failures = failures.saturating_add(1);
                    state.send_replace(MqttState::Connecting);
                    let delay = reconnect_delay(failures, RECONNECT_MIN, RECONNECT_MAX);
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    async fn on_publish(&self, topic: &str, payload: &[u8], out: &mpsc::Sender<Notification>) {
        if topic != self.topic {
            warn!(topic, "message on an unexpected topic ignored");
            return;
        }
        match parse(payload) {
            Ok(n) => {
                info!(region = %n.region, services = ?n.services, token = %n.token, "tunnel notification received");
                let _ = out.send(n).await;
            }
            Err(refusal) => warn!(bytes = payload.len(), "notify refused: {refusal}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notify(mode: &str, token: &str, region: &str, services: &str) -> Vec<u8> {
        format!(r#"{{"clientAccessToken":"{token}","clientMode":"{mode}","region":"{region}","services":{services},"extra":1}}"#).into_bytes()
    }

    #[test]
    fn a_valid_notify_parses_and_unknown_fields_are_ignored() {
        let n = parse(&notify(
            "destination",
            "AQGA",
            "eu-west-1",
            r#"["SSH","HTTP"]"#,
        ))
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
            let refusal = parse(&payload).unwrap_err();
            assert!(expected(&refusal), "{refusal:?}");
            assert!(!refusal.to_string().contains("AQGA"));
        }
    }
}
