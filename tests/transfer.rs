//! Byte-exact transfers through the emulator: this project's source and destination.

mod common;

use common::*;
use securetunnel_agent::emulator::testkit::{echo_tcp, echo_transfer, echo_unix};
use securetunnel_agent::protocol::Format;
use securetunnel_agent::services::{LocalEndpoint, ServiceMap};
use tokio::net::TcpStream;

fn tcp(addr: std::net::SocketAddr) -> LocalEndpoint {
    LocalEndpoint::Tcp {
        host: addr.ip().to_string(),
        port: addr.port(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_64_mib_transfer_over_wss_with_reframing_is_byte_exact() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "SSH=0", Format::V3).await;
    t.emu.set_reframe(true);
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    let report = within("64 MiB echo", echo_transfer(client, 64 << 20, 1))
        .await
        .unwrap();
    eprintln!("64 MiB echo: {:.1} MiB/s each way", report.mib_per_s());
    assert_eq!(report.bytes, 64 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_simultaneous_connections_of_1_mib_are_byte_exact() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "SSH=0", Format::V3).await;
    t.emu.set_reframe(true);
    let addr = t.addrs.get("SSH");
    let mut all = tokio::task::JoinSet::new();
    for seed in 0..64u64 {
        all.spawn(async move {
            let client = TcpStream::connect(addr).await?;
            echo_transfer(client, 1 << 20, seed).await
        });
    }
    let mut done = 0;
    while let Some(r) = within("64 transfers", all.join_next()).await {
        r.unwrap().unwrap();
        done += 1;
    }
    assert_eq!(done, 64);
    assert_eq!(echo.accepted(), 64);
    assert_eq!(get(&t.dest.stats.connections_opened), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_in_one_tunnel_tcp_v4_tcp_v6_and_unix_socket() {
    let v4 = echo_tcp("127.0.0.1:0").await.unwrap();
    let v6 = echo_tcp("[::1]:0").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let unix = echo_unix(&sock).unwrap();
    let map = ServiceMap::default()
        .with("SSH", tcp(v4.addr.unwrap()))
        .with("DBG", tcp(v6.addr.unwrap()))
        .with("APP", LocalEndpoint::Unix(sock.clone()));
    let t = tunnel(&["SSH", "DBG", "APP"], map, "SSH=0,DBG=0,APP=0", Format::V3).await;
    for (i, service) in ["SSH", "DBG", "APP"].into_iter().enumerate() {
        let client = TcpStream::connect(t.addrs.get(service)).await.unwrap();
        within(service, echo_transfer(client, 256 << 10, i as u64))
            .await
            .unwrap();
    }
    assert_eq!((v4.accepted(), v6.accepted(), unix.accepted()), (1, 1, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v2_format_source_completes_a_transfer() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "SSH=0", Format::V2).await;
    for seed in 0..2 {
        // Sequential connections: V2 carries one at a time per service.
        let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
        within("V2 echo", echo_transfer(client, 1 << 20, seed))
            .await
            .unwrap();
    }
    assert_eq!(echo.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v1_format_source_completes_a_transfer_with_an_unnamed_mapping() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::unnamed(tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "0", Format::V1).await;
    let client = TcpStream::connect(t.addrs.get("")).await.unwrap();
    within("V1 echo", echo_transfer(client, 1 << 20, 7))
        .await
        .unwrap();
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_ws_endpoint_works_on_loopback() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel_with(&["SSH"], map, "SSH=0", Format::V3, test_limits(), false).await;
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("ws echo", echo_transfer(client, 1 << 20, 3))
        .await
        .unwrap();
}
