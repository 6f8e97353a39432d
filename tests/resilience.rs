//! Field resilience, end to end with real processes: tunnels survive agent restarts, dead
//! links are found and reconnected, rotations have no gap, lifetimes belong to each token,
//! and a service that accepts and then drops is backed off.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::e2e::*;
use common::rig::{ConfigExtra, Rig, RigOptions};
use common::*;
use securetunnel_agent::bridge::Limits;
use securetunnel_agent::protocol::Mode;
use securetunnel_agent::services::ServiceMap;
use securetunnel_emulator::testkit::{TcpRelay, echo_tcp, echo_transfer};
use securetunnel_emulator::{PeerEventKind, ReplacedPeer};
use tokio::net::TcpStream;

fn config_path(rig: &Rig, thing: &str) -> PathBuf {
    rig.files.dir.join(format!("{thing}.toml"))
}

/// Connected destination peers of a tunnel, oldest first: (peer id, access token, client token).
fn destination_connects(rig: &Rig, id: &str) -> Vec<(u64, String, Option<String>)> {
    rig.emu
        .peer_events(id)
        .into_iter()
        .filter(|e| e.mode == Mode::Destination && e.kind == PeerEventKind::Connected)
        .map(|e| (e.peer, e.access_token, e.client_token))
        .collect()
}

