//! Persistence across agent restarts: after `kill -9` or SIGTERM the agent resumes its
//! sessions from their files and rejoins with the same tokens; a token rotated while it was
//! down is dropped and the new one served.

use std::path::PathBuf;

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;

fn config_path(rig: &Rig, thing: &str) -> PathBuf {
    rig.files.dir.join(format!("{thing}.toml"))
}

/// Kills the agent (`-9` or SIGTERM) during a transfer, starts it again, and checks it rejoins
/// with the same access and client token and carries a new transfer byte-exact.
async fn restart_rejoins(thing: &str, sigkill: bool) {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
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
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
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
