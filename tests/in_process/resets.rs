//! Resets, refusals and closes: every local socket ends as the protocol says, and the
//! tunnel keeps working afterwards.

use std::time::Duration;

use crate::common::*;
use securetunnel_agent::bridge::{BridgeEnd, Limits, Phase};
use securetunnel_agent::protocol::{Format, Message, Mode};
use securetunnel_agent::services::{LocalEndpoint, ServiceMap};
use securetunnel_emulator::testkit::{
    Behaviour, echo_tcp, echo_transfer, echo_unix, service_tcp, wait_closed,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_local_service_gives_stream_reset_and_the_next_connection_works() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let map = ServiceMap::default().with("APP", LocalEndpoint::Unix(sock.clone()));
    let t = tunnel(&["APP"], map, "APP=0", Format::V3).await;

    let mut refused = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    refused.write_all(b"hello").await.unwrap();
    within(
        "source closes the refused client",
        wait_closed(&mut refused),
    )
    .await;
    assert_eq!(get(&t.src.stats.stream_resets_received), 1);
    assert_eq!(get(&t.dest.stats.local_connects), 2, "bounded retries");

    let echo = echo_unix(&sock).unwrap();
    let client = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    within("next connection", echo_transfer(client, 64 << 10, 1))
        .await
        .unwrap();
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_start_gives_connection_reset_and_the_next_connection_works() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let map = ServiceMap::default().with("APP", LocalEndpoint::Unix(sock.clone()));
    let t = tunnel(&["APP"], map, "APP=0", Format::V3).await;
    let echo = echo_unix(&sock).unwrap();
    let mut first = live_client(t.addrs.get("APP")).await;

    // The service stops listening: the second connection of the stream cannot be opened.
    drop(echo);
    std::fs::remove_file(&sock).unwrap();
    let mut second = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    second.write_all(b"x").await.unwrap();
    within("source closes the second client", wait_closed(&mut second)).await;
    assert_eq!(get(&t.src.stats.connection_resets_received), 1);
    assert_eq!(
        get(&t.src.stats.stream_resets_received),
        0,
        "the stream stays up"
    );

    // The first connection is untouched; a third one works once the service is back.
    first.write_all(b"more").await.unwrap();
    let mut buf = [0u8; 4];
    within("first still echoes", first.read_exact(&mut buf))
        .await
        .unwrap();
    let echo = echo_unix(&sock).unwrap();
    let third = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    within("third connection", echo_transfer(third, 64 << 10, 2))
        .await
        .unwrap();
    assert_eq!(echo.accepted(), 1);
}

