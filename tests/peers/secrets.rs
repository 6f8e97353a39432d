//! No secret reaches a log, at any level: the agent at trace level through a whole tunnel's
//! life (open, transfer, rotation, close, stop), and two `local-proxy` processes at trace
//! level; every line they write is searched for the access tokens, the client tokens and
//! the device's private key. `./test.sh` runs this with `--all-features`, so the libraries'
//! own `log` records (tungstenite writes the raw upgrade request) are forwarded too.

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::{echo_tcp, echo_transfer};
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls, PeerEventKind};
use serde_json::json;
use tokio::net::TcpStream;
use tokio::process::Command;

/// Every piece of `secret` long enough to matter (24 characters), found in `log`.
fn leaks(log: &str, secret: &str) -> Vec<String> {
    let chars: Vec<char> = secret.chars().collect();
    if chars.len() < 24 {
        return log
            .contains(secret)
            .then(|| secret.to_owned())
            .into_iter()
            .collect();
    }
    chars
        .windows(24)
        .step_by(8)
        .map(|w| w.iter().collect::<String>())
        .filter(|piece| log.contains(piece.as_str()))
        .collect()
}

fn assert_clean(what: &str, log: &str, secrets: &[String]) {
    assert!(!log.is_empty(), "{what}: no output to check");
    for s in secrets {
        let found = leaks(log, s);
        assert!(found.is_empty(), "{what} logged a secret ({found:?})");
    }
    assert!(
        !log.contains("PRIVATE KEY"),
        "{what} logged private-key material"
    );
}

/// Access and client tokens every peer of the tunnel presented, as the emulator saw them.
fn presented_tokens(emu: &Emulator, tunnel: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in emu.peer_events(tunnel) {
        if e.kind == PeerEventKind::Connected {
            v.push(e.access_token);
            v.extend(e.client_token);
        }
    }
    v.sort();
    v.dedup();
    v
}

fn features() -> &'static str {
    if cfg!(feature = "log") {
        "with the `log` feature (library records forwarded)"
    } else {
        "without the `log` feature (./test.sh runs --all-features)"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_at_trace_level_logs_no_token_and_no_key() {
    eprintln!("secrets: agent {}", features());
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-secrets";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config(thing, &format!("SSH = \"{}\"", echo.addr.unwrap()), "");
    let mut agent = rig.spawn_agent_with_args(&cfg, &["-v", "6"]);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
    let (mut src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
    let r = rotate(&rig, &id, "DESTINATION", thing).await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    // Connect after the service's reset of the source's stream (the destination reconnected).
    src.wait_resets(1).await;
    transfer(&addrs, "SSH", 2).await;
    rig.api("close_tunnel", json!({"tunnelId": id}))
        .await
        .unwrap();
    agent.expect("session ended").await;
    src.cancel.cancel();
    let status = agent.terminate().await;
    assert!(status.success());
    agent.expect("agent stopped").await;

    let mut secrets = presented_tokens(&rig.emu, &id);
    secrets.push(t.destination_access_token.clone());
    secrets.push(new_dest);
    let key = std::fs::read_to_string(rig.files.dir.join(format!("{thing}.key"))).unwrap();
    secrets.extend(
        key.lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 24)
            .map(str::to_owned),
    );
    assert!(secrets.len() >= 5, "{} secrets to look for", secrets.len());
    let log = agent.log.text();
    assert!(log.contains("TRACE"), "not a trace-level log");
    assert_clean("the agent", &log, &secrets);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_proxy_at_trace_level_logs_no_token() {
    eprintln!("secrets: local-proxy {}", features());
    init_logs();
    let emu = Emulator::start(EmulatorConfig::loopback(EmulatorTls::Plain))
        .await
        .unwrap();
    let t = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(600));
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let spawn = |token: &str, map: &str, mode: &str| {
        spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
                .args(["local-proxy", "-v", "6", "-e", &emu.endpoint(), mode, map])
                .env("AWSIOT_TUNNEL_ACCESS_TOKEN", token)
                .env_remove("AWSIOT_TUNNEL_CLIENT_TOKEN"),
            "",
        )
    };
    let (mut dest, dest_log) = spawn(
        &t.destination_access_token,
        &format!("SSH={}", echo.addr.unwrap()),
        "-d",
    );
    let (mut source, source_log) = spawn(&t.source_access_token, "SSH=0", "-s");
    let (_, line) = within(
        "the source listens",
        source_log.wait(0, |l| l.contains("listening on")),
    )
    .await
    .unwrap();
    let addr = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    emu.wait_peer(&t.tunnel_id, Mode::Destination, true).await;
    emu.wait_peer(&t.tunnel_id, Mode::Source, true).await;
    let c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    within("transfer", echo_transfer(c, 1 << 20, 3))
        .await
        .unwrap();
    emu.close_tunnel(&t.tunnel_id);
    for (child, name) in [(&mut dest, "destination"), (&mut source, "source")] {
        let status = within(name, child.wait()).await.unwrap();
        assert!(status.success(), "{name}: {status:?}");
    }
    let mut secrets = presented_tokens(&emu, &t.tunnel_id);
    secrets.push(t.destination_access_token.clone());
    secrets.push(t.source_access_token.clone());
    assert!(secrets.len() >= 4, "{secrets:?}");
    for (log, name) in [(dest_log, "destination"), (source_log, "source")] {
        let text = log.text();
        assert!(text.contains("TRACE"), "{name}: not a trace-level log");
        assert_clean(name, &text, &secrets);
    }
}