/// Kills the agent (`-9` or SIGTERM) during a transfer, starts it again, and checks it rejoins
/// with the same access and client token and carries a new transfer byte-exact.
async fn restart_rejoins(thing: &str, sigkill: bool) {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let before = rig.emu.peer_tokens(&id, Mode::Destination).unwrap();
    assert_eq!(before.0, t.destination_access_token);
    assert!(before.1.is_some(), "the agent presents a client token");
    assert_eq!(agent.session_files(), 1);
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    // A transfer under way when the agent goes.
    let mut held = live_client(addrs.get("SSH")).await;
    let running = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        held.write_all(&[7u8; 1 << 16]).await?;
        let mut buf = vec![0u8; 1 << 16];
        held.read_exact(&mut buf).await?;
        // Then the connection must end visibly: EOF or reset, never hang.
        let n = held.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    });
    if sigkill {
        agent.kill9().await;
    } else {
        let status = agent.terminate().await;
        assert!(status.success(), "SIGTERM exit: {status:?}");
        assert_eq!(agent.session_files(), 1, "SIGTERM kept the session");
    }
    until(&rig.emu, "the service sees the destination gone", |e| {
        !e.is_connected(&id, Mode::Destination)
    })
    .await;

    let mut agent = rig.spawn_agent(&config_path(&rig, thing));
    agent.expect("session resumed with its tokens").await;
    // Resumed before the first notify can arrive: before MQTT is even subscribed.
    agent.expect("subscribed to tunnel notifications").await;
    until(&rig.emu, "agent rejoins", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    assert_eq!(
        rig.emu.peer_tokens(&id, Mode::Destination),
        Some(before.clone()),
        "rejoined with other tokens"
    );
    let connects = destination_connects(&rig, &id);
    assert_eq!(connects.len(), 2);
    assert!(
        connects
            .iter()
            .all(|c| (c.1.clone(), c.2.clone()) == before)
    );
    // The running connection was ended visibly (the service reset its stream).
    let ended = within("the old connection ends", running).await.unwrap();
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    transfer(&addrs, "SSH", 2).await;
    assert_eq!(agent.count("session started"), 0, "no new session: resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_agent_rejoins_with_the_same_tokens() {
    restart_rejoins("gw-k9", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_and_start_the_agent_rejoins_with_the_same_tokens() {
    restart_rejoins("gw-term", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_while_the_agent_was_down_is_dropped_and_the_new_one_served() {
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-down";
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let status = agent.terminate().await;
    assert!(status.success());
    // Rotated while the agent is down: the notify waits in the persistent MQTT session.
    let r = rotate(&rig, &id, "DESTINATION", thing).await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    let old_handshakes = rig.emu.handshakes_for_token(&t.destination_access_token);

    let mut agent = rig.spawn_agent(&config_path(&rig, thing));
    agent.expect("session resumed with its tokens").await;
    agent.expect("subscribed to tunnel notifications").await;
    until(&rig.emu, "the new token is served", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    let refused = rig.emu.handshakes_for_token(&t.destination_access_token) - old_handshakes;
    assert!(refused <= 1, "{refused} handshakes with the revoked token");
    // Before the new token connected, the resumed session was either refused or replaced;
    // either way its file went before the new session's log line.
    let log = agent.log.text();
    assert!(
        log.contains("token rejected") || log.contains("rotation:"),
        "{log}"
    );
    assert_eq!(
        agent.session_files(),
        1,
        "only the new session is persisted"
    );
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 3).await;
}

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
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_accepts_and_drops_gets_at_most_8_handshakes_in_the_first_window() {
    // The agent's policy scaled by 1/10 (0.5 s -> 50 ms, 30 s -> 3 s): at most 8 handshakes
    // in the first 6 s, as 8 in the first 60 s at full scale.
    let emu = emulator(false).await;
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    emu.set_drop_after_upgrade(Some(Duration::from_millis(20)));
    let limits = Limits {
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_secs(3),
        ..test_limits()
    };
    let dest = destination_with(&emu, &tokens, ServiceMap::default(), limits);
    let id = tokens.tunnel_id.clone();
    let mut changes = emu.changes();
    within("nine handshakes", async {
        while emu.handshakes_for_token(&tokens.destination_access_token) < 9 {
            changes.changed().await.unwrap();
        }
    })
    .await;
    let at: Vec<Instant> = emu
        .peer_events(&id)
        .into_iter()
        .filter(|e| e.kind == PeerEventKind::Connected)
        .map(|e| e.at)
        .collect();
    let window = at[8] - at[0];
    assert!(
        window >= Duration::from_secs(6),
        "9 handshakes within {window:?}"
    );
    dest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tunnel_for_the_same_services_is_not_ended_before_its_own_lifetime() {
    // One "minute" of tunnel lifetime lasts 1 s; the agent's own lifetime is 6 s.
    let rig = Rig::start(RigOptions {
        minute: Duration::from_secs(1),
        ..RigOptions::default()
    })
    .await;
    let thing = "gw-two";
    let (mut agent, _echo) = agent(
        &rig,
        thing,
        &["SSH"],
        "[limits]\nmax_lifetime_minutes = 0.1\n",
    )
    .await;
    let a = open(&rig, thing, &["SSH"], 30).await;
    until(&rig.emu, "the first tunnel connects", |e| {
        e.is_connected(&a.tunnel_id, Mode::Destination)
    })
    .await;
    // Two "minutes" later, a second tunnel with the same services: time is the subject.
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Its first connect comes seconds after its notify: the lifetime counts from the connect.
    rig.emu.fail_next_handshakes(2, 503);
    let b = open(&rig, thing, &["SSH"], 30).await;
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    let bid = b.tunnel_id.clone();
    until(
        &rig.emu,
        "the second tunnel's destination comes and goes",
        |_| {
            rig.emu
                .peer_events(&bid)
                .iter()
                .any(|e| e.mode == Mode::Destination && matches!(e.kind, PeerEventKind::Gone(_)))
        },
    )
    .await;
    let events = rig.emu.peer_events(&bid);
    let connected = events
        .iter()
        .find(|e| e.kind == PeerEventKind::Connected)
        .unwrap()
        .at;
    let gone = events
        .iter()
        .find(|e| matches!(e.kind, PeerEventKind::Gone(_)))
        .unwrap()
        .at;
    assert!(
        gone - connected >= Duration::from_millis(5900),
        "the second tunnel lived {:?} of its 6 s",
        gone - connected
    );
    let line = agent.expect("session ended").await;
    assert!(line.contains("maximum lifetime"), "{line}");
    assert_eq!(
        agent.session_files(),
        0,
        "the ended sessions' files are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_connects_the_new_bridge_before_the_old_one_closes() {
    let rig = Rig::start(RigOptions::default()).await;
    // The service leaves the replaced peer connected: closing it is the agent's job.
    rig.emu.set_replaced_peer(ReplacedPeer::Keep);
    let thing = "gw-overlap";
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (mut src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    let running = tokio::spawn(echo_transfer(c, 32 << 20, 9));
    // The new bridge's first handshakes fail: the old one must go on serving meanwhile.
    rig.emu.fail_next_handshakes(2, 503);
    let rotated = Instant::now();
    let r = rotate(&rig, &id, "DESTINATION", thing).await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    let old_dest = t.destination_access_token.clone();
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    assert!(!rig.emu.peer_token_is(&id, Mode::Destination, &new_dest));
    transfer(&addrs, "SSH", 12).await;
    assert!(
        !rig.emu.peer_token_is(&id, Mode::Destination, &new_dest),
        "the overlap ended before the transfer through the old bridge was done"
    );
    until(
        &rig.emu,
        "the old destination is closed by the agent",
        |e| {
            e.peer_events(&id)
                .iter()
                .any(|ev| ev.access_token == old_dest && matches!(ev.kind, PeerEventKind::Gone(_)))
        },
    )
    .await;
    let events = rig.emu.peer_events(&id);
    let pos =
        |f: &dyn Fn(&securetunnel_emulator::PeerEvent) -> bool| events.iter().position(f).unwrap();
    let new_up = pos(&|e| e.access_token == new_dest && e.kind == PeerEventKind::Connected);
    let old_gone = pos(&|e| e.access_token == old_dest && matches!(e.kind, PeerEventKind::Gone(_)));
    assert!(
        new_up < old_gone,
        "the old bridge closed before the new one connected: {events:?}"
    );
    let switchover = events[new_up].at.saturating_duration_since(rotated);
    eprintln!("rotation: new bridge connected {switchover:?} after the Rotate call");
    // The running transfer either completed byte-exact or was visibly reset.
    let result = within("the running transfer ends", running).await.unwrap();
    if let Err(e) = &result {
        assert!(!e.to_string().contains("echo differs"), "{e}");
    }
    // Connect after the service's reset of the source's stream (the destination reconnected).
    src.wait_resets(1).await;
    transfer(&addrs, "SSH", 10).await;
    agent.expect("stopping the old one").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_bridge_dropped_without_a_close_never_presents_its_revoked_token_again() {
    let rig = Rig::start(RigOptions::default()).await;
    rig.emu.set_replaced_peer(ReplacedPeer::Drop);
    let thing = "gw-revoked";
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let r = rotate(&rig, &id, "DESTINATION", thing).await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "agent connects with the new token", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    agent.expect("replaced bridge stopped").await;
    assert_eq!(
        rig.emu.handshakes_for_token(&t.destination_access_token),
        1,
        "the revoked token was presented again"
    );
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 11).await;
    assert_eq!(rig.emu.handshakes_for_token(&t.destination_access_token), 1);
    assert!(matches!(
        rig.emu.peer_tokens(&id, Mode::Destination),
        Some((tok, _)) if tok == new_dest
    ));
}

/// Nothing lives for ever: a session whose data plane never answers ends 12 h after its
/// notify arrived, and that time is kept across restarts. Here the agent starts with a
/// session file whose notify came 12 h less 5 s ago, on another boot (the wall clock
/// counts): it gives the token up within seconds instead of trying for 12 h more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_connects_ends_12_hours_after_its_notify_across_restarts() {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let rig = Rig::start(RigOptions::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap();
    drop(closed);
    let host = "data.tunneling.iot.us-east-1.amazonaws.com";
    let cfg = rig.agent_config_with(
        "gw-never",
        &ConfigExtra {
            services: "SSH = 22",
            tunnel: &format!("resolve = {{ \"{host}\" = \"{nowhere}\" }}"),
            region_endpoint: true,
            ..ConfigExtra::default()
        },
    );
    let sessions = rig.files.dir.join("state-gw-never").join("sessions");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&sessions)
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let file = serde_json::json!({
        "version": 1, "thing": "gw-never", "region": "us-east-1", "services": ["SSH"],
        "access_token": "AQGA-never-connects", "client_token": uuid::Uuid::new_v4().to_string(),
        "first_connected_unix": null, "boot_id": "", "first_connected_uptime_ms": 0,
        "received": {"unix": now - 12 * 3600 + 5, "boot_id": "another-boot", "uptime_ms": 1},
    });
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(sessions.join("f00d.session.json"))
        .unwrap();
    std::io::Write::write_all(&mut f, file.to_string().as_bytes()).unwrap();
    drop(f);

    let started = Instant::now();
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("session resumed with its tokens").await;
    agent
        .expect("session ended: it never connected within 12 h of its notify")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(agent.session_files(), 0, "its file was left");
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
