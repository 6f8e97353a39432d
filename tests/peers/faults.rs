//! The fault matrix: the agent process (mosquitto, the emulator's control plane, this
//! project's source side) under each fault a field gateway meets. Every scenario asserts that
//! each local connection either completed byte-exact or was visibly reset (an error or EOF,
//! never a silently short or wrong echo), that nothing hangs (every wait is bounded), and
//! that the agent's peak RSS stayed under 16 MiB.

use std::io;

use crate::common::e2e::*;
use crate::common::rig::{AgentProc, ConfigExtra, Rig, RigOptions};
use crate::common::*;
use bytes::BytesMut;
use securetunnel_agent::protocol::{Format, FrameCodec, Message, Mode};
use securetunnel_emulator::TunnelTokens;
use securetunnel_emulator::testkit::{
    Behaviour, EchoService, echo_tcp, echo_transfer, proc_status_kib, service_tcp, service_unix,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::codec::Encoder;

/// Peak RSS allowed to the agent in every scenario.
const RSS_LIMIT_KIB: u64 = 16 * 1024;

/// One agent serving one SSH tunnel, with this project's source side ready.
struct Stage {
    rig: Rig,
    agent: AgentProc,
    _echo: EchoService,
    t: TunnelTokens,
    src: Running,
    addrs: SourceListenersAddrs,
}

async fn stage(thing: &str, tunnel_extra: &str, rest: &str) -> Stage {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config_with(
        thing,
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            tunnel: tunnel_extra,
            rest,
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(&rig, thing, &["SSH"]).await;
    let (src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    Stage {
        rig,
        agent,
        _echo: echo,
        t,
        src,
        addrs,
    }
}

/// How a batch of transfers ended.
#[derive(Debug, Default)]
struct Outcome {
    exact: usize,
    reset: usize,
}

/// A transfer's end: byte-exact (`Ok`) or visibly reset; a wrong echo fails the test.
fn classify(r: io::Result<securetunnel_emulator::testkit::TransferReport>, o: &mut Outcome) {
    match r {
        Ok(_) => o.exact += 1,
        Err(e) if e.kind() == io::ErrorKind::InvalidData => panic!("silently wrong data: {e}"),
        Err(_) => o.reset += 1,
    }
}

/// Bytes the emulator must have relayed to the destination before a fault fires: the
/// transfers are under way, far from done.
const UNDER_WAY: u64 = 1 << 20;

/// `n` transfers of `size` bytes started at once; `fault` happens once they are under way.
async fn transfers_during(
    emu: &securetunnel_emulator::Emulator,
    id: &str,
    addr: std::net::SocketAddr,
    n: usize,
    size: usize,
    fault: impl std::future::Future<Output = ()>,
) -> Outcome {
    let base = emu.data_bytes_to(id, Mode::Destination);
    let mut tasks = Vec::new();
    for seed in 0..n {
        let c = TcpStream::connect(addr).await.unwrap();
        tasks.push(tokio::spawn(echo_transfer(c, size, seed as u64)));
    }
    until(emu, "the transfers are under way", |e| {
        e.data_bytes_to(id, Mode::Destination) >= base + UNDER_WAY
    })
    .await;
    fault.await;
    let mut o = Outcome::default();
    for t in tasks {
        classify(within("a transfer ends", t).await.unwrap(), &mut o);
    }
    o
}

impl Stage {
    fn id(&self) -> String {
        self.t.tunnel_id.clone()
    }

    /// The tunnel works again: a fresh transfer is byte-exact.
    async fn works(&self, seed: u64) {
        transfer(&self.addrs, "SSH", seed).await;
    }

    fn assert_rss(&self) {
        let peak = proc_status_kib(self.agent.pid(), "VmHWM:").unwrap();
        eprintln!("faults: the agent's peak RSS was {peak} KiB");
        assert!(
            peak < RSS_LIMIT_KIB,
            "the agent's peak RSS was {peak} KiB (limit {RSS_LIMIT_KIB})"
        );
        assert!(self.agent_alive(), "the agent exited");
    }

    fn agent_alive(&self) -> bool {
        std::fs::metadata(format!("/proc/{}", self.agent.pid())).is_ok()
    }

    async fn wait_reconnect(&self, connects: usize) {
        let id = self.id();
        until(&self.rig.emu, "the agent reconnects", |e| {
            e.peer_events(&id)
                .iter()
                .filter(|ev| {
                    ev.mode == Mode::Destination
                        && ev.kind == securetunnel_emulator::PeerEventKind::Connected
                })
                .count()
                >= connects
                && e.is_connected(&id, Mode::Destination)
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_drop_mid_transfer() {
    let s = stage("f-drop", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 4, 8 << 20, async {
        emu.drop_peer(&id, Mode::Destination);
    })
    .await;
    assert_eq!(o.exact + o.reset, 4, "{o:?}");
    assert!(o.reset >= 1, "the drop cut no transfer: {o:?}");
    s.wait_reconnect(2).await;
    s.works(1).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reset_mid_transfer() {
    let s = stage("f-sreset", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 4, 8 << 20, async {
        assert!(
            emu.inject(&id, Mode::Destination, &Message::session_reset())
                .await
        );
    })
    .await;
    assert_eq!(o.exact + o.reset, 4, "{o:?}");
    assert!(o.reset >= 1, "the reset cut no transfer: {o:?}");
    s.works(2).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reset_mid_transfer() {
    let s = stage("f-reset", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 4, 8 << 20, async {
        let stream = emu.active_stream(&id, "SSH").unwrap();
        let reset = Message::stream_reset(stream, "SSH");
        assert!(emu.inject(&id, Mode::Destination, &reset).await);
    })
    .await;
    assert_eq!(o.exact + o.reset, 4, "{o:?}");
    assert!(o.reset >= 1, "the reset cut no transfer: {o:?}");
    s.works(3).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_peer() {
    let mut s = stage("f-hole", "idle_timeout_secs = 3", "").await;
    // The idle timeout applies once the service answered a ping.
    s.agent.expect("idle timeout armed").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 2, 32 << 20, async {
        emu.black_hole(&id, Mode::Destination);
    })
    .await;
    assert_eq!(o.reset, 2, "a transfer went through a black hole: {o:?}");
    s.wait_reconnect(2).await;
    s.works(4).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart() {
    let mut s = stage("f-broker", "", "").await;
    let addr = s.addrs.get("SSH");
    let mut tasks = Vec::new();
    for seed in 0..3 {
        let c = TcpStream::connect(addr).await.unwrap();
        tasks.push(tokio::spawn(echo_transfer(c, 8 << 20, seed)));
    }
    s.rig.mosquitto.restart().await;
    let mut o = Outcome::default();
    for t in tasks {
        classify(within("a transfer ends", t).await.unwrap(), &mut o);
    }
    // Tunnels do not depend on MQTT: nothing was reset.
    assert_eq!(o.exact, 3, "{o:?}");
    s.agent.expect("subscribed to tunnel notifications").await;
    s.works(5).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_of_5xx_answers() {
    let s = stage("f-5xx", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 2, 8 << 20, async {
        emu.fail_next_handshakes(4, 503);
        emu.drop_peer(&id, Mode::Destination);
    })
    .await;
    assert_eq!(o.exact + o.reset, 2, "{o:?}");
    assert!(o.reset >= 1, "the drop cut no transfer: {o:?}");
    s.wait_reconnect(2).await;
    assert!(emu.handshakes_for_token(&s.t.destination_access_token) >= 5);
    s.works(6).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_answered_4xx() {
    let mut s = stage("f-4xx", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    let agent = &mut s.agent;
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 2, 8 << 20, async {
        // Revoked without a notify (no publisher on this path), then the link drops: the
        // reconnect is refused for good.
        emu.rotate(&id, Mode::Destination).unwrap();
        emu.drop_peer(&id, Mode::Destination);
        let line = agent.expect("session ended").await;
        assert!(line.contains("token rejected"), "{line}");
        // The service never tells a source that its destination is gone (docs/protocol.md §3.5):
        // the operator closes the tunnel, which resets the source's connections.
        emu.close_tunnel(&id);
    })
    .await;
    assert_eq!(o.reset, 2, "a transfer outlived its tunnel: {o:?}");
    // The agent goes on: a new tunnel is served.
    let t2 = open(&s.rig, "f-4xx", &["SSH"], 30).await;
    let id2 = t2.tunnel_id.clone();
    until(emu, "the new tunnel connects", |e| {
        e.is_connected(&id2, Mode::Destination)
    })
    .await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_notify() {
    let mut s = stage("f-dup", "", "").await;
    let notify = json!({
        "clientAccessToken": s.t.destination_access_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    })
    .to_string()
    .into_bytes();
    let (emu, id) = (&s.rig.emu, s.id());
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 2, 8 << 20, async {
        for _ in 0..3 {
            emu.publish_raw("$aws/things/f-dup/tunnels/notify", notify.clone())
                .await
                .unwrap();
        }
    })
    .await;
    assert_eq!(o.exact, 2, "a duplicate disturbed the tunnel: {o:?}");
    s.agent.expect("duplicate notify ignored").await;
    assert_eq!(emu.handshakes_for_token(&s.t.destination_access_token), 1);
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_mid_transfer() {
    let mut s = stage("f-rot", "", "").await;
    let id = s.id();
    let rig = &s.rig;
    let o = transfers_during(&rig.emu, &id, s.addrs.get("SSH"), 4, 8 << 20, async {
        rotate(rig, &id, "DESTINATION", "f-rot").await;
    })
    .await;
    assert_eq!(o.exact + o.reset, 4, "{o:?}");
    s.wait_reconnect(2).await;
    // The service resets the source's stream when the destination reconnects: connect after
    // that reset (the transfers above may all have ended before it).
    s.src.wait_resets(1).await;
    s.works(7).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_service_refusing() {
    // The map points at a port nothing listens on.
    let rig = Rig::start(RigOptions::default()).await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let cfg = rig.agent_config("f-refuse", &format!("SSH = \"{dead}\""), "");
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(&rig, "f-refuse", &["SSH"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let mut o = Outcome::default();
    for seed in 0..3 {
        let c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
        classify(
            within("a refused connection ends", echo_transfer(c, 1 << 20, seed)).await,
            &mut o,
        );
    }
    assert_eq!(o.reset, 3, "{o:?}");
    agent.expect("could not connect to local service").await;
    let peak = proc_status_kib(agent.pid(), "VmHWM:").unwrap();
    assert!(peak < RSS_LIMIT_KIB, "{peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_local_consumer_beside_a_fast_one() {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let stuck = service_tcp("127.0.0.1:0", Behaviour::Stuck).await.unwrap();
    let cfg = rig.agent_config(
        "f-slow",
        &format!(
            "FAST = \"{}\"\nSTUCK = \"{}\"",
            echo.addr.unwrap(),
            stuck.addr.unwrap()
        ),
        "",
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(&rig, "f-slow", &["FAST", "STUCK"]).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "FAST=0,STUCK=0").await;
    let stuck_client = TcpStream::connect(addrs.get("STUCK")).await.unwrap();
    let stuck_task = tokio::spawn(echo_transfer(stuck_client, 16 << 20, 1));
    let fast = TcpStream::connect(addrs.get("FAST")).await.unwrap();
    within("the fast transfer", echo_transfer(fast, 32 << 20, 2))
        .await
        .expect("the fast connection completes byte-exact");
    let mut o = Outcome::default();
    classify(
        within("the stuck transfer ends", stuck_task).await.unwrap(),
        &mut o,
    );
    assert_eq!(o.reset, 1, "the stuck connection was not reset: {o:?}");
    agent.expect("local consumer stopped reading").await;
    let peak = proc_status_kib(agent.pid(), "VmHWM:").unwrap();
    assert!(peak < RSS_LIMIT_KIB, "{peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_connections_with_stalled_consumers() {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    // A Unix socket: a consumer that does not read backs up after ~200 KiB, not after the
    // 4 MiB a loopback TCP connection absorbs.
    let sock = rig.files.dir.join("stuck.sock");
    let _stuck = service_unix(&sock, Behaviour::Stuck).unwrap();
    let cfg = rig.agent_config_with(
        "f-100",
        &ConfigExtra {
            services: &format!(
                "FAST = \"{}\"\nSTUCK = \"{}\"",
                echo.addr.unwrap(),
                sock.display()
            ),
            tunnel: "stall_timeout_ms = 1500",
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, _) = open_connected(&rig, "f-100", &["FAST", "STUCK"]).await;
    // A source with a large budget pushes as fast as it can: the agent must bound what it
    // holds by itself.
    let limits = securetunnel_agent::bridge::Limits {
        buffer_budget: 256 << 20,
        ..test_limits()
    };
    let (mut src, addrs) = source_with(&rig.emu, &t, "FAST=0,STUCK=0", Format::V3, limits).await;
    src.wait_phase(securetunnel_agent::bridge::Phase::Ready)
        .await;
    let mut stuck_tasks = Vec::new();
    for seed in 0..100 {
        let c = TcpStream::connect(addrs.get("STUCK")).await.unwrap();
        stuck_tasks.push(tokio::spawn(echo_transfer(c, 2 << 20, seed)));
    }
    let fast = TcpStream::connect(addrs.get("FAST")).await.unwrap();
    within("the fast transfer", echo_transfer(fast, 8 << 20, 1000))
        .await
        .expect("the fast connection completes byte-exact");
    let mut o = Outcome::default();
    for t in stuck_tasks {
        classify(within("a stuck transfer ends", t).await.unwrap(), &mut o);
    }
    assert_eq!(o.reset, 100, "{o:?}");
    let peak = proc_status_kib(agent.pid(), "VmHWM:").unwrap();
    eprintln!("faults: the agent's peak RSS was {peak} KiB");
    assert!(peak < RSS_LIMIT_KIB, "{peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_one_byte_frames() {
    let s = stage("f-flood", "", "").await;
    let id = s.id();
    // A held connection of the tunnel's SSH stream (connection 1 of its stream).
    let mut held = live_client(s.addrs.get("SSH")).await;
    let stream = s.rig.emu.active_stream(&id, "SSH").unwrap();
    // 60,000 one-byte DATA frames for it, 5,000 (80 KB) to a websocket message.
    const FRAMES: usize = 60_000;
    for _ in 0..FRAMES / 5_000 {
        let mut wire = BytesMut::new();
        for _ in 0..5_000 {
            let m = Message::data(stream, "SSH", 1, bytes::Bytes::from_static(b"x"));
            FrameCodec.encode(&m, &mut wire).unwrap();
        }
        assert!(
            s.rig
                .emu
                .inject_ws(&id, Mode::Destination, WsMessage::Binary(wire.freeze()))
                .await
        );
    }
    // The echo service sends every byte back through the tunnel to the held client.
    let mut got = vec![0u8; FRAMES];
    within("the flood's echo", held.read_exact(&mut got))
        .await
        .unwrap();
    assert!(got.iter().all(|b| *b == b'x'));
    held.write_all(b"ping").await.unwrap();
    let mut tail = [0u8; 4];
    within("the connection still echoes", held.read_exact(&mut tail))
        .await
        .unwrap();
    assert_eq!(&tail, b"ping");
    s.works(8).await;
    s.assert_rss();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_unmapped_stream_starts() {
    let rig = Rig::start(RigOptions::default()).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config(
        "f-unmapped",
        &format!("SSH = \"{}\"", echo.addr.unwrap()),
        "",
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (t, id) = open_connected(&rig, "f-unmapped", &["SSH", "FTP"]).await;
    let (src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    const STARTS: i32 = 20_000;
    for batch in 0..STARTS / 5000 {
        let mut wire = BytesMut::new();
        for i in 0..5000 {
            let m = Message::stream_start(batch * 5000 + i + 1, "FTP", 1);
            FrameCodec.encode(&m, &mut wire).unwrap();
        }
        assert!(
            rig.emu
                .inject_ws(&id, Mode::Destination, WsMessage::Binary(wire.freeze()))
                .await
        );
    }
    // Traffic behind the flood shares its ordered path: it was all handled.
    transfer(&addrs, "SSH", 9).await;
    // Each refusal was answered: a full reply backlog pauses the reader, it drops nothing.
    let mut state = src.state.clone();
    within("every refusal reaches the source", async {
        state
            .wait_for(|s| s.resets_received >= STARTS as u64)
            .await
            .unwrap();
    })
    .await;
    let refusals = agent.count("refusing stream");
    assert!(
        (1..=40).contains(&refusals),
        "{refusals} refusal lines for {STARTS} streams: the log must not flood"
    );
    let peak = proc_status_kib(agent.pid(), "VmHWM:").unwrap();
    assert!(peak < RSS_LIMIT_KIB, "{peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_notify() {
    let mut s = stage("f-big", "", "").await;
    let (emu, id) = (&s.rig.emu, s.id());
    // 256 KiB on the notify topic: more than any MQTT client of the agent will read.
    let big = vec![b'x'; 256 << 10];
    let o = transfers_during(emu, &id, s.addrs.get("SSH"), 2, 8 << 20, async {
        emu.publish_raw("$aws/things/f-big/tunnels/notify", big.clone())
            .await
            .unwrap();
    })
    .await;
    assert_eq!(o.exact, 2, "the tunnel was disturbed: {o:?}");
    s.agent.expect("wiping the MQTT session").await;
    s.agent.expect("subscribed to tunnel notifications").await;
    // Not deaf: a real OpenTunnel is served.
    let t2 = open(&s.rig, "f-big", &["SSH"], 30).await;
    s.agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    let id2 = t2.tunnel_id.clone();
    until(emu, "the new tunnel connects", |e| {
        e.is_connected(&id2, Mode::Destination)
    })
    .await;
    s.assert_rss();
}
