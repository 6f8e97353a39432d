//! Notifies into sessions, end to end with the agent process (mosquitto with mutual TLS and
//! ACLs, the emulator's control plane driven by boto3, this project's source side): a
//! duplicate notify, refused notifies, `max_tunnels`, a token the service rejects, and the
//! scope rule (a stream for a service the tunnel was not opened for reaches nothing).

use std::time::Duration;

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;
use serde_json::{Value, json};

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

/// The trust boundary: a source that speaks the protocol itself asks for a service the
/// thing maps but the tunnel was not opened for. The agent resets the stream without any
/// local connect; a stream for the opened service passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_for_a_mapped_service_the_tunnel_was_not_opened_for_reaches_nothing() {
    use crate::common::raw_source::RawSource;
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
    let (t, _) = open_connected(&rig, "gw-scope", &["HTTP"]).await;
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
