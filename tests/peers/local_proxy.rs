//! `securetunnel-agent local-proxy` as a process, against the emulator over TLS: the
//! localproxy options the README lists (`-c DIR`, `-k`, `-b`), exit 0 on SIGINT/SIGTERM, and
//! HTTPS_PROXY/NO_PROXY through a real proxy (tinyproxy).

use crate::common::http_proxy::Tinyproxy;
use crate::common::*;
use securetunnel_agent::protocol::{Format, Mode};
use securetunnel_emulator::testkit::{LogTail, echo_tcp, echo_transfer};
use securetunnel_emulator::{Emulator, EmulatorConfig, EmulatorTls, TunnelTokens};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

struct Proxy {
    child: Child,
    log: LogTail,
}

impl Proxy {
    fn spawn(emu: &Emulator, token: &str, args: &[&str]) -> Proxy {
        Proxy::spawn_env(emu, token, args, &[])
    }

    /// With `env` set, and no HTTP proxy variables but those given.
    fn spawn_env(emu: &Emulator, token: &str, args: &[&str], env: &[(&str, &str)]) -> Proxy {
        let (child, log) = spawn_logged(
            Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
                .arg("local-proxy")
                .args(["-e", &emu.endpoint(), "-v", "5"])
                .args(args)
                .env_remove("https_proxy")
                .env_remove("HTTPS_PROXY")
                .env_remove("no_proxy")
                .env_remove("NO_PROXY")
                .envs(env.iter().copied())
                .env("AWSIOT_TUNNEL_ACCESS_TOKEN", token),
            "local-proxy",
        );
        Proxy { child, log }
    }

    async fn line(&self, text: &str) -> String {
        match within("a log line", self.log.wait(0, |l| l.contains(text))).await {
            Some((_, l)) => l,
            None => panic!("no line {text:?}:\n{}", self.log.text()),
        }
    }

    async fn exit_on(mut self, sig: i32) -> Option<i32> {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        within("local-proxy exits", self.child.wait())
            .await
            .unwrap()
            .code()
    }
}

/// An emulator over TLS with a tunnel, and its CA in a directory of its own (`-c DIR`).
async fn tls_tunnel() -> (Emulator, TunnelTokens, tempfile::TempDir) {
    let emu = Emulator::start(EmulatorConfig::loopback(EmulatorTls::Generate))
        .await
        .unwrap();
    let t = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(3600));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("emulator-ca.pem"), emu.ca_pem().unwrap()).unwrap();
    (emu, t, dir)
}

async fn destination_serves(sig: i32) {
    let (emu, t, ca_dir) = tls_tunnel().await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = format!("SSH={}", echo.addr.unwrap());
    let proxy = Proxy::spawn(
        &emu,
        &t.destination_access_token,
        &["-c", ca_dir.path().to_str().unwrap(), "-d", &map],
    );
    proxy.line("websocket connected").await;
    let (_src, addrs) = securetunnel_emulator_source(&emu, &t).await;
    let c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    within("transfer through local-proxy", echo_transfer(c, 1 << 20, 1))
        .await
        .unwrap();
    assert_eq!(proxy.exit_on(sig).await, Some(0));
}

