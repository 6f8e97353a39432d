//! Test harness: an emulator on a free loopback port, bridges run in-process, helpers to
//! wait for events. Every test gets its own ports and tunnels, so tests run in parallel.
//! The one copy of the helpers: each tier's test binary (tests/in_process, peers,
//! packaging) includes it with `#[path = "../common/mod.rs"] mod common;`.
#![allow(dead_code)]

pub mod e2e;
pub mod http_proxy;
pub mod raw_source;
pub mod rig;
pub mod softhsm;
pub mod system;

pub use system::require_system_peers;

use std::sync::Arc;
use std::time::Duration;

use securetunnel_agent::bridge::{
    Bridge, BridgeConfig, BridgeEnd, BridgeError, DataEndpoint, Limits, Phase, Role,
    SourceListeners, State, Stats,
};
use securetunnel_agent::protocol::Format;
use securetunnel_agent::secret::Secret;
use securetunnel_agent::services::ServiceMap;
use securetunnel_agent::tls::{TlsOptions, client_config};
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls, TunnelTokens};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Safety net so a broken test fails instead of hanging; never used to wait for an event.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Spawns `cmd` with no stdin or stdout, killed on drop, its stderr followed as `label`.
pub fn spawn_logged(
    cmd: &mut tokio::process::Command,
    label: &'static str,
) -> (
    tokio::process::Child,
    securetunnel_emulator::testkit::LogTail,
) {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let log = securetunnel_emulator::testkit::LogTail::follow(stderr, label);
    (child, log)
}

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

pub async fn emulator(tls: bool) -> Emulator {
    init_logs();
    let mode = if tls {
        EmulatorTls::Generate
    } else {
        EmulatorTls::Plain
    };
    Emulator::start(EmulatorConfig::loopback(mode))
        .await
        .expect("emulator starts")
}

pub fn client_tls(emu: &Emulator) -> Option<Arc<rustls::ClientConfig>> {
    let pem = emu.ca_pem()?;
    let mut opts = TlsOptions::default();
    opts.add_ca_pem(pem.as_bytes()).expect("CA PEM");
    Some(client_config(&opts).expect("TLS config"))
}

/// Limits that keep failing paths short in tests.
pub fn test_limits() -> Limits {
    Limits {
        connect_attempts: 2,
        connect_retry_delay: Duration::from_millis(20),
        reconnect_min_delay: Duration::from_millis(20),
        reconnect_max_delay: Duration::from_millis(200),
        ..Limits::default()
    }
}

pub struct Running {
    pub stats: Arc<Stats>,
    pub state: watch::Receiver<State>,
    pub cancel: CancellationToken,
    pub task: JoinHandle<Result<BridgeEnd, BridgeError>>,
}

impl Running {
    pub async fn wait_phase(&mut self, phase: Phase) {
        tokio::time::timeout(DEADLINE, self.state.wait_for(|s| s.phase == phase))
            .await
            .expect("bridge reaches phase in time")
            .expect("bridge state available");
    }

    pub async fn wait_sessions(&mut self, n: u64) {
        tokio::time::timeout(
            DEADLINE,
            self.state
                .wait_for(|s| s.sessions >= n && s.phase == Phase::Ready),
        )
        .await
        .expect("bridge reconnects in time")
        .expect("bridge state available");
    }

    /// Waits until `n` STREAM_RESET/SESSION_RESET messages have arrived in total.
    pub async fn wait_resets(&mut self, n: u64) {
        tokio::time::timeout(DEADLINE, self.state.wait_for(|s| s.resets_received >= n))
            .await
            .expect("resets arrive in time")
            .expect("bridge state available");
    }

    pub async fn stop(self) -> Result<BridgeEnd, BridgeError> {
        self.cancel.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("bridge stops")
            .expect("bridge task")
    }
}

pub fn spawn_bridge(cfg: BridgeConfig) -> Running {
    run_bridge(Bridge::new(cfg).expect("valid bridge config"))
}

/// Runs a bridge built by the caller (shared budget, own lookups...).
pub fn run_bridge(bridge: Bridge) -> Running {
    let cancel = CancellationToken::new();
    Running {
        stats: bridge.stats(),
        state: bridge.state(),
        cancel: cancel.clone(),
        task: tokio::spawn(bridge.run(cancel)),
    }
}

