//! An embedded MQTT broker (rumqttd) with mutual TLS, so the demo needs no installed broker.
//! The demo's broker; the tests use a real mosquitto.

use std::net::SocketAddr;
use std::path::Path;

/// Starts rumqttd on `port` (127.0.0.1), verifying client certificates against `ca`. It runs
/// on its own threads for the life of the process.
pub fn start(port: u16, ca: &Path, cert: &Path, key: &Path) -> Result<SocketAddr, String> {
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    let config = serde_json::json!({
        "id": 0,
        "router": {
            "id": 0,
            "max_connections": 64,
            "max_outgoing_packet_count": 200,
            "max_segment_size": 1048576,
            "max_segment_count": 4,
        },
        "v4": {
            "1": {
                "name": "demo",
                "listen": listen.to_string(),
                "next_connection_delay_ms": 1,
                "tls": {
                    "capath": ca.display().to_string(),
                    "certpath": cert.display().to_string(),
                    "keypath": key.display().to_string(),
                },
                "connections": {
                    "connection_timeout_ms": 60000,
                    "max_payload_size": 20480,
                    "max_inflight_count": 100,
                    "dynamic_filters": true,
                },
            },
        },
    });
    let config: rumqttd::Config =
        serde_json::from_value(config).map_err(|e| format!("broker config: {e}"))?;
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                eprintln!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(listen)
}
