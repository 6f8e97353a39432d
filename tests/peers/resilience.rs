//! Field resilience, end to end with real processes: dead links (a black-holed websocket, a
//! black-holed MQTT link) are found and reconnected in bounded time, and a long run of
//! tunnels and connections leaks nothing. (Restarts, rotations and lifetimes have their own
//! modules.)

use std::time::{Duration, Instant};

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::{TcpRelay, echo_tcp, echo_transfer};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_websocket_is_dropped_and_reconnected_within_the_idle_timeout() {
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-hole";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config_with(
        thing,
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            tunnel: "idle_timeout_secs = 3",
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
    let tokens = rig.emu.peer_tokens(&id, Mode::Destination).unwrap();
    // The idle timeout applies once the service has answered a ping.
    agent.expect("idle timeout armed").await;
    assert!(rig.emu.black_hole(&id, Mode::Destination));
    let holed = Instant::now();
    until(&rig.emu, "agent reconnects", |e| {
        destination_connects(&rig, &id).len() == 2 && e.is_connected(&id, Mode::Destination)
    })
    .await;
    let took = holed.elapsed();
    assert!(
        took <= Duration::from_secs(3 + 5),
        "dead link found after {took:?}"
    );
    assert_eq!(rig.emu.peer_tokens(&id, Mode::Destination), Some(tokens));
    agent.expect("nothing received for").await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_mqtt_link_is_reconnected_and_resubscribed_within_one_and_a_half_keep_alives()
{
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-mqhole";
    let relay = TcpRelay::start(([127, 0, 0, 1], rig.mosquitto.port).into())
        .await
        .unwrap();
    // keep_alive_secs is 5 in the rig; the spread is off so the bound is detection alone.
    let (mut agent, _echo) = agent_via_mqtt_port(&rig, thing, relay.addr.port()).await;
    relay.black_hole();
    let holed = Instant::now();
    agent.expect("nothing from the broker").await;
    agent.expect("subscribed to tunnel notifications").await;
    let took = holed.elapsed();
    assert!(
        took <= Duration::from_millis(5 * 1500 + 5000),
        "MQTT back after {took:?}"
    );
    assert_eq!(relay.accepted(), 2);
    // And notifies flow again.
    let t = open(&rig, thing, &["SSH"], 30).await;
    agent.expect("session started").await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 5).await;
}

/// RSS (KiB) and open descriptors of a process.
fn footprint(pid: u32) -> (u64, usize) {
    let rss = securetunnel_emulator::testkit::proc_status_kib(pid, "VmRSS:").unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// A long run leaks nothing: tunnels opened, rotated and closed through the control plane
/// (the notifies through mosquitto), ten byte-checked local connections through each. From
/// the 10% mark to the end RSS grows by less than 1 MiB and descriptors by fewer than 5, and
/// the session directory ends empty. `SOAK_CYCLES` sets the length (`bench/soak.sh` runs
/// 2,000 and prints the curve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_run_of_tunnels_and_connections_leaks_nothing() {
    use securetunnel_agent::bridge::Phase;
    use securetunnel_agent::protocol::Format;
    use serde_json::json;
    let cycles: usize = std::env::var("SOAK_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let every = (cycles / 20).max(1);
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-soak", &["SSH"], "").await;
    let api = |op: &'static str, body: serde_json::Value| {
        let emu = &rig.emu;
        async move { emu.api(op, body).await.unwrap() }
    };
    let mut curve = Vec::new();
    let mut baseline = None;
    for cycle in 1..=cycles {
        let open = api(
            "OpenTunnel",
            json!({"destinationConfig": dest_config("gw-soak", &["SSH"])}),
        )
        .await;
        let mut t = tokens(&open);
        let id = t.tunnel_id.clone();
        until(&rig.emu, "agent connects", |e| {
            e.is_connected(&id, Mode::Destination)
        })
        .await;
        let rotated = api(
            "RotateTunnelAccessToken",
            json!({"tunnelId": id, "clientMode": "DESTINATION", "destinationConfig": dest_config("gw-soak", &["SSH"])}),
        )
        .await;
        t.destination_access_token = rotated["destinationAccessToken"].as_str().unwrap().into();
        until(&rig.emu, "agent follows the rotation", |e| {
            e.peer_token_is(&id, Mode::Destination, &t.destination_access_token)
        })
        .await;
        let (mut src, addrs) = source(&rig.emu, &t, "SSH=0", Format::V3).await;
        src.wait_phase(Phase::Ready).await;
        for n in 0..10 {
            let c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
            within("a byte-checked connection", echo_transfer(c, 16 << 10, n))
                .await
                .unwrap();
        }
        src.stop().await.unwrap();
        api("CloseTunnel", json!({"tunnelId": id})).await;
        agent.expect("session ended").await;
        if cycle == (cycles / 10).max(1) {
            baseline = Some(footprint(agent.pid()));
        }
        if cycle % every == 0 {
            let (rss, fds) = footprint(agent.pid());
            curve.push((cycle, rss, fds));
            eprintln!("soak: cycle {cycle}: RSS {rss} KiB, {fds} descriptors");
        }
    }
    let (rss0, fds0) = baseline.unwrap();
    let (rss1, fds1) = footprint(agent.pid());
    assert!(
        rss1 < rss0 + 1024,
        "RSS grew from {rss0} to {rss1} KiB: {curve:?}"
    );
    assert!(
        fds1 < fds0 + 5,
        "descriptors grew from {fds0} to {fds1}: {curve:?}"
    );
    assert_eq!(agent.session_files(), 0, "session files left behind");
}
