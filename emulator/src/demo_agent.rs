//! The README's demo of the whole product on one machine: an embedded MQTT broker, the
//! tunneling-service emulator (data and control plane), the agent as its own process with a
//! config file, a local echo service and the source side. Also the latency bench, which
//! repeats open and rotate on the same stack.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::pki::{TestPki, mutual_tls_client};
use super::publisher::PublisherConfig;
use super::testkit::{
    EchoService, LogTail, echo_tcp, echo_transfer, mapped_file_rss_kib, proc_status_kib,
};
use super::{Emulator, EmulatorConfig, EmulatorTls};
use securetunnel_agent::bridge::{
    Bridge, BridgeConfig, DataEndpoint, Limits, Phase, Role, SourceListeners,
};
use securetunnel_agent::protocol::{Format, Mode};
use securetunnel_agent::secret::Secret;
use securetunnel_agent::services::ServiceMap;
use securetunnel_agent::tls::{TlsOptions, client_config};

pub const THING: &str = "demo-gateway";
/// rumqttd refuses `$` topics, so the demo remaps the notify topic as a local bridge would.
const DEMO_TOPIC: &str = "demo/things/{thing}/tunnels/notify";
const WAIT: Duration = Duration::from_secs(30);

type R<T> = Result<T, String>;

fn e(x: impl std::fmt::Display) -> String {
    x.to_string()
}

/// Broker, emulator and agent, up and subscribed.
pub struct Stack {
    pub emu: Emulator,
    pub agent: Child,
    pub log: LogTail,
    pub echo: EchoService,
    pub broker: std::net::SocketAddr,
    cursor: usize,
    tls: Arc<rustls::ClientConfig>,
}

fn write(dir: &Path, name: &str, text: &str) -> R<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|err| format!("{}: {err}", p.display()))?;
    Ok(p)
}