async fn securetunnel_emulator_source(
    emu: &Emulator,
    t: &TunnelTokens,
) -> (Running, SourceListenersAddrs) {
    let (mut src, addrs) = source(emu, t, "SSH=0", Format::V3).await;
    src.wait_phase(securetunnel_agent::bridge::Phase::Ready)
        .await;
    (src, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_directory_verifies_the_service_and_sigterm_exits_0() {
    destination_serves(libc::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_0() {
    destination_serves(libc::SIGINT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ssl_host_verify_connects_without_the_ca_and_warns() {
    let (emu, t, _ca_dir) = tls_tunnel().await;
    // Without the CA the certificate is refused...
    let refused = Proxy::spawn(&emu, &t.destination_access_token, &["-d", "SSH=22"]);
    let line = refused.line("TLS handshake").await;
    assert!(line.contains("certificate"), "{line}");
    drop(refused);
    // ...with -k it is not checked, loudly.
    let proxy = Proxy::spawn(&emu, &t.destination_access_token, &["-k", "-d", "SSH=22"]);
    proxy.line("websocket connected").await;
    assert!(
        proxy
            .log
            .count(|l| l.contains("WARN") && l.contains("verif"))
            >= 1,
        "{}",
        proxy.log.text()
    );
    assert!(emu.is_connected(&t.tunnel_id, Mode::Destination));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_address_sets_the_source_listen_address_and_the_destination_host() {
    let (emu, t, ca_dir) = tls_tunnel().await;
    let ca = ca_dir.path().to_str().unwrap();
    // Destination: a port-only mapping connects to the -b host.
    let echo = echo_tcp("127.0.0.3:0").await.unwrap();
    let port = echo.addr.unwrap().port().to_string();
    let dest = Proxy::spawn(
        &emu,
        &t.destination_access_token,
        &["-c", ca, "-b", "127.0.0.3", "-d", &format!("SSH={port}")],
    );
    dest.line("websocket connected").await;
    // Source: listens on the -b address.
    let src = Proxy::spawn(
        &emu,
        &t.source_access_token,
        &["-c", ca, "-b", "127.0.0.2", "-s", "SSH=0"],
    );
    let line = src.line("listening on").await;
    let addr: std::net::SocketAddr = line
        .split("listening on ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(addr.ip().to_string(), "127.0.0.2", "{line}");
    src.line("tunnel services").await;
    let c = TcpStream::connect(addr).await.unwrap();
    within(
        "transfer between two local-proxy processes",
        echo_transfer(c, 1 << 20, 2),
    )
    .await
    .unwrap();
    assert_eq!(echo.accepted(), 1);
}

/// A destination local-proxy with `env`, serving SSH from an echo service; the source runs
/// in-process.
async fn destination_with_env(
    env: &[(&str, &str)],
) -> (
    Emulator,
    TunnelTokens,
    Proxy,
    securetunnel_emulator::testkit::EchoService,
    tempfile::TempDir,
) {
    let (emu, t, ca_dir) = tls_tunnel().await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = format!("SSH={}", echo.addr.unwrap());
    let proxy = Proxy::spawn_env(
        &emu,
        &t.destination_access_token,
        &["-c", ca_dir.path().to_str().unwrap(), "-d", &map],
        env,
    );
    (emu, t, proxy, echo, ca_dir)
}

async fn transfer_through(emu: &Emulator, t: &TunnelTokens) {
    let (_src, addrs) = securetunnel_emulator_source(emu, t).await;
    let c = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    within("transfer through local-proxy", echo_transfer(c, 1 << 20, 1))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_with_basic_auth_carries_the_tunnel_and_the_password_is_never_logged() {
    let tp = Tinyproxy::start("BasicAuth op s3cret-pw").await;
    let url = tp.url("op:s3cret-pw@");
    // The lowercase variable wins, as in localproxy: the uppercase one points nowhere.
    let dead = format!("http://127.0.0.1:{}", testkit_free_port());
    let (emu, t, proxy, _echo, _ca) =
        destination_with_env(&[("https_proxy", &url), ("HTTPS_PROXY", &dead)]).await;
    proxy.line("websocket connected").await;
    tp.saw_connect(&emu.addr().to_string()).await;
    transfer_through(&emu, &t).await;
    let log = proxy.log.text();
    assert!(log.contains("http://op@127.0.0.1"), "{log}");
    assert!(!log.contains("s3cret-pw"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_wants_credentials_is_named_with_the_fix() {
    let tp = Tinyproxy::start("BasicAuth op s3cret-pw").await;
    let url = tp.url("");
    let (emu, t, proxy, _echo, _ca) = destination_with_env(&[("HTTPS_PROXY", &url)]).await;
    // Not just "407": timestamps contain digits.
    let line = proxy.line("407 Proxy Authentication Required").await;
    assert!(
        line.contains(&format!("proxy {url} refused CONNECT {}", emu.addr()))
            && line.contains("http://user:password@host:port"),
        "{line}"
    );
    // With the wrong password, the refusal says so.
    let bad = tp.url("op:wrong@");
    let proxy2 = Proxy::spawn_env(
        &emu,
        &t.destination_access_token,
        &["-d", "SSH=22"],
        &[("HTTPS_PROXY", &bad)],
    );
    let line = proxy2.line("refused CONNECT").await;
    assert!(line.contains("refused the credentials"), "{line}");
    assert!(
        !proxy2.log.text().contains("wrong"),
        "{}",
        proxy2.log.text()
    );
    assert!(!emu.is_connected(&t.tunnel_id, Mode::Destination));
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_the_proxy_forbids_is_named_with_its_status() {
    // Only port 443 may be tunnelled; the emulator listens elsewhere.
    let tp = Tinyproxy::start("ConnectPort 443").await;
    let (emu, t, proxy, _echo, _ca) = destination_with_env(&[("HTTPS_PROXY", &tp.url(""))]).await;
    let line = proxy.line("refused CONNECT").await;
    assert!(
        line.contains(&format!("refused CONNECT {}: 403 ", emu.addr()))
            && line.contains("443 must be allowed"),
        "{line}"
    );
    assert!(!emu.is_connected(&t.tunnel_id, Mode::Destination));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_naming_the_endpoint_goes_direct() {
    // The proxy is a closed port: only a direct connection can work.
    let dead = format!("http://127.0.0.1:{}", testkit_free_port());
    let (emu, t, proxy, _echo, _ca) =
        destination_with_env(&[("HTTPS_PROXY", &dead), ("NO_PROXY", "localhost,127.0.0.1")]).await;
    proxy.line("websocket connected").await;
    transfer_through(&emu, &t).await;
    assert!(proxy.log.text().contains("no_proxy names the data plane"));

    // Without NO_PROXY the same dead proxy is what fails, by name.
    let t2 = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(3600));
    let p2 = Proxy::spawn_env(
        &emu,
        &t2.destination_access_token,
        &["-d", "SSH=22"],
        &[("HTTPS_PROXY", &dead)],
    );
    let line = p2.line("cannot talk to proxy").await;
    assert!(line.contains(&dead), "{line}");
}

fn testkit_free_port() -> u16 {
    securetunnel_emulator::testkit::free_port().unwrap()
}
