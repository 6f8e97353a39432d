//! The README's "Behaviour worth knowing", in-process (destination and source bridges through
//! the emulator): local connect retries, V1/V2 clients waiting their turn, the connection
//! limit, and backpressure from a local service toward a source that does not read.

mod common;

use std::time::Duration;

use common::*;
use securetunnel_agent::bridge::Limits;
use securetunnel_agent::protocol::Format;
use securetunnel_agent::services::ServiceMap;
use securetunnel_emulator::testkit::{echo_tcp, wait_closed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_local_service_is_tried_5_times_by_default() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let map = ServiceMap::default().with("SSH", tcp(dead));
    let limits = Limits {
        connect_attempts: Limits::default().connect_attempts,
        connect_retry_delay: Limits::default().connect_retry_delay,
        connect_retry_max_delay: Limits::default().connect_retry_max_delay,
        ..test_limits()
    };
    let t = tunnel_with(&["SSH"], map, "SSH=0", Format::V3, limits, true).await;
    let started = std::time::Instant::now();
    let mut c = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    c.write_all(b"hello").await.unwrap();
    within("the refused client is closed", wait_closed(&mut c)).await;
    assert_eq!(get(&t.dest.stats.local_connects), 5);
    // The waits between them: 0.2 + 0.4 + 0.8 + 1.6 s.
    assert!(started.elapsed() >= Duration::from_millis(3000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_of_a_v2_source_waits_until_the_first_ends() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "SSH=0", Format::V2).await;
    let mut first = live_client(t.addrs.get("SSH")).await;
    let mut second = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    second.write_all(b"two").await.unwrap();
    // The first still works, and only it is connected at the destination.
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    within("the first client echoes", first.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"one");
    assert_eq!(echo.accepted(), 1, "a V2 stream carried two connections");
    drop(first);
    // Its turn: what it sent while waiting arrives.
    within("the second client echoes", second.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"two");
    assert_eq!(echo.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_above_the_per_tunnel_limit_are_refused() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let limits = Limits {
        max_connections: 2,
        ..test_limits()
    };
    let t = tunnel_with(&["SSH"], map, "SSH=0", Format::V3, limits, true).await;
    let mut a = live_client(t.addrs.get("SSH")).await;
    let mut b = live_client(t.addrs.get("SSH")).await;
    let mut third = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    third.write_all(b"three").await.unwrap();
    within("the third is refused", wait_closed(&mut third)).await;
    assert_eq!(echo.accepted(), 2);
    for c in [&mut a, &mut b] {
        c.write_all(b"ok").await.unwrap();
        let mut buf = [0u8; 2];
        within("the first two still echo", c.read_exact(&mut buf))
            .await
            .unwrap();
    }
    // A slot frees once one ends.
    drop(a);
    within("the closed one is gone", async {
        while get_usize(&t.dest.stats.open_connections) > 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    live_client(t.addrs.get("SSH")).await;
}

fn get_usize(c: &std::sync::atomic::AtomicUsize) -> usize {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_service_cannot_push_faster_than_the_source_reads() {
    // The destination's local service writes 256 MiB as fast as it can; the source's client
    // reads nothing. Reads from the service must wait for the websocket, so the service
    // stays stuck far short of the end; once the client reads, every byte arrives in order.
    const TOTAL: usize = 256 << 20;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (done_tx, mut done) = tokio::sync::watch::channel(false);
    let firehose = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let chunk: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < TOTAL {
            conn.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        let _ = done_tx.send(true);
        conn
    });
    let map = ServiceMap::default().with("FIRE", tcp(addr));
    let t = tunnel(&["FIRE"], map, "FIRE=0", Format::V3).await;
    let mut client = TcpStream::connect(t.addrs.get("FIRE")).await.unwrap();
    client.write_all(b"go").await.unwrap();
    // Unbounded buffering would swallow 256 MiB of loopback traffic in well under 2 s.
    let finished = tokio::time::timeout(Duration::from_secs(2), done.wait_for(|d| *d)).await;
    assert!(
        finished.is_err(),
        "the service pushed everything into a client that reads nothing"
    );
    let mut buf = vec![0u8; 64 << 10];
    let mut got = 0usize;
    within("the client reads everything", async {
        while got < TOTAL {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "the stream ended after {got} bytes");
            for (i, b) in buf[..n].iter().enumerate() {
                assert_eq!(*b, ((got + i) % (64 << 10) % 251) as u8, "byte {}", got + i);
            }
            got += n;
        }
    })
    .await;
    within("the service finished", firehose).await.unwrap();
    // The source's client that read nothing for 2 s was waited for, not reset.
    assert_eq!(get(&t.src.stats.stall_resets), 0);
}
