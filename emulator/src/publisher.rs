//! The service side of `$aws/things/<thing>/tunnels/notify`: an MQTT client (mutual TLS, as
//! an admin identity) that publishes notifies QoS 1, as AWS IoT does on OpenTunnel and
//! RotateTunnelAccessToken.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

#[derive(Clone)]
pub struct PublisherConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    /// Trusts the broker and carries the admin client certificate.
    pub tls: Arc<rustls::ClientConfig>,
    /// Where notifies go; `{thing}` is replaced by the thing name.
    pub topic: String,
}

/// AWS IoT's notify topic, as a `PublisherConfig::topic` template.
pub const AWS_NOTIFY_TOPIC: &str = "$aws/things/{thing}/tunnels/notify";

pub struct Publisher {
    client: AsyncClient,
    topic: String,
    connected: watch::Receiver<bool>,
    _events: AbortOnDropHandle<()>,
}

impl Publisher {
    pub fn start(cfg: PublisherConfig) -> Self {
        let topic = cfg.topic;
        let mut opts = MqttOptions::new(cfg.client_id, cfg.host, cfg.port);
        opts.set_keep_alive(Duration::from_secs(30))
            // Large enough for hostile tests (an oversized notify), not only real ones.
            .set_max_packet_size(1 << 20, 1 << 20)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                cfg.tls,
            )));
        let (client, mut events) = AsyncClient::new(opts, 64);
        let mut net = rumqttc::NetworkOptions::new();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let (tx, connected) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tx.send_replace(true);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tx.send_replace(false);
                        debug!("emulator publisher: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Publisher {
            client,
            topic,
            connected,
            _events: AbortOnDropHandle::new(task),
        }
    }

    /// Waits until the publisher is connected to the broker.
    pub async fn wait_connected(&self) {
        let mut rx = self.connected.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .map_err(|e| e.to_string())
    }

    /// The notify AWS IoT publishes for a destination token.
    pub async fn publish_notify(
        &self,
        thing: &str,
        token: &str,
        region: &str,
        services: &[String],
    ) -> Result<(), String> {
        let body = serde_json::json!({
            "clientAccessToken": token,
            "clientMode": "destination",
            "region": region,
            "services": services,
        });
        let topic = self.topic.replace("{thing}", thing);
        self.publish(&topic, body.to_string().into_bytes()).await
    }
}