impl Stack {
    pub async fn start(agent_bin: &Path, dir: &Path) -> R<Stack> {
        use std::os::unix::fs::PermissionsExt;
        let pki = TestPki::new("demo CA").map_err(e)?;
        let ca_pem = pki.ca_pem();
        let ca = write(dir, "ca.crt", &ca_pem)?;
        let server = pki.server(&[]).map_err(e)?;
        let broker = super::broker::start(
            super::testkit::free_port().map_err(e)?,
            &ca,
            &write(dir, "broker.crt", &server.cert_pem)?,
            &write(dir, "broker.key", &server.key_pem)?,
        )?;
        let admin = pki.client("tunnel-admin").map_err(e)?;
        let mut cfg = EmulatorConfig::loopback(EmulatorTls::Generate);
        cfg.control_plane = true;
        cfg.publisher = Some(PublisherConfig {
            host: "127.0.0.1".into(),
            port: broker.port(),
            client_id: "tunnel-admin".into(),
            tls: mutual_tls_client(&ca_pem, &admin)?,
            topic: DEMO_TOPIC.into(),
        });
        let emu = Emulator::start(cfg).await.map_err(e)?;
        tokio::time::timeout(WAIT, emu.wait_publisher())
            .await
            .map_err(|_| "the emulator could not connect to the broker")?;
        let emu_ca_pem = emu.ca_pem().unwrap_or_default().to_owned();
        let emu_ca = write(dir, "emulator-ca.pem", &emu_ca_pem)?;
        let thing = pki.client(THING).map_err(e)?;
        let key = write(dir, "device.key", &thing.key_pem)?;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).map_err(e)?;
        let echo = echo_tcp("127.0.0.1:0").await.map_err(e)?;
        let config = format!(
            "thing_name = \"{THING}\"\nstate_dir = \"{}\"\nruntime_dir = \"{}\"\n[mqtt]\nendpoint = \"127.0.0.1\"\nport = {}\n\
             cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nnotify_topic = \"{}\"\n[tunnel]\nendpoint = \"{}\"\nca = \"{}\"\n\
             [services]\nSSH = \"{}\"\n",
            dir.join("state").display(),
            dir.join("run").display(),
            broker.port(),
            write(dir, "device.crt", &thing.cert_pem)?.display(),
            key.display(),
            ca.display(),
            DEMO_TOPIC.replace("{thing}", THING),
            emu.endpoint(),
            emu_ca.display(),
            echo.addr.ok_or("echo service has no address")?,
        );
        let config = write(dir, "agent.toml", &config)?;
        let mut agent = Command::new(agent_bin)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                format!(
                    "cannot start {}: {err} (build it first)",
                    agent_bin.display()
                )
            })?;
        let log = LogTail::follow(agent.stderr.take().ok_or("no agent stderr")?, "");
        let mut trust = TlsOptions::default();
        trust.add_ca_pem(emu_ca_pem.as_bytes()).map_err(e)?;
        let mut stack = Stack {
            emu,
            agent,
            log,
            echo,
            broker,
            cursor: 0,
            tls: client_config(&trust).map_err(e)?,
        };
        stack.expect("subscribed to tunnel notifications").await?;
        Ok(stack)
    }

    /// Waits for the agent's next log line containing `text`.
    pub async fn expect(&mut self, text: &str) -> R<String> {
        match tokio::time::timeout(WAIT, self.log.wait(self.cursor, |l| l.contains(text))).await {
            Ok(Some((i, line))) => {
                self.cursor = i + 1;
                Ok(line)
            }
            _ => Err(format!(
                "the agent never logged {text:?}; its log:\n{}",
                self.log.text()
            )),
        }
    }

    pub async fn api(&self, op: &str, body: Value) -> R<Value> {
        self.emu
            .api(op, body)
            .await
            .map_err(|err| format!("{op}: {}: {}", err.kind, err.message))
    }

    /// Waits until the destination is connected with `token`.
    pub async fn connected_with(&self, tunnel: &str, token: &str) -> R<()> {
        let mut changes = self.emu.changes();
        tokio::time::timeout(WAIT, async {
            while !self.emu.peer_token_is(tunnel, Mode::Destination, token) {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .map_err(|_| format!("the agent did not connect to tunnel {tunnel}"))
    }

    /// OpenTunnel for the thing; returns the response and the time to the agent's connection.
    pub async fn open(&self) -> R<(Value, Duration)> {
        let start = Instant::now();
        let r = self
            .api(
                "OpenTunnel",
                json!({"destinationConfig": {"thingName": THING, "services": ["SSH"]}, "timeoutConfig": {"maxLifetimeTimeoutMinutes": 30}}),
            )
            .await?;
        let id = r["tunnelId"].as_str().ok_or("no tunnelId")?.to_owned();
        self.connected_with(
            &id,
            r["destinationAccessToken"].as_str().unwrap_or_default(),
        )
        .await?;
        Ok((r, start.elapsed()))
    }

    /// Rotate DESTINATION; returns the new token and the time until the agent uses it.
    pub async fn rotate(&self, tunnel: &str) -> R<(String, Duration)> {
        let start = Instant::now();
        let r = self
            .api(
                "RotateTunnelAccessToken",
                json!({"tunnelId": tunnel, "clientMode": "DESTINATION", "destinationConfig": {"thingName": THING, "services": ["SSH"]}}),
            )
            .await?;
        let token = r["destinationAccessToken"]
            .as_str()
            .ok_or("no token")?
            .to_owned();
        self.connected_with(tunnel, &token).await?;
        Ok((token, start.elapsed()))
    }

    /// The source side in-process, listening on a free port; returns its address and state.
    pub async fn source(
        &self,
        token: &str,
        cancel: CancellationToken,
    ) -> R<(
        std::net::SocketAddr,
        tokio::sync::watch::Receiver<securetunnel_agent::bridge::State>,
    )> {
        let map = ServiceMap::parse_mappings("SSH=0", "127.0.0.1", true).map_err(e)?;
        let listeners = SourceListeners::bind(&map).await.map_err(e)?;
        let addr = listeners.tcp_addr("SSH").ok_or("no source listener")?;
        let bridge = Bridge::new(BridgeConfig {
            role: Role::Source {
                listeners,
                format: Format::V3,
            },
            endpoint: DataEndpoint::parse_override(&self.emu.endpoint())?,
            tls: Some(self.tls.clone()),
            access_token: Secret::new(token),
            client_token: None,
            limits: Limits::default(),
        })
        .map_err(e)?;
        let mut state = bridge.state();
        tokio::spawn(bridge.run(cancel));
        tokio::time::timeout(WAIT, state.wait_for(|s| s.phase == Phase::Ready))
            .await
            .map_err(|_| "the source side did not connect")?
            .map_err(e)?;
        Ok((addr, state))
    }

    /// SIGTERM, then the exit status.
    pub async fn stop_agent(&mut self) -> R<i32> {
        let pid = self.agent.id().ok_or("agent already exited")?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
        let status = tokio::time::timeout(WAIT, self.agent.wait())
            .await
            .map_err(|_| "the agent did not stop")?;
        Ok(status.map_err(e)?.code().unwrap_or(-1))
    }
}

fn step(n: u32, text: &str) {
    println!("[{n}/8] {text}");
}

async fn transfer(addr: std::net::SocketAddr, bytes: usize, seed: u64) -> R<String> {
    let c = TcpStream::connect(addr).await.map_err(e)?;
    let r = echo_transfer(c, bytes, seed).await.map_err(e)?;
    Ok(format!(
        "{} MiB echoed, sha256 {} matches ({:.0} MiB/s each way)",
        bytes >> 20,
        r.sha256,
        r.mib_per_s()
    ))
}

/// Steps 1-3: what runs.
fn announce(s: &mut Stack, dir: &Path) {
    step(
        1,
        &format!(
            "embedded MQTT broker (rumqttd) on {} with mutual TLS",
            s.broker
        ),
    );
    step(
        2,
        &format!(
            "tunneling-service emulator: data plane wss://{}, control plane, notifies published to the broker",
            s.emu.addr()
        ),
    );
    step(
        3,
        &format!(
            "agent (pid {}) running with {}; subscribed to its notify topic (remapped: rumqttd refuses $aws/ topics)",
            s.agent.id().unwrap_or(0),
            dir.join("agent.toml").display()
        ),
    );
}

/// The whole flow, each step printed with what was verified.
pub async fn run(agent_bin: &Path, dir: &Path, bytes: usize) -> R<()> {
    let mut s = Stack::start(agent_bin, dir).await?;
    announce(&mut s, dir);
    let (open, took) = s.open().await?;
    let id = open["tunnelId"].as_str().unwrap_or_default().to_owned();
    s.expect("session started").await?;
    step(
        4,
        &format!(
            "OpenTunnel {id} (SSH -> local echo service): agent connected {:.1} ms after the call",
            ms(took)
        ),
    );
    let cancel = CancellationToken::new();
    let (src, mut src_state) = s
        .source(
            open["sourceAccessToken"].as_str().unwrap_or_default(),
            cancel.clone(),
        )
        .await?;
    step(
        5,
        &format!("source side on {src}: {}", transfer(src, bytes, 1).await?),
    );
    let old = open["destinationAccessToken"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (_, took) = s.rotate(&id).await?;
    s.expect("rotation: starting a bridge with the new token")
        .await?;
    let old_uses = s.emu.handshakes_for_token(&old);
    step(
        6,
        &format!(
            "RotateTunnelAccessToken DESTINATION: agent switched to the new token in {:.1} ms",
            ms(took)
        ),
    );
    // The service resets the source's streams when the destination reconnects; connect after.
    tokio::time::timeout(WAIT, src_state.wait_for(|st| st.resets_received >= 1))
        .await
        .map_err(|_| "the source side never saw the switchover")?
        .map_err(e)?;
    let again = transfer(src, bytes, 2).await?;
    if s.emu.handshakes_for_token(&old) != old_uses {
        return Err("the revoked token was presented again".into());
    }
    step(
        7,
        &format!("{again}; the revoked token was never presented again"),
    );
    s.api("CloseTunnel", json!({"tunnelId": id})).await?;
    let ended = s.expect("session ended").await?;
    cancel.cancel();
    let code = s.stop_agent().await?;
    if code != 0 || !ended.contains("closed by the service") {
        return Err(format!("unexpected end: exit {code}, {ended}"));
    }
    step(
        8,
        "CloseTunnel: the agent's session ended; SIGTERM: the agent exited 0",
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    ms(sorted[i.min(sorted.len() - 1)])
}

/// The latency bench: `runs` times open -> connected and rotate -> switched, on one stack.
pub async fn latency(
    agent_bin: &Path,
    dir: &Path,
    runs: usize,
) -> R<(Vec<Duration>, Vec<Duration>)> {
    let mut s = Stack::start(agent_bin, dir).await?;
    let (mut connect, mut switch) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let (open, took) = s.open().await?;
        connect.push(took);
        let id = open["tunnelId"].as_str().unwrap_or_default().to_owned();
        s.expect("session started").await?;
        let (_, took) = s.rotate(&id).await?;
        switch.push(took);
        s.api("CloseTunnel", json!({"tunnelId": id})).await?;
        s.expect("session ended").await?;
    }
    s.stop_agent().await?;
    connect.sort();
    switch.sort();
    for (name, v) in [
        ("notify -> websocket connected", &connect),
        ("rotation switchover", &switch),
    ] {
        println!(
            "{name:<32} p50 {:>7.2} ms   p95 {:>7.2} ms   (n={}, min {:.2}, max {:.2})",
            percentile(v, 0.5),
            percentile(v, 0.95),
            v.len(),
            ms(v[0]),
            ms(v[v.len() - 1])
        );
    }
    Ok((connect, switch))
}

/// The agent's memory: idle with MQTT subscribed and one tunnel connected, then with
/// `conns` idle TCP connections open through that tunnel. Returns (idle KiB, with-conns KiB).
pub async fn memory(agent_bin: &Path, dir: &Path, conns: usize) -> R<(u64, u64)> {
    let mut s = Stack::start(agent_bin, dir).await?;
    let pid = s.agent.id().ok_or("agent exited")?;
    let (open, _) = s.open().await?;
    s.expect("session started").await?;
    let cancel = CancellationToken::new();
    let (src, _) = s
        .source(
            open["sourceAccessToken"].as_str().unwrap_or_default(),
            cancel.clone(),
        )
        .await?;
    // One round trip so every lazily built piece of the path exists, as in real use.
    transfer(src, 64 << 10, 9).await?;
    // Idle means idle: the static build gives cached message buffers back 2-4 s after the
    // last transfer (the agent's block cache).
    tokio::time::sleep(IDLE_SETTLE).await;
    let idle = settled_rss(pid).await?;
    println!(
        "agent idle: RssAnon {} KiB, RssFile {} KiB (binary and shared libraries)",
        proc_status_kib(pid, "RssAnon:").unwrap_or(0),
        proc_status_kib(pid, "RssFile:").unwrap_or(0)
    );
    // The binary's own pages; under a qemu-user wrapper, the ARM binary's as its guest
    // touches them (SECURETUNNEL_DEMO_AGENT_IMAGE names it).
    let image = match std::env::var_os("SECURETUNNEL_DEMO_AGENT_IMAGE") {
        Some(p) => PathBuf::from(p),
        None => std::fs::read_link(format!("/proc/{pid}/exe")).map_err(e)?,
    };
    println!(
        "agent idle: binary pages resident {} KiB ({})",
        mapped_file_rss_kib(pid, &image)
            .ok_or_else(|| format!("the agent maps no {}", image.display()))?,
        image.display()
    );
    let mut clients = Vec::with_capacity(conns);
    for _ in 0..conns {
        clients.push(TcpStream::connect(src).await.map_err(e)?);
    }
    tokio::time::timeout(WAIT, async {
        while s.echo.accepted() < conns as u64 + 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| {
        format!(
            "only {} of {conns} connections reached the local service",
            s.echo.accepted() - 1
        )
    })?;
    let loaded = settled_rss(pid).await?;
    drop(clients);
    cancel.cancel();
    s.stop_agent().await?;
    Ok((idle, loaded))
}

/// How long the agent is left alone before its idle RSS is read.
const IDLE_SETTLE: Duration = Duration::from_secs(5);

/// RSS once it stops moving (allocator and kernel settle after activity).
async fn settled_rss(pid: u32) -> R<u64> {
    let mut last = proc_status_kib(pid, "VmRSS:").ok_or("no /proc status")?;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = proc_status_kib(pid, "VmRSS:").ok_or("no /proc status")?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}
