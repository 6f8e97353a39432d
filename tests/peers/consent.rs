//! Site consent (`[consent] mode = "file"`) through mosquitto, the emulator and this
//! project's source side: a revoke during a transfer, a notify kept while consent is
//! withheld, consent limited to one service, a file on a missing directory, a symbolic link.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::e2e::*;
use crate::common::rig::{AgentProc, Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::bridge::Phase;
use securetunnel_agent::protocol::{Format, Mode};
use securetunnel_emulator::testkit::{EchoService, echo_tcp};

/// An agent for `thing` serving `services` from one echo service, with consent at `path`
/// (covering `covered`, all when empty).
async fn consent_agent(
    rig: &Rig,
    thing: &str,
    services: &[&str],
    path: &Path,
    covered: &[&str],
) -> (AgentProc, EchoService, PathBuf) {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map: String = services
        .iter()
        .map(|s| format!("{s} = \"{}\"\n", echo.addr.unwrap()))
        .collect();
    let covered = match covered {
        [] => String::new(),
        some => format!("services = {some:?}\n"),
    };
    let extra = format!(
        "[consent]\nmode = \"file\"\npath = \"{}\"\n{covered}",
        path.display()
    );
    let cfg = rig.agent_config(thing, &map, &extra);
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    (agent, echo, cfg)
}

/// Reads until the connection ends (EOF or reset); true if it ended before `limit`.
async fn ends_within(c: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = vec![0; 64 * 1024];
    tokio::time::timeout(limit, async {
        while matches!(c.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .is_ok()
}

/// A new connection through the source is closed without an echo: its stream was refused.
async fn refused(addr: std::net::SocketAddr) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    // The source sends nothing before STREAM_START is answered; a write may race the close.
    let _ = c.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let got = within("a refused connection closes", c.read(&mut buf)).await;
    assert!(matches!(got, Ok(0) | Err(_)), "echoed: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_consent_closes_a_transfer_within_a_second_and_refuses_new_streams() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    std::fs::write(&allow, "").unwrap();
    let thing = "gw-consent";
    let (mut agent, _echo, cfg) = consent_agent(&rig, thing, &["SSH"], &allow, &[]).await;
    let (t, _) = open_connected(&rig, thing, &["SSH"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;

    // A transfer under way: bytes go and come back.
    let mut c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    c.write_all(&[7u8; 32 * 1024]).await.unwrap();
    let mut first = [0u8; 1024];
    within("echo under way", c.read_exact(&mut first))
        .await
        .unwrap();
    let revoked = Instant::now();
    std::fs::remove_file(&allow).unwrap();
    assert!(
        ends_within(&mut c, Duration::from_secs(1)).await,
        "the connection outlived the revoke by more than 1 s"
    );
    agent.expect("site consent withdrawn: closing").await;
    eprintln!("closed {:?} after the revoke", revoked.elapsed());

    // New streams are refused while it is withheld, with a line saying why.
    refused(addrs.get("SSH")).await;
    agent
        .expect("refusing stream: site consent is withheld for this service")
        .await;
    let status = status_json(&cfg).await;
    assert_eq!(status["consent"], "withheld", "{status}");
    assert_eq!(status["tunnels"][0]["phase"], "connected", "{status}");

    // Granted again: served again, on the same tunnel.
    std::fs::write(&allow, "").unwrap();
    agent.expect("site consent granted").await;
    transfer(&addrs, "SSH", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_while_consent_is_withheld_waits_and_connects_when_it_is_granted() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    let thing = "gw-consent-wait";
    let (mut agent, _echo, cfg) = consent_agent(&rig, thing, &["SSH"], &allow, &[]).await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    agent
        .expect("awaiting site consent before connecting")
        .await;
    let status = status_json(&cfg).await;
    assert_eq!(
        status["tunnels"][0]["phase"], "awaiting consent",
        "{status}"
    );
    assert_eq!(status["consent"], "withheld", "{status}");
    // Kept, not connected: the service never saw the destination.
    assert!(destination_connects(&rig, &t.tunnel_id).is_empty());

    std::fs::write(&allow, "").unwrap();
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects once consent is given", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_lifetime_ends_while_consent_is_withheld_never_connects() {
    // A service minute of 2 s: the tunnel lives 2 s from OpenTunnel.
    let rig = Rig::start(RigOptions {
        minute: Duration::from_secs(2),
        ..RigOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    let thing = "gw-consent-late";
    let (mut agent, _echo, cfg) = consent_agent(&rig, thing, &["SSH"], &allow, &[]).await;
    let t = open(&rig, thing, &["SSH"], 1).await;
    agent
        .expect("awaiting site consent before connecting")
        .await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the tunnel's lifetime ends", |e| e.is_closed(&id)).await;
    // Consent after the lifetime: the wait did not extend it, the token is refused.
    std::fs::write(&allow, "").unwrap();
    agent.expect("session ended").await;
    assert!(destination_connects(&rig, &id).is_empty());
    let status = status_json(&cfg).await;
    assert_eq!(status["tunnels"], serde_json::json!([]), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_stream_is_closed_when_consent_for_its_service_is_revoked() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    std::fs::write(&allow, "").unwrap();
    let thing = "gw-consent-v1";
    // Consent covers SSH only: a V1 stream (no service id) is SSH's.
    let (mut agent, _echo, _cfg) =
        consent_agent(&rig, thing, &["SSH", "HTTP"], &allow, &["SSH"]).await;
    let (t, _) = open_connected(&rig, thing, &["SSH"]).await;
    let (mut src, addrs) = source(&rig.emu, &t, "0", Format::V1).await;
    src.wait_phase(Phase::Ready).await;
    let mut c = live_client(addrs.get("")).await;
    std::fs::remove_file(&allow).unwrap();
    assert!(
        ends_within(&mut c, Duration::from_secs(1)).await,
        "the V1 connection outlived the revoke"
    );
    agent.expect("site consent withdrawn: closing").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_limited_to_ssh_leaves_http_open() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    let thing = "gw-consent-ssh";
    let (mut agent, _echo, cfg) =
        consent_agent(&rig, thing, &["SSH", "HTTP"], &allow, &["SSH"]).await;
    // HTTP needs no consent, so the tunnel connects at once.
    let (t, _) = open_connected(&rig, thing, &["SSH", "HTTP"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0,HTTP=0").await;
    transfer(&addrs, "HTTP", 4).await;
    refused(addrs.get("SSH")).await;
    assert_eq!(status_json(&cfg).await["consent"], "withheld for SSH");

    std::fs::write(&allow, "").unwrap();
    agent.expect("site consent granted").await;
    transfer(&addrs, "SSH", 5).await;
    // A revoke closes SSH's connections and leaves HTTP's.
    let mut http = TcpStream::connect(addrs.get("HTTP")).await.unwrap();
    let mut ssh = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    for c in [&mut http, &mut ssh] {
        c.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        within("echo", c.read_exact(&mut b)).await.unwrap();
    }
    std::fs::remove_file(&allow).unwrap();
    assert!(ends_within(&mut ssh, Duration::from_secs(1)).await);
    http.write_all(b"still").await.unwrap();
    let mut b = [0u8; 5];
    within("HTTP still echoes", http.read_exact(&mut b))
        .await
        .unwrap();
    assert_eq!(&b, b"still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_on_a_missing_directory_waits_for_the_directory_and_the_file() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("switch/state/allow");
    let thing = "gw-consent-dir";
    let (mut agent, _echo, cfg) = consent_agent(&rig, thing, &["SSH"], &allow, &[]).await;
    // Said once at the start, before the subscription.
    assert_eq!(agent.count("the file's directory does not exist"), 1);
    let out = check_config(&cfg).await;
    assert!(
        out.contains("warning: consent.path: the directory of") && out.contains("does not exist"),
        "{out}"
    );
    let t = open(&rig, thing, &["SSH"], 30).await;
    agent
        .expect("awaiting site consent before connecting")
        .await;
    std::fs::create_dir_all(allow.parent().unwrap()).unwrap();
    std::fs::write(&allow, "").unwrap();
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects once the file exists", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symbolic_link_never_grants_consent() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow");
    let target = dir.path().join("target");
    std::fs::write(&target, "").unwrap();
    std::os::unix::fs::symlink(&target, &allow).unwrap();
    let thing = "gw-consent-link";
    let (mut agent, _echo, cfg) = consent_agent(&rig, thing, &["SSH"], &allow, &[]).await;
    assert_eq!(
        agent.count("is a symbolic link, which is never followed"),
        1
    );
    let out = check_config(&cfg).await;
    assert!(
        out.contains("withheld (a symbolic link is never followed)"),
        "{out}"
    );
    assert!(
        out.contains("is a symbolic link, which never grants"),
        "{out}"
    );
    let t = open(&rig, thing, &["SSH"], 30).await;
    agent
        .expect("awaiting site consent before connecting")
        .await;
    // The link replaced by a regular file grants.
    std::fs::remove_file(&allow).unwrap();
    std::fs::write(&allow, "").unwrap();
    let id = t.tunnel_id.clone();
    until(
        &rig.emu,
        "the agent connects once a file replaces the link",
        |e| e.is_connected(&id, Mode::Destination),
    )
    .await;
}

/// `check-config` on `cfg`: its whole output; it must pass.
async fn check_config(cfg: &Path) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(["check-config", "--config"])
        .arg(cfg)
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    text
}
