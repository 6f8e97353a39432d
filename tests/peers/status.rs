//! What the agent reports: status.json (token hashes only, not rewritten by MQTT
//! reconnects) and `securetunnel-agent status [--json]` (live counters during a transfer, a
//! reconnecting tunnel with its next attempt and error, exit 3 once the agent stopped).

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_holds_token_hashes_only() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-status", &["SSH"], "").await;
    let t = open(&rig, "gw-status", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let status = agent.status();
    let text = status.to_string();
    assert!(
        !text.contains(&t.destination_access_token),
        "status.json holds the token: {text}"
    );
    let tunnels = status["tunnels"].as_array().expect("tunnels listed");
    assert_eq!(tunnels.len(), 1, "{text}");
    let token = tunnels[0]["token"].as_str().unwrap();
    let hex = token.strip_prefix("token:").expect("token:<hash>");
    assert!(
        hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_live_during_a_transfer_and_exits_3_once_the_agent_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-live", &["SSH", "WEB"], "").await;
    let cfg = rig.files.dir.join("gw-live.toml");
    let t = open(&rig, "gw-live", &["SSH", "WEB"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0,WEB=0").await;

    // One SSH connection stays open across two rounds of 256 KiB echoed.
    const ROUND: usize = 256 << 10;
    let mut c = tokio::net::TcpStream::connect(addrs.get("SSH"))
        .await
        .unwrap();
    let mut back = vec![0u8; ROUND];
    let mut round = async |c: &mut tokio::net::TcpStream| {
        c.write_all(&vec![7u8; ROUND]).await.unwrap();
        within("the echo comes back", c.read_exact(&mut back))
            .await
            .unwrap();
    };
    round(&mut c).await;
    let first = status_json(&cfg).await;
    assert_eq!(first["mqtt"], "subscribed", "{first}");
    let tunnel = &first["tunnels"][0];
    assert_eq!(tunnel["phase"], "connected", "{first}");
    assert_eq!(tunnel["region"], "us-east-1");
    assert_eq!(tunnel["services"], serde_json::json!(["SSH", "WEB"]));
    assert_eq!(tunnel["open_connections"], serde_json::json!({"SSH": 1}));
    assert_eq!(tunnel["reconnects"], 0);
    assert!(tunnel["channel_id"].is_string() && tunnel["connected_since"].is_u64());
    let token = tunnel["token"].as_str().unwrap();
    assert!(token.starts_with("token:") && token.len() == 14, "{token}");
    let bytes = |v: &serde_json::Value, k: &str| v["tunnels"][0][k].as_u64().unwrap();
    assert!(
        bytes(&first, "bytes_from_tunnel") >= ROUND as u64,
        "{first}"
    );
    assert!(bytes(&first, "bytes_to_tunnel") >= ROUND as u64, "{first}");

    round(&mut c).await;
    let second = status_json(&cfg).await;
    for k in ["bytes_from_tunnel", "bytes_to_tunnel"] {
        assert!(bytes(&second, k) >= 2 * ROUND as u64, "{k}: {second}");
    }

    let (code, text, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "MQTT: subscribed",
        &format!("Tunnel 1 to gw-live ({token}): connected, region us-east-1, services SSH, WEB"),
        "connections open: SSH 1, WEB 0",
        "reconnects 0",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    assert!(!text.contains(&t.destination_access_token[..20]));

    // Only the agent's user (and root) may ask.
    use std::os::unix::fs::PermissionsExt;
    let run = rig.files.dir.join("run-gw-live");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("status.sock")), 0o600);

    drop(c);
    assert_eq!(agent.terminate().await.code(), Some(0));
    let (code, _, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("the agent is not running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_tunnel_reconnecting_with_its_next_attempt_and_error() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-retry", &["SSH"], "").await;
    let cfg = rig.files.dir.join("gw-retry.toml");
    let t = open(&rig, "gw-retry", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    // The link dies and the service answers 503 until the test lets it through.
    rig.emu.fail_next_handshakes(1000, 503);
    rig.emu.drop_peer(&id, Mode::Destination);
    agent.expect("reconnecting with backoff").await;
    // Between attempts after a refused one (the first error is the cut link): the tunnel
    // shows when the next attempt comes and why the last one failed.
    let waiting = within("status shows the refused attempt", async {
        loop {
            let s = status_json(&cfg).await;
            let t = &s["tunnels"][0];
            // From the cut on (the first wait included), nothing is connected.
            if t["phase"] == "reconnecting" {
                assert!(t["connected_since"].is_null(), "{s}");
            }
            if t["next_attempt_in_secs"].is_u64()
                && t["last_error"].as_str().unwrap_or("").contains("503")
            {
                return s;
            }
        }
    })
    .await;
    let tunnel = &waiting["tunnels"][0];
    assert_eq!(tunnel["phase"], "reconnecting", "{waiting}");
    assert!(tunnel["connected_since"].is_null(), "{waiting}");
    assert_eq!(tunnel["reconnects"], 0, "{waiting}");
    let (code, text, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("): reconnecting, region us-east-1"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("last error:") && l.contains("HTTP 503")),
        "{text}"
    );

    rig.emu.fail_next_handshakes(0, 503);
    until(&rig.emu, "the agent reconnects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    // The emulator counts the peer at the upgrade; the agent a moment later.
    let back = within("status shows the tunnel connected again", async {
        loop {
            let s = status_json(&cfg).await;
            if s["tunnels"][0]["phase"] == "connected" {
                return s;
            }
        }
    })
    .await;
    assert!(back["tunnels"][0]["connected_since"].is_u64(), "{back}");
    assert_eq!(back["tunnels"][0]["reconnects"], 1, "{back}");
    assert!(
        back["tunnels"][0]["next_attempt_in_secs"].is_null(),
        "{back}"
    );
}

/// status.json is not rewritten by MQTT state changes (an offline gateway reconnects every
/// few seconds, and status.json may be on flash): only tunnel-table changes write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_reconnects_do_not_rewrite_status_json() {
    use std::os::unix::fs::MetadataExt;
    let rig = Rig::start(RigOptions::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = rig.agent_config_with(
        "gw-offline",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt: "reconnect_spread_secs = 0",
            mqtt_port: Some(port),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("agent started").await;
    agent.expect("MQTT connection ended").await;
    let path = rig.files.dir.join("state-gw-offline/status.json");
    let written = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let before = written(&path);
    for _ in 0..3 {
        agent.expect("MQTT connection failed").await;
    }
    assert_eq!(written(&path), before, "status.json was rewritten");
}
