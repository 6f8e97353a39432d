//! The audit trail through mosquitto and the emulator: a tunnel's whole life (notify,
//! connect, a connection with its bytes, a refused stream, a rotation, the close) as the
//! JSON Lines file, the journal's stand-in (the agent's log) and a mosquitto subscriber on
//! `audit.mqtt_topic` see it; the file's bound; never a token or a key.

use serde_json::{Value, json};

use crate::common::e2e::*;
use crate::common::rig::{AgentProc, Rig, RigOptions, Subscriber};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::TunnelTokens;
use securetunnel_emulator::testkit::echo_tcp;

/// Each thing publishes its own audit topic; the admin reads them all.
const AUDIT_ACL: &str = "topic read sites/#\npattern write sites/%u/audit";

fn events_of(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn find<'a>(events: &'a [Value], event: &str, tunnel: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["event"] == event && e["tunnel"] == tunnel)
        .collect()
}

/// `token:<first 8 hex of SHA-256>`, as the agent names a token.
fn hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("token:{hex}")
}

/// The tunnel's events, whichever sink: each asserted here.
fn assert_lifecycle(events: &[Value], t: &TunnelTokens, new_dest: &str, sink: &str) {
    let (old, new) = (hash(&t.destination_access_token), hash(new_dest));
    let accepted = find(events, "notify_accepted", &old);
    assert_eq!(accepted.len(), 1, "{sink}: {events:#?}");
    assert_eq!(accepted[0]["services"], json!(["SSH", "HTTP"]), "{sink}");
    assert_eq!(accepted[0]["thing"], "gw-audit", "{sink}");
    let connected = find(events, "connected", &old);
    assert!(
        connected[0]["channel"].as_str().is_some(),
        "{sink}: {connected:?}"
    );
    let opened = find(events, "connection_opened", &old);
    assert_eq!(opened[0]["service"], "SSH", "{sink}");
    assert!(
        opened[0]["endpoint"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
    let closed = find(events, "connection_closed", &old);
    let first = closed
        .iter()
        .find(|c| c["connection"] == opened[0]["connection"])
        .unwrap_or_else(|| panic!("{sink}: no close of {}", opened[0]));
    // 1 MiB and the transfer's 16-byte sentinel, each way.
    assert_eq!(
        first["bytes_from_tunnel"],
        (1 << 20) + 16,
        "{sink}: {first}"
    );
    assert_eq!(first["bytes_to_tunnel"], (1 << 20) + 16, "{sink}: {first}");
    assert_eq!(first["ended"], "client_closed", "{sink}: {first}");
    assert!(first["duration_ms"].as_u64().is_some(), "{sink}");
    let refused = find(events, "stream_refused", &old);
    assert_eq!(refused[0]["service"], "HTTP", "{sink}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .unwrap()
            .contains("not in the service map"),
        "{sink}"
    );
    let rotated = find(events, "rotated", &new);
    assert_eq!(rotated[0]["replaces"], old.as_str(), "{sink}");
    assert!(!find(events, "connected", &new).is_empty(), "{sink}");
    // Stopped by the agent once the new token connected, or closed first by the service,
    // which drops the older of two destinations.
    let ended = find(events, "closed", &old);
    let reason = ended[0]["reason"].as_str().unwrap();
    assert!(reason.contains("replaced"), "{sink}: {reason}");
    let ended = find(events, "closed", &new);
    assert!(
        ended[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("closed by the service"),
        "{sink}: {ended:?}"
    );
    assert!(ended[0]["connections"].as_u64().is_some(), "{sink}");
}

/// No token (either end, old or new), no client token, nothing of the thing's key.
fn assert_no_secret(text: &str, rig: &Rig, tokens: &[&str], agent: &AgentProc) {
    // Any 24 characters of a token would give part of it away.
    for t in tokens {
        for piece in [&t[..24], &t[t.len() - 24..]] {
            assert!(!text.contains(piece), "a token in the trail: {text}");
        }
    }
    let key = std::fs::read_to_string(rig.files.dir.join("gw-audit.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!text.contains(&body[..32]), "the key in the trail");
    for file in std::fs::read_dir(agent.state_path("sessions"))
        .into_iter()
        .flatten()
    {
        let session = std::fs::read_to_string(file.unwrap().path()).unwrap_or_default();
        let v: Value = serde_json::from_str(&session).unwrap_or_default();
        if let Some(client) = v["client_token"].as_str() {
            assert!(!text.contains(client), "a client token in the trail");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnels_life_is_in_the_audit_file_the_journal_and_on_the_topic() {
    let rig = Rig::start(RigOptions {
        extra_acl: AUDIT_ACL,
        ..RigOptions::default()
    })
    .await;
    let thing = "gw-audit";
    let topic = format!("sites/{thing}/audit");
    let mut sub = Subscriber::start(&rig, &topic).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    // HTTP is not in the map: its stream is refused.
    let services = format!("SSH = \"{}\"", echo.addr.unwrap());
    let cfg = rig.agent_config(
        thing,
        &services,
        &format!("[audit]\nmqtt_topic = \"{topic}\""),
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;

    let (t, id) = open_connected(&rig, thing, &["SSH", "HTTP"]).await;
    let (src, addrs) = ready_source(&rig.emu, &t, "SSH=0,HTTP=0").await;
    transfer(&addrs, "SSH", 1).await;
    agent.expect("audit: connection_closed").await;
    let mut refused = tokio::net::TcpStream::connect(addrs.get("HTTP"))
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    let _ = within("the refused stream closes", async {
        use tokio::io::AsyncReadExt;
        refused.read(&mut buf).await
    })
    .await;
    agent.expect("audit: stream_refused").await;

    let params = json!({"tunnelId": id, "clientMode": "DESTINATION",
        "destinationConfig": dest_config(thing, &["SSH", "HTTP"])});
    let r = rig.api("rotate_tunnel_access_token", params).await.unwrap();
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "the agent connects with the new token", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    rig.api("close_tunnel", json!({"tunnelId": id}))
        .await
        .unwrap();
    agent.expect("session ended: closed by the service").await;
    drop(src);

    // The topic: events until the new token's close (QoS 1 may repeat one).
    let new_hash = hash(&new_dest);
    let mut on_topic = Vec::new();
    while !on_topic
        .iter()
        .any(|e: &Value| e["event"] == "closed" && e["tunnel"] == new_hash.as_str())
    {
        let (_, t, payload) = sub.next().await;
        assert_eq!(t, topic);
        on_topic.push(serde_json::from_str(&payload).unwrap());
    }
    let status = status_json(&cfg).await;
    assert_eq!(
        status["audit_dropped"],
        json!({"file": 0, "mqtt": 0}),
        "{status}"
    );
    // The file: complete once the agent stopped (it flushes the trail).
    agent.terminate().await;
    let file = std::fs::read_to_string(agent.state_path("audit.jsonl")).unwrap();
    // The journal's stand-in: the agent's log, one line per event, with its fields.
    let journal: Vec<String> = agent
        .log
        .text()
        .lines()
        .filter(|l| l.contains(" audit: "))
        .map(str::to_owned)
        .collect();

    assert_lifecycle(&events_of(&file), &t, &new_dest, "file");
    assert_lifecycle(&on_topic, &t, &new_dest, "topic");
    let closes = journal
        .iter()
        .filter(|l| {
            l.contains("audit: connection_closed") && l.contains("bytes_from_tunnel=1048592")
        })
        .count();
    assert!(closes >= 1, "{journal:#?}");
    for kind in [
        "notify_accepted",
        "connected",
        "connection_opened",
        "stream_refused",
        "rotated",
        "closed",
    ] {
        assert!(
            journal
                .iter()
                .any(|l| l.contains(&format!("audit: {kind}"))),
            "{kind}: {journal:#?}"
        );
    }
    let secrets = [
        t.destination_access_token.as_str(),
        t.source_access_token.as_str(),
        new_dest.as_str(),
    ];
    let topic_text: String = on_topic.iter().map(Value::to_string).collect();
    for text in [&file, &topic_text, &journal.join("\n")] {
        assert_no_secret(text, &rig, &secrets, &agent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_files_hold_their_bound_as_they_rotate() {
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-audit-bound";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let services = format!("SSH = \"{}\"", echo.addr.unwrap());
    let cfg = rig.agent_config(thing, &services, "[audit]\nfile_size_kib = 16\nfiles = 2");
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(&rig, thing, &["SSH"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    // About 300 bytes an event, two per connection: 80 connections take more than 2 x 16 KiB.
    for _ in 0..80 {
        drop(live_client(addrs.get("SSH")).await);
    }
    agent.terminate().await;
    let read = |name: &str| std::fs::read_to_string(agent.state_path(name)).unwrap();
    let (current, older) = (read("audit.jsonl"), read("audit.jsonl.1"));
    assert!(!agent.state_path("audit.jsonl.2").exists());
    for text in [&current, &older] {
        assert!(text.len() <= 16 * 1024, "{}", text.len());
        assert!(text.len() > 8 * 1024, "{}", text.len());
        events_of(text);
    }
    // The oldest events went; the newest are kept.
    assert!(!older.contains("notify_accepted"), "{older}");
    assert!(current.contains("connection_closed"));
}
