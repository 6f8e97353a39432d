//! Tunnel lifetimes: the service's close ends a rotated session for good, the agent's own
//! `max_lifetime_minutes` counts per token from its connect, and a session that never
//! connects ends 12 h after its notify, across restarts.

use std::time::{Duration, Instant};

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::PeerEventKind;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_the_service_closes_at_its_lifetime_ends_the_rotated_session_for_good() {
    // The tunnel's lifetime is the service's (a rotation never extends it); one "minute" lasts
    // 4 s here. The agent's own cap (720 min) is not what ends it.
    let rig = Rig::start(RigOptions {
        minute: Duration::from_secs(4),
        ..RigOptions::default()
    })
    .await;
    let (mut agent, _echo) = agent(&rig, "gw-life", &["SSH"], "").await;
    let t = open(&rig, "gw-life", &["SSH"], 1).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let r = rotate(&rig, &id, "DESTINATION", "gw-life").await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    let line = agent.expect("session ended").await;
    assert!(line.contains("closed by the service"), "{line}");
    assert!(rig.emu.is_closed(&id), "ended before the service closed it");
    // Ended for good: the agent does not try the new token again after the close.
    assert_eq!(rig.emu.handshakes_for_token(&new_dest), 1);
    assert_eq!(agent.status()["tunnels"], json!([]));
    assert_eq!(agent.session_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_own_max_lifetime_ends_a_session() {
    // The service would keep the tunnel 30 minutes; the agent's cap is 0.05 min (3 s).
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(
        &rig,
        "gw-cap",
        &["SSH"],
        "[limits]\nmax_lifetime_minutes = 0.05\n",
    )
    .await;
    let (t, id) = open_connected(&rig, "gw-cap", &["SSH"]).await;
    let line = agent.expect("session ended").await;
    assert!(line.contains("maximum lifetime"), "{line}");
    assert!(!rig.emu.is_closed(&id), "the service had not closed it");
    until(&rig.emu, "the agent leaves the tunnel", |e| {
        !e.is_connected(&id, Mode::Destination)
    })
    .await;
    assert_eq!(rig.emu.handshakes_for_token(&t.destination_access_token), 1);
    assert_eq!(agent.status()["tunnels"], json!([]));
    assert_eq!(agent.session_files(), 0);
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