/// Two services: SSH with two live connections (one moving data), HTTP with one. `reset`
/// lands mid-transfer; `ends_http` says whether it must end HTTP's connection too.
async fn reset_mid_transfer_closes_local_sockets(reset: Message, ends_http: bool) {
    let mut ssh_echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let mut http_echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default()
        .with("SSH", tcp(ssh_echo.addr.unwrap()))
        .with("HTTP", tcp(http_echo.addr.unwrap()));
    let t = tunnel(&["SSH", "HTTP"], map, "SSH=0,HTTP=0", Format::V3).await;
    let a = live_client(t.addrs.get("SSH")).await;
    let b = live_client(t.addrs.get("SSH")).await;
    let mut http = live_client(t.addrs.get("HTTP")).await;
    let stream = t.emu.active_stream(&t.tokens.tunnel_id, "SSH").unwrap();
    let reset = if reset.kind() == Some(securetunnel_agent::protocol::MessageType::StreamReset) {
        Message::stream_reset(stream, "SSH")
    } else {
        reset
    };
    // Keep bytes flowing on `a` while the reset lands.
    let (mut ar, mut aw) = a.into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![1u8; 16 << 10];
        while aw.write_all(&chunk).await.is_ok() {}
    });
    let mut first = [0u8; 1];
    ar.read_exact(&mut first).await.unwrap();
    assert_eq!(first, [1], "the echo is what was sent");
    for mode in [Mode::Destination, Mode::Source] {
        assert!(t.emu.inject(&t.tokens.tunnel_id, mode, &reset).await);
    }
    within(
        "destination closes SSH's local sockets",
        ssh_echo.wait_closed(2),
    )
    .await;
    within("source closes client a", wait_closed(&mut ar)).await;
    let (mut br, _bw) = b.into_split();
    within("source closes client b", wait_closed(&mut br)).await;
    within("writer stops", writer).await.unwrap();
    if ends_http {
        within("destination closes HTTP's socket", http_echo.wait_closed(1)).await;
        within("source closes the HTTP client", wait_closed(&mut http)).await;
    } else {
        // Another service's stream is untouched.
        http.write_all(b"still").await.unwrap();
        let mut buf = [0u8; 5];
        within("HTTP still echoes", http.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"still");
        assert_eq!(http_echo.closed(), 0);
    }

    let next = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("next connection", echo_transfer(next, 256 << 10, 9))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_reset_mid_transfer_closes_every_connection_of_that_stream_only() {
    reset_mid_transfer_closes_local_sockets(Message::stream_reset(0, "SSH"), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_reset_mid_transfer_closes_every_connection() {
    reset_mid_transfer_closes_local_sockets(Message::session_reset(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_ends_the_destination_with_every_local_socket_closed() {
    let mut echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH"], map, "SSH=0", Format::V3).await;
    let _clients = [
        live_client(t.addrs.get("SSH")).await,
        live_client(t.addrs.get("SSH")).await,
        live_client(t.addrs.get("SSH")).await,
    ];
    t.emu.close_tunnel(&t.tokens.tunnel_id);
    let end = within("the destination ends", t.dest.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(end, BridgeEnd::ClosedByService { code: 1000, .. }),
        "{end:?}"
    );
    // The bridge returns once its connections are done: every local socket is closed.
    within("every local socket closes", echo.wait_closed(3)).await;
    assert_eq!(echo.closed(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmapped_service_is_refused_with_no_connect_attempt() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let t = tunnel(&["SSH", "FTP"], map, "SSH=0,FTP=0", Format::V3).await;
    let mut ftp = TcpStream::connect(t.addrs.get("FTP")).await.unwrap();
    ftp.write_all(b"USER x\r\n").await.unwrap();
    within("source closes the refused client", wait_closed(&mut ftp)).await;
    assert_eq!(get(&t.dest.stats.refused_streams), 1);
    assert_eq!(get(&t.dest.stats.local_connects), 0, "no connect attempt");
    assert_eq!(get(&t.src.stats.stream_resets_received), 1);

    let ssh = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("mapped service works", echo_transfer(ssh, 64 << 10, 4))
        .await
        .unwrap();
    assert_eq!(get(&t.dest.stats.local_connects), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_consumer_is_reset_by_policy_while_another_connection_moves_32_mib() {
    let mut stuck = service_tcp("127.0.0.1:0", Behaviour::Stuck).await.unwrap();
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default()
        .with("STUCK", tcp(stuck.addr.unwrap()))
        .with("FAST", tcp(echo.addr.unwrap()));
    // Long enough that the fast connection, which keeps writing, is never taken for stalled.
    let limits = Limits {
        stall_timeout: Duration::from_secs(1),
        ..test_limits()
    };
    let t = tunnel_with(
        &["STUCK", "FAST"],
        map,
        "STUCK=0,FAST=0",
        Format::V3,
        limits,
        true,
    )
    .await;

    let s = TcpStream::connect(t.addrs.get("STUCK")).await.unwrap();
    let (mut sr, mut sw) = s.into_split();
    let flood = tokio::spawn(async move {
        let chunk = vec![7u8; 64 << 10];
        let mut sent = 0usize;
        while sw.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
        }
        sent
    });
    let fast = TcpStream::connect(t.addrs.get("FAST")).await.unwrap();
    within(
        "32 MiB beside a stuck consumer",
        echo_transfer(fast, 32 << 20, 5),
    )
    .await
    .expect("the fast connection completes byte-exact");

    within("stuck client closed by the source", wait_closed(&mut sr)).await;
    within("stuck local socket reset", stuck.wait_closed(1)).await;
    let flooded = within("flood ends", flood).await.unwrap();
    let bound = limits.connection_buffer_bound();
    let peak = t
        .dest
        .stats
        .max_queued_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("stuck client sent {flooded} bytes; peak queue {peak} of {bound}");
    assert!(peak <= bound, "queue peaked at {peak} > bound {bound}");
    // The stuck connection really filled its queue: the bound was reached, not avoided.
    assert!(
        peak >= limits.queue_depth * 60_000,
        "queue peaked at {peak}: never filled"
    );
    assert!(flooded > peak, "the stuck client sent only {flooded} bytes");
    assert_eq!(
        get(&t.dest.stats.stall_resets),
        1,
        "the fast connection was reset too"
    );
    assert_eq!(get(&t.src.stats.connection_resets_received), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnected_destination_resets_the_sources_stale_streams_itself() {
    // The emulator does not reset the source's streams when the destination reconnects:
    // the destination's own rule (DATA for a stream it does not have is answered with
    // STREAM_RESET) must end the source's stale client.
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let mut t = tunnel(&["SSH"], map, "SSH=0", Format::V3).await;
    t.emu.set_reset_streams_on_reconnect(false);
    let mut old = live_client(t.addrs.get("SSH")).await;
    t.emu.drop_peer(&t.tokens.tunnel_id, Mode::Destination);
    t.dest.wait_sessions(2).await;
    // The source still believes in its stream and sends on it.
    old.write_all(b"anyone?").await.unwrap();
    within("old client closed", wait_closed(&mut old)).await;
    assert!(get(&t.dest.stats.resets_sent) >= 1);
    let next = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("after reconnect", echo_transfer(next, 256 << 10, 6))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stall_timer_starts_once_the_connection_is_up() {
    // The local service appears 1 s after the stream starts; the stall timeout is 300 ms.
    // Data queued while the agent is still connecting is not a stalled consumer.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late.sock");
    let map = ServiceMap::default().with("APP", LocalEndpoint::Unix(sock.clone()));
    let limits = Limits {
        stall_timeout: Duration::from_millis(300),
        connect_attempts: 8,
        connect_retry_delay: Duration::from_millis(200),
        connect_retry_max_delay: Duration::from_millis(400),
        ..test_limits()
    };
    let t = tunnel_with(&["APP"], map, "APP=0", Format::V3, limits, false).await;
    let client = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    let transfer = tokio::spawn(echo_transfer(client, 2 << 20, 1));
    // The slow service is the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _echo = echo_unix(&sock).unwrap();
    within("transfer to the late service", transfer)
        .await
        .unwrap()
        .expect("reset while connecting");
    assert_eq!(get(&t.dest.stats.stall_resets), 0);
    assert!(
        get(&t.dest.stats.local_connects) >= 2,
        "the service was there at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_close_delivers_what_is_queued_for_local_sockets() {
    // A consumer that reads only once the tunnel is closed must still get every byte the
    // destination had received.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("late-reader.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (go, wait) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let _ = wait.await;
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got).await;
        got.len()
    });
    let map = ServiceMap::default().with("APP", LocalEndpoint::Unix(sock));
    // Room to queue it all: the reader of the websocket never waits, so the close frame is
    // seen right after the data.
    let limits = Limits {
        queue_depth: 64,
        close_linger: Duration::from_secs(3),
        ..test_limits()
    };
    let t = tunnel_with(&["APP"], map, "APP=0", Format::V3, limits, false).await;
    let mut client = TcpStream::connect(t.addrs.get("APP")).await.unwrap();
    const SENT: usize = 1 << 20;
    client.write_all(&vec![9u8; SENT]).await.unwrap();
    // The destination itself has taken every byte (the emulator counts what it forwards,
    // which may still be in flight).
    let dest_stats = t.dest.stats.clone();
    within("the data reaches the destination", async {
        while get(&dest_stats.bytes_from_tunnel) < SENT as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    t.emu.close_tunnel(&t.tokens.tunnel_id);
    // The consumer starts reading only once the destination handled the close, within the
    // 3 s it gives queued data.
    let mut dest = t.dest;
    dest.wait_phase(Phase::Draining).await;
    let _ = go.send(());
    let got = within("the local reader sees the end", reader)
        .await
        .unwrap();
    assert_eq!(got, SENT, "queued bytes were dropped at the close");
}
