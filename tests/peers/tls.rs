//! Where the agent connects and whom it trusts: the data-plane endpoint from the notify's
//! region (verified by name in TLS, reached through `tunnel.resolve`), `mqtt.ca` pinning the
//! broker, `tunnel.ca_only` pinning the data plane.

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_endpoint_comes_from_the_notifys_region() {
    // No tunnel.endpoint: the agent derives data.tunneling.iot.eu-west-1.amazonaws.com from
    // the notify, verifies that name in TLS, and reaches it through tunnel.resolve.
    let rig = Rig::start(RigOptions {
        region: "eu-west-1",
        ..RigOptions::default()
    })
    .await;
    const DATA_HOST: &str = "data.tunneling.iot.eu-west-1.amazonaws.com";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let resolve = format!("resolve = {{ \"{DATA_HOST}\" = \"{}\" }}", rig.emu.addr());
    let cfg = rig.agent_config_with(
        "gw-region",
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            tunnel: &resolve,
            region_endpoint: true,
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-region", &["SSH"], 30).await;
    let line = agent.expect("websocket connected").await;
    assert!(line.contains(&format!("wss://{DATA_HOST}:443")), "{line}");
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_ca_pins_the_broker_even_when_the_platform_trusts_it() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config("gw-pin", "SSH = 22", "");
    // mqtt.ca names another CA; the platform store (SSL_CERT_FILE) holds the broker's.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("ca = \"{}\"", rig.files.ca.display()),
        &format!("ca = \"{}\"", rig.emu_ca.display()),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let platform = rig.files.ca.to_str().unwrap();
    let mut agent = rig.spawn_agent_with_env(&cfg, &[("SSL_CERT_FILE", platform)]);
    let line = agent.expect("MQTT connection ended").await;
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "{line}"
    );
    assert_eq!(agent.count("subscribed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_ca_only_pins_the_data_plane() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config_with(
        "gw-pin2",
        &ConfigExtra {
            services: "SSH = 22",
            tunnel: "ca_only = true",
            ..ConfigExtra::default()
        },
    );
    // tunnel.ca names another CA (the broker's); the platform store holds the emulator's.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("ca = \"{}\"\nca_only", rig.emu_ca.display()),
        &format!("ca = \"{}\"\nca_only", rig.files.ca.display()),
    );
    assert!(
        text.contains(&format!("ca = \"{}\"\nca_only", rig.files.ca.display())),
        "{text}"
    );
    std::fs::write(&cfg, text).unwrap();
    let platform = rig.emu_ca.to_str().unwrap();
    let mut agent = rig.spawn_agent_with_env(&cfg, &[("SSL_CERT_FILE", platform)]);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-pin2", &["SSH"], 30).await;
    let line = agent.expect("TLS handshake").await;
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "{line}"
    );
    assert!(!rig.emu.is_connected(&t.tunnel_id, Mode::Destination));
}
