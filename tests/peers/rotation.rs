//! Token rotation, end to end with the agent process: DESTINATION and ALL rotations, a
//! service that cuts the old token at once, bursts, the parallel policy, a redelivered
//! replaced token, the overlap of old and new bridge, and that a revoked token is never
//! presented again.

use std::time::Instant;

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_transfer;
use securetunnel_emulator::{PeerEventKind, ReplacedPeer, TunnelTokens};
use serde_json::json;
use tokio::net::TcpStream;

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
async fn the_agent_follows_a_rotation_when_the_service_cuts_the_old_token_at_once() {
    // The service cuts the old connection (no close frame) before the notify arrives: the
    // agent must not take it for the tunnel's end, nor reconnect with the revoked token.
    let rig = Rig::start(RigOptions::default()).await;
    rig.emu.set_disconnect_on_rotate(true);
    let (mut agent, _echo) = agent(&rig, "gw-cut", &["SSH"], "").await;
    let (t, id) = open_connected(&rig, "gw-cut", &["SSH"]).await;
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

/// Rotation bursts are bounded: 200 rotations of one tunnel's destination token arrive at
/// once. Per tunnel only the serving bridge and the newest one run (bridges replaced before
/// they connected are stopped at once), no revoked token is presented twice, and the last
/// token serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_rotations_runs_at_most_two_bridges_and_the_last_token_serves() {
    let rig = Rig::start(RigOptions::default()).await;
    let (agent, _echo) = agent(&rig, "gw-burst", &["SSH"], "").await;
    let (t, id) = open_connected(&rig, "gw-burst", &["SSH"]).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_rotation_keeps_the_old_session_beside_the_new_one() {
    let rig = Rig::start(RigOptions::default()).await;
    // The service leaves a replaced destination connected: only the agent could close it.
    rig.emu
        .set_replaced_peer(securetunnel_emulator::ReplacedPeer::Keep);
    let (mut agent, _echo) = agent(
        &rig,
        "gw-par",
        &["SSH"],
        "[rotation]\npolicy = \"parallel\"\n",
    )
    .await;
    let t = open(&rig, "gw-par", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let r = rotate(&rig, &id, "DESTINATION", "gw-par").await;
    let new = r["destinationAccessToken"].as_str().unwrap().to_owned();
    agent.expect("session started").await;
    until(&rig.emu, "the new session connects", |e| {
        e.peer_token_is(&id, Mode::Destination, &new)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
    let old_gone = rig.emu.peer_events(&id).iter().any(|e| {
        e.access_token == t.destination_access_token
            && matches!(e.kind, securetunnel_emulator::PeerEventKind::Gone(_))
    });
    assert!(
        !old_gone,
        "the old session was closed: {:?}",
        rig.emu.peer_events(&id)
    );
    assert_eq!(agent.count("rotation:"), 0);
    assert_eq!(agent.status()["tunnels"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_replaced_token_is_ignored() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-redeliver", &["SSH"], "").await;
    let t = open(&rig, "gw-redeliver", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    let r = rotate(&rig, &id, "DESTINATION", "gw-redeliver").await;
    let new = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "the agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new)
    })
    .await;
    let old_handshakes = rig.emu.handshakes_for_token(&t.destination_access_token);
    // The broker delivers the first notify again (QoS 1 redelivery).
    let notify = serde_json::json!({
        "clientAccessToken": t.destination_access_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    });
    rig.emu
        .publish_raw(
            "$aws/things/gw-redeliver/tunnels/notify",
            notify.to_string().into_bytes(),
        )
        .await
        .unwrap();
    agent.expect("this token was already replaced").await;
    assert_eq!(
        rig.emu.handshakes_for_token(&t.destination_access_token),
        old_handshakes,
        "the replaced token was presented again"
    );
    assert!(rig.emu.peer_token_is(&id, Mode::Destination, &new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_connects_the_new_bridge_before_the_old_one_closes() {
    let rig = Rig::start(RigOptions::default()).await;
    // The service leaves the replaced peer connected: closing it is the agent's job.
    rig.emu.set_replaced_peer(ReplacedPeer::Keep);
    let thing = "gw-overlap";
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
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
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
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