pub fn config(emu: &Emulator, token: &str, role: Role, limits: Limits) -> BridgeConfig {
    BridgeConfig {
        role,
        endpoint: DataEndpoint::parse_override(&emu.endpoint()).expect("emulator endpoint"),
        tls: client_tls(emu),
        access_token: Secret::new(token),
        client_token: None,
        limits,
    }
}

pub fn destination(emu: &Emulator, t: &TunnelTokens, services: ServiceMap) -> Running {
    destination_with(emu, t, services, test_limits())
}

pub fn destination_with(
    emu: &Emulator,
    t: &TunnelTokens,
    services: ServiceMap,
    limits: Limits,
) -> Running {
    let role = Role::Destination {
        services: services.into(),
        scope: securetunnel_agent::services::Scope::WholeMap,
        consent: securetunnel_agent::consent::Gate::always(),
    };
    spawn_bridge(config(emu, &t.destination_access_token, role, limits))
}

/// A source bridge listening on free ports for the given services (`SSH=0,HTTP=0`).
pub async fn source(
    emu: &Emulator,
    t: &TunnelTokens,
    mappings: &str,
    format: Format,
) -> (Running, SourceListenersAddrs) {
    source_with(emu, t, mappings, format, test_limits()).await
}

pub async fn source_with(
    emu: &Emulator,
    t: &TunnelTokens,
    mappings: &str,
    format: Format,
    limits: Limits,
) -> (Running, SourceListenersAddrs) {
    let map = ServiceMap::parse_mappings(mappings, "127.0.0.1", true).expect("mappings");
    let listeners = SourceListeners::bind(&map).await.expect("bind listeners");
    let addrs = SourceListenersAddrs::of(&listeners, &map);
    let role = Role::Source { listeners, format };
    let running = spawn_bridge(config(emu, &t.source_access_token, role, limits));
    (running, addrs)
}

pub struct SourceListenersAddrs(Vec<(String, std::net::SocketAddr)>);

impl SourceListenersAddrs {
    fn of(l: &SourceListeners, map: &ServiceMap) -> Self {
        let mut v: Vec<_> = map
            .named()
            .filter_map(|(s, _)| l.tcp_addr(s).map(|a| (s.to_owned(), a)))
            .collect();
        if let Some(a) = l.tcp_addr("") {
            v.push((String::new(), a));
        }
        SourceListenersAddrs(v)
    }

    pub fn get(&self, service: &str) -> std::net::SocketAddr {
        self.0
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, a)| *a)
            .expect("listener for service")
    }
}

/// Emulator, tunnel, destination and source, all connected and ready.
pub struct Tunnel {
    pub emu: Emulator,
    pub tokens: TunnelTokens,
    pub dest: Running,
    pub src: Running,
    pub addrs: SourceListenersAddrs,
}

pub async fn tunnel(
    services: &[&str],
    dest_map: ServiceMap,
    src_map: &str,
    format: Format,
) -> Tunnel {
    tunnel_with(services, dest_map, src_map, format, test_limits(), true).await
}

pub async fn tunnel_with(
    services: &[&str],
    dest_map: ServiceMap,
    src_map: &str,
    format: Format,
    dest_limits: Limits,
    tls: bool,
) -> Tunnel {
    let emu = emulator(tls).await;
    let tokens = emu.open_tunnel(services, Duration::from_secs(3600));
    let mut dest = destination_with(&emu, &tokens, dest_map, dest_limits);
    let (mut src, addrs) = source(&emu, &tokens, src_map, format).await;
    dest.wait_phase(Phase::Ready).await;
    src.wait_phase(Phase::Ready).await;
    Tunnel {
        emu,
        tokens,
        dest,
        src,
        addrs,
    }
}

pub fn get(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

pub async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

pub fn tcp(addr: std::net::SocketAddr) -> securetunnel_agent::services::LocalEndpoint {
    securetunnel_agent::services::LocalEndpoint::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

/// A client with some bytes echoed through the tunnel, so its stream is up end to end.
pub async fn live_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within("echo of a live client", c.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"ping");
    c
}
