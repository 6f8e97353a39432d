//! The agent end to end: mosquitto (mutual TLS, ACLs), the emulator's control plane driven by
//! boto3, the agent as its own process with a config file, and this project's source side.

mod common;

use std::time::Duration;

use common::e2e::*;
use common::rig::{Rig, RigOptions, within_deadline};
use common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::TunnelTokens;
use securetunnel_emulator::testkit::echo_tcp;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_rotate_and_close_drive_the_agents_bridge() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, mut echo) = agent(&rig, "gw-1", &["SSH"], "").await;

    // OpenTunnel -> notify -> the agent connects; data flows.
    let t = open(&rig, "gw-1", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.peer_token_is(&id, Mode::Destination, &t.destination_access_token)
    })
    .await;
    let (mut src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;

    // Rotate DESTINATION: the agent restarts its bridge with the new token, closing the old
    // bridge's local connections.
    let _held = live_client(addrs.get("SSH")).await;
    let closed_before = echo.closed();
    let r = rotate(&rig, &id, "DESTINATION", "gw-1").await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    assert!(r.get("sourceAccessToken").is_none());
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    until(&rig.emu, "agent reconnects with the new token", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    // The service resets the source's streams when the destination reconnects: connect
    // after that reset, as a user retrying would.
    src.wait_resets(1).await;
    within(
        "the old bridge's local connection closes",
        echo.wait_closed(closed_before + 1),
    )
    .await;
    let old_handshakes = rig.emu.handshakes_for_token(&t.destination_access_token);
    transfer(&addrs, "SSH", 2).await;
    assert_eq!(
        rig.emu.handshakes_for_token(&t.destination_access_token),
        old_handshakes,
        "the revoked token was presented again"
    );
    assert_eq!(rig.emu.handshakes_for_token(&new_dest), 1);

    // Rotate ALL: the agent follows; the source side restarts with its new token.
    let r = rotate(&rig, &id, "ALL", "gw-1").await;
    let all_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    until(&rig.emu, "agent follows ALL", |e| {
        e.peer_token_is(&id, Mode::Destination, &all_dest)
    })
    .await;
    src.stop().await.unwrap();
    let t2 = TunnelTokens {
        tunnel_id: id.clone(),
        source_access_token: r["sourceAccessToken"].as_str().unwrap().into(),
        destination_access_token: all_dest.clone(),
    };
    let (_src, addrs) = ready_source(&rig.emu, &t2, "SSH=0").await;
    transfer(&addrs, "SSH", 3).await;
    assert_eq!(
        rig.emu.handshakes_for_token(&new_dest),
        1,
        "the revoked token was presented again"
    );
    assert_eq!(agent.status()["tunnels"].as_array().unwrap().len(), 1);
    assert_eq!(agent.status()["tunnels"][0]["rotations"], 2);

    // CloseTunnel: the session ends and leaves the table.
    rig.api("close_tunnel", json!({"tunnelId": id}))
        .await
        .unwrap();
    let line = agent.expect("session ended").await;
    assert!(line.contains("closed by the service"), "{line}");
    assert_eq!(agent.status()["tunnels"], json!([]));
    assert_eq!(agent.session_files(), 0, "a closed session stays persisted");
    assert!(
        !agent.log.text().contains(&t.destination_access_token[..40]),
        "a token reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_notify_twice_makes_one_session_and_one_handshake() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-dup", &["SSH"], "").await;
    let t = rig.emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    let notify = json!({
        "clientAccessToken": t.destination_access_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    })
    .to_string()
    .into_bytes();
    let topic = "$aws/things/gw-dup/tunnels/notify";
    rig.emu.publish_raw(topic, notify.clone()).await.unwrap();
    rig.emu.publish_raw(topic, notify).await.unwrap();
    agent.expect("session started").await;
    agent.expect("duplicate notify ignored").await;
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&t.tunnel_id, Mode::Destination)
    })
    .await;
    assert_eq!(agent.count("session started"), 1);
    assert_eq!(rig.emu.handshakes_for_token(&t.destination_access_token), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_max_tunnels_the_fourth_is_refused_and_three_work() {
    let rig = Rig::start(RigOptions::default()).await;
    let services = ["S1", "S2", "S3", "S4"];
    let (mut agent, _echo) = agent(&rig, "gw-max", &services, "[limits]\nmax_tunnels = 3\n").await;
    let mut tunnels = Vec::new();
    for s in &services[..3] {
        tunnels.push((s, open(&rig, "gw-max", &[s], 30).await));
        agent.expect("session started").await;
    }
    let fourth = open(&rig, "gw-max", &["S4"], 30).await;
    let line = agent.expect("notify refused").await;
    assert!(line.contains("3 tunnels are already live"), "{line}");
    for (i, (s, t)) in tunnels.iter().enumerate() {
        let id = t.tunnel_id.clone();
        until(&rig.emu, "agent connects", |e| {
            e.is_connected(&id, Mode::Destination)
        })
        .await;
        let (_src, addrs) = ready_source(&rig.emu, t, &format!("{s}=0")).await;
        transfer(&addrs, s, i as u64).await;
    }
    assert!(!rig.emu.is_connected(&fourth.tunnel_id, Mode::Destination));
    assert_eq!(
        rig.emu
            .handshakes_for_token(&fourth.destination_access_token),
        0
    );
    assert_eq!(agent.status()["tunnels"].as_array().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_resubscribes_and_follows_a_rotation() {
    let mut rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-mq", &["SSH"], "").await;
    let t = open(&rig, "gw-mq", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;

    rig.mosquitto.restart().await;
    agent.expect("MQTT connection ended").await;
    agent.expect("subscribed to tunnel notifications").await;
    within_deadline("publisher reconnects", rig.emu.wait_publisher()).await;

    let r = rotate(&rig, &id, "DESTINATION", "gw-mq").await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    until(&rig.emu, "agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_notifies_are_each_refused_and_the_agent_keeps_serving() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-bad", &["SSH"], "").await;
    let t = open(&rig, "gw-bad", &["SSH"], 30).await;
    agent.expect("session started").await;
    let topic = "$aws/things/gw-bad/tunnels/notify";
    let notify = |mode: &str, token: &str, services: Value| {
        json!({"clientAccessToken": token, "clientMode": mode, "region": "us-east-1", "services": services})
            .to_string()
            .into_bytes()
    };
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            notify("source", "AQGAx", json!(["SSH"])),
            "clientMode is \"source\"",
        ),
        (
            notify("destination", "", json!(["SSH"])),
            "the access token is empty",
        ),
        (
            notify("destination", "AQGAy", json!(["A", "B", "C", "D"])),
            "4 services listed",
        ),
        (
            notify("destination", "AQGAz", json!(["FTP"])),
            "none of the tunnel's services is in the thing's service map",
        ),
        (
            b"{\"clientAccessToken\": ".to_vec(),
            "payload is not a JSON object",
        ),
        (vec![0xff, 0xfe, 0xfd], "payload is not UTF-8"),
    ];
    for (payload, reason) in cases {
        rig.emu.publish_raw(topic, payload).await.unwrap();
        let line = agent.expect("notify refused").await;
        assert!(line.contains(reason), "expected {reason:?} in {line}");
    }
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 5).await;
    assert_eq!(agent.count("session started"), 1);
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
}

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
    let t = open(&rig, "gw-cap", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
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
async fn a_rejected_token_ends_the_session_and_it_leaves_the_table() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-rej", &["SSH"], "").await;
    let notify = json!({
        "clientAccessToken": "AQGAnot-a-token-the-service-issued",
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    });
    rig.emu
        .publish_raw(
            "$aws/things/gw-rej/tunnels/notify",
            notify.to_string().into_bytes(),
        )
        .await
        .unwrap();
    agent.expect("session started").await;
    let line = agent.expect("session ended").await;
    assert!(
        line.contains("token rejected") && line.contains("HTTP 400"),
        "{line}"
    );
    assert_eq!(agent.status()["tunnels"], json!([]));
    assert!(
        !agent.log.text().contains("not-a-token-the-service-issued"),
        "the token reached the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_a_rotation_when_the_service_cuts_the_old_token_at_once() {
    // The service cuts the old connection (no close frame) before the notify arrives: the
    // agent must not take it for the tunnel's end, nor reconnect with the revoked token.
    let rig = Rig::start(RigOptions::default()).await;
    rig.emu.set_disconnect_on_rotate(true);
    let (mut agent, _echo) = agent(&rig, "gw-cut", &["SSH"], "").await;
    let t = open(&rig, "gw-cut", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let r = rotate(&rig, &id, "DESTINATION", "gw-cut").await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "agent reconnects with the new token", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 6).await;
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    assert_eq!(
        agent.status()["tunnels"][0]["rotations"],
        1,
        "taken for a new tunnel"
    );
    assert_eq!(
        agent.count("session ended"),
        0,
        "taken for the tunnel's end"
    );
    assert_eq!(rig.emu.handshakes_for_token(&t.destination_access_token), 1);
}

async fn datagram(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within("a notify datagram", sock.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_with_the_broker_down_then_status_and_watchdog() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    // No broker where the agent looks: a gateway that boots offline.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = rig.agent_config_with(
        "gw-sd",
        &common::rig::ConfigExtra {
            services: "SSH = 22",
            mqtt_port: Some(nowhere),
            ..Default::default()
        },
    );
    let mut agent = rig.spawn_agent_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let ready = within("READY=1 with the broker down", async {
        loop {
            let m = datagram(&sock).await;
            if m.contains("READY=1") {
                break m;
            }
        }
    })
    .await;
    assert!(ready.contains("MQTT connecting"), "{ready}");
    // Offline: STATUS= says why, and the watchdog keeps being fed.
    let mut why = false;
    let mut watchdogs = 0;
    while !why || watchdogs < 2 {
        let m = datagram(&sock).await;
        why |= m.contains("STATUS=0 tunnel(s) live; MQTT connecting (last error:");
        watchdogs += m.matches("WATCHDOG=1").count();
    }
    assert_eq!(agent.count("subscribed"), 0);
    agent.child.start_kill().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_2_which_the_unit_does_not_restart() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config("gw-bad", "SSH = 99999", "");
    let mut agent = rig.spawn_agent(&cfg);
    let status = within("the agent exits", agent.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(2));
    // The log reader may still be behind the exit: wait for the line.
    agent.expect("\"99999\" is not a port number").await;
    let unit = include_str!("../packaging/systemd/securetunnel-agent.service");
    assert!(unit.contains("\nRestartPreventExitStatus=2\n"), "{unit}");
    assert!(unit.contains("\nStartLimitBurst="), "{unit}");
    assert!(
        !unit.contains("ExecStartPre="),
        "check-config before run would fail the start outside RestartPreventExitStatus"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_service_map_and_live_tunnels_keep_running() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, first) = agent(&rig, "gw-hup", &["SSH"], "").await;
    let t = open(&rig, "gw-hup", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let mut held = live_client(addrs.get("SSH")).await;

    // Point SSH somewhere else and reload.
    let second = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.files.dir.join("gw-hup.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &first.addr.unwrap().to_string(),
        &second.addr.unwrap().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    let pid = agent.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let line = agent.expect("service map reloaded").await;
    assert!(line.contains(&second.addr.unwrap().to_string()), "{line}");

    // New streams go to the new endpoint; the live connection still works, on the old one.
    transfer(&addrs, "SSH", 7).await;
    assert_eq!(second.accepted(), 1);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    held.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    within(
        "the live connection still echoes",
        held.read_exact(&mut buf),
    )
    .await
    .unwrap();
    assert_eq!(&buf, b"still");
    assert_eq!(
        first.closed(),
        0,
        "a live connection was dropped by the reload"
    );
    assert_eq!(agent.count("session started"), 1);
}

/// The trust boundary: a source that speaks the protocol itself asks for a service the
/// thing maps but the tunnel was not opened for. The agent resets the stream without any
/// local connect; a stream for the opened service passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_for_a_mapped_service_the_tunnel_was_not_opened_for_reaches_nothing() {
    use common::raw_source::RawSource;
    use securetunnel_agent::protocol::{Message, MessageType};

    let rig = Rig::start(RigOptions::default()).await;
    let mut http = echo_tcp("127.0.0.1:0").await.unwrap();
    let ssh = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = format!(
        "HTTP = \"{}\"\nSSH = \"{}\"\n",
        http.addr.unwrap(),
        ssh.addr.unwrap()
    );
    let mut agent = rig.spawn_agent(&rig.agent_config("gw-scope", &map, ""));
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-scope", &["HTTP"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let mut src = RawSource::connect(&rig.emu, &t.source_access_token).await;

    src.send(&[
        Message::stream_start(1, "SSH", 1),
        Message::data(1, "SSH", 1, bytes::Bytes::from_static(b"let me in")),
    ])
    .await;
    let reset = src.next_not_service_ids().await;
    assert_eq!(
        (reset.kind(), reset.stream_id, reset.service_id.as_str()),
        (Some(MessageType::StreamReset), 1, "SSH")
    );
    let line = agent
        .expect("refusing stream: the tunnel was not opened for this service")
        .await;
    assert!(
        line.contains("SSH") && line.contains("token:"),
        "the warning names the service and the tunnel: {line}"
    );

    // The opened service passes, after the refused one in the same ordered path.
    let hello = bytes::Bytes::from_static(b"hello HTTP");
    src.send(&[
        Message::stream_start(2, "HTTP", 1),
        Message::data(2, "HTTP", 1, hello.clone()),
    ])
    .await;
    let echoed = src.next_not_service_ids().await;
    assert_eq!(
        (echoed.kind(), echoed.service_id.as_str(), echoed.payload),
        (Some(MessageType::Data), "HTTP", hello)
    );
    assert_eq!(http.accepted(), 1);
    assert_eq!(ssh.accepted(), 0, "the SSH service saw a connection");
    src.send(&[Message::stream_reset(2, "HTTP")]).await;
    within("the HTTP connection closes", http.wait_closed(1)).await;
}

/// Rotation bursts are bounded: 200 rotations of one tunnel's destination token arrive at
/// once. Per tunnel only the serving bridge and the newest one run (bridges replaced before
/// they connected are stopped at once), no revoked token is presented twice, and the last
/// token serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_rotations_runs_at_most_two_bridges_and_the_last_token_serves() {
    let rig = Rig::start(RigOptions::default()).await;
    let (agent, _echo) = agent(&rig, "gw-burst", &["SSH"], "").await;
    let t = open(&rig, "gw-burst", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let tokens: Vec<String> = (0..200)
        .map(|_| rig.emu.rotate(&id, Mode::Destination).unwrap())
        .collect();
    let topic = "$aws/things/gw-burst/tunnels/notify";
    for token in &tokens {
        let n = json!({"clientAccessToken": token, "clientMode": "destination", "region": "us-east-1", "services": ["SSH"]});
        rig.emu
            .publish_raw(topic, n.to_string().into_bytes())
            .await
            .unwrap();
    }
    let last = tokens.last().unwrap().clone();
    until(&rig.emu, "the last token serves", |e| {
        e.peer_token_is(&id, Mode::Destination, &last)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 9).await;

    let running: Vec<usize> = agent
        .log
        .text()
        .lines()
        .filter(|l| l.contains("bridge started"))
        .filter_map(|l| {
            l.split("running=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(running.len(), 201, "a bridge per token");
    let most = running.iter().max().copied().unwrap_or(0);
    assert!(most <= 2, "{most} bridges ran at once for one tunnel");
    // Each bridge may present its token once before the next notify stops it (the service
    // refuses the revoked ones); none presents it twice.
    let presented: Vec<u64> = tokens[..199]
        .iter()
        .map(|t| rig.emu.handshakes_for_token(t))
        .collect();
    eprintln!(
        "revoked tokens presented: {} of 199",
        presented.iter().filter(|n| **n > 0).count()
    );
    assert!(
        presented.iter().all(|n| *n <= 1),
        "a revoked token presented twice"
    );
    assert_eq!(agent.session_files(), 1, "one session file for the tunnel");
}
