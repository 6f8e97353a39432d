//! Helpers for end-to-end tests of the agent process: tunnels opened through boto3, the
//! agent serving them, this project's source side, checked transfers, the destination's
//! connects as the service saw them, and `securetunnel-agent status`.

use securetunnel_agent::bridge::Phase;
use securetunnel_agent::protocol::{Format, Mode};
use securetunnel_emulator::testkit::{EchoService, echo_tcp, echo_transfer};
use securetunnel_emulator::{Emulator, PeerEventKind, TunnelTokens};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::rig::{AgentProc, ConfigExtra, Rig};
use super::*;

/// Waits until `cond` holds on the emulator, re-checking on each of its changes.
pub async fn until(emu: &Emulator, what: &str, cond: impl Fn(&Emulator) -> bool) {
    let mut changes = emu.changes();
    within(what, async {
        while !cond(emu) {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

pub fn tokens(open: &Value) -> TunnelTokens {
    TunnelTokens {
        tunnel_id: open["tunnelId"].as_str().unwrap().into(),
        source_access_token: open["sourceAccessToken"].as_str().unwrap().into(),
        destination_access_token: open["destinationAccessToken"].as_str().unwrap().into(),
    }
}

/// RotateTunnelAccessToken with a destinationConfig for the thing's SSH service.
pub async fn rotate(rig: &Rig, tunnel_id: &str, mode: &str, thing: &str) -> Value {
    let params = json!({"tunnelId": tunnel_id, "clientMode": mode, "destinationConfig": dest_config(thing, &["SSH"])});
    rig.api("rotate_tunnel_access_token", params).await.unwrap()
}

/// This project's source side for the tunnel, listening on free ports, ready for clients.
pub async fn ready_source(
    emu: &Emulator,
    t: &TunnelTokens,
    mappings: &str,
) -> (Running, SourceListenersAddrs) {
    let (mut src, addrs) = source(emu, t, mappings, Format::V3).await;
    src.wait_phase(Phase::Ready).await;
    (src, addrs)
}

pub fn dest_config(thing: &str, services: &[&str]) -> Value {
    json!({"thingName": thing, "services": services})
}

pub async fn open(rig: &Rig, thing: &str, services: &[&str], minutes: u32) -> TunnelTokens {
    let r = rig
        .api(
            "open_tunnel",
            json!({
                "description": "e2e",
                "destinationConfig": dest_config(thing, services),
                "timeoutConfig": {"maxLifetimeTimeoutMinutes": minutes},
            }),
        )
        .await
        .unwrap();
    tokens(&r)
}

/// Opens a 30-minute tunnel to `thing` and waits for the agent's destination to connect;
/// the tokens and the tunnel id.
pub async fn open_connected(rig: &Rig, thing: &str, services: &[&str]) -> (TunnelTokens, String) {
    let t = open(rig, thing, services, 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    (t, id)
}

/// Agent for `thing` serving every service in `services` from one echo service.
pub async fn agent(
    rig: &Rig,
    thing: &str,
    services: &[&str],
    extra: &str,
) -> (AgentProc, EchoService) {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map: String = services
        .iter()
        .map(|s| format!("{s} = \"{}\"\n", echo.addr.unwrap()))
        .collect();
    let cfg = rig.agent_config(thing, &map, extra);
    let mut a = rig.spawn_agent(&cfg);
    a.expect("subscribed to tunnel notifications").await;
    (a, echo)
}

/// Agent for `thing` reaching MQTT through `mqtt_port` (a relay or front in front of
/// mosquitto), reconnect spread off, serving SSH from an echo service; subscribed.
pub async fn agent_via_mqtt_port(
    rig: &Rig,
    thing: &str,
    mqtt_port: u16,
) -> (AgentProc, EchoService) {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config_with(
        thing,
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            mqtt: "reconnect_spread_secs = 0",
            mqtt_port: Some(mqtt_port),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    (agent, echo)
}

pub async fn transfer(addrs: &SourceListenersAddrs, service: &str, seed: u64) {
    let c = TcpStream::connect(addrs.get(service)).await.unwrap();
    within(
        "transfer through the agent",
        echo_transfer(c, 1 << 20, seed),
    )
    .await
    .unwrap();
}

/// Connected destination peers of a tunnel, oldest first: (peer id, access token, client token).
pub fn destination_connects(rig: &Rig, id: &str) -> Vec<(u64, String, Option<String>)> {
    rig.emu
        .peer_events(id)
        .into_iter()
        .filter(|e| e.mode == Mode::Destination && e.kind == PeerEventKind::Connected)
        .map(|e| (e.peer, e.access_token, e.client_token))
        .collect()
}

/// `securetunnel-agent status [--json]` against `cfg`: exit code, stdout, stderr.
pub async fn status_cmd(cfg: &std::path::Path, json: bool) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"));
    cmd.arg("status").arg("--config").arg(cfg);
    if json {
        cmd.arg("--json");
    }
    let out = within("status answers", cmd.output()).await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn status_json(cfg: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = status_cmd(cfg, true).await;
    assert_eq!(code, Some(0), "{out}{err}");
    serde_json::from_str(&out).unwrap()
}
