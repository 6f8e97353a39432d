//! The README's "Behaviour worth knowing", in-process (destination and source bridges through
//! the emulator): local connect retries, V1/V2 clients waiting their turn, the connection
//! limit, and backpressure from a local service toward a source that does not read.

use std::time::Duration;

use crate::common::*;
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

/// A destination bridge of `tokens` serving `SVC` from `addr`, sharing `budget`.
fn sharing_destination(
    emu: &securetunnel_emulator::Emulator,
    tokens: &securetunnel_emulator::TunnelTokens,
    addr: std::net::SocketAddr,
    budget: &securetunnel_agent::bridge::Budget,
    limits: Limits,
) -> Running {
    use securetunnel_agent::bridge::{Bridge, Role};
    let role = Role::Destination {
        services: ServiceMap::default().with("SVC", tcp(addr)).into(),
        scope: securetunnel_agent::services::Scope::WholeMap,
        consent: securetunnel_agent::consent::Gate::always(),
    };
    let cfg = config(emu, &tokens.destination_access_token, role, limits);
    let bridge = Bridge::new(cfg).unwrap().with_budget(budget.clone());
    run_bridge(bridge)
}

/// Fair shares: two tunnels whose local consumers stopped reading hold all of the shared
/// byte budget between them; a third tunnel still moves its data at full speed on its own
/// reserve, and nobody was reset to make room for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tunnels_with_stalled_consumers_do_not_stall_a_third() {
    use securetunnel_agent::bridge::{Budget, Phase};
    use securetunnel_agent::protocol::MAX_PAYLOAD;
    use securetunnel_emulator::testkit::{Behaviour, echo_transfer, service_tcp};

    const TOTAL: usize = 1 << 20;
    let budget = Budget::new(TOTAL);
    let stuck = service_tcp("127.0.0.1:0", Behaviour::Stuck).await.unwrap();
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let emu = emulator(false).await;
    // Long enough that no stalled consumer is reset while the test runs; queues deep
    // enough that the budget, not a queue, is what stops the stalled ones.
    let limits = Limits {
        stall_timeout: Duration::from_secs(60),
        queue_depth: 64,
        ..test_limits()
    };
    let mut tunnels = Vec::new();
    for addr in [stuck.addr, stuck.addr, echo.addr] {
        let tokens = emu.open_tunnel(&["SVC"], Duration::from_secs(3600));
        let mut dest = sharing_destination(&emu, &tokens, addr.unwrap(), &budget, limits);
        let (mut src, addrs) = source(&emu, &tokens, "SVC=0", Format::V3).await;
        dest.wait_phase(Phase::Ready).await;
        src.wait_phase(Phase::Ready).await;
        tunnels.push((dest, src, addrs));
    }
    // Flooding clients: more than a tunnel may hold.
    let mut floods = Vec::new();
    for (_, _, addrs) in &tunnels[..2] {
        for _ in 0..2 {
            let mut c = TcpStream::connect(addrs.get("SVC")).await.unwrap();
            floods.push(tokio::spawn(async move {
                let chunk = vec![7u8; 64 << 10];
                while c.write_all(&chunk).await.is_ok() {}
            }));
        }
    }
    within("the stalled consumers hold the shared budget", async {
        while budget.used() + MAX_PAYLOAD < TOTAL {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    let third = TcpStream::connect(tunnels[2].2.get("SVC")).await.unwrap();
    let report = within(
        "16 MiB through the third tunnel",
        echo_transfer(third, 16 << 20, 11),
    )
    .await
    .expect("the third tunnel's transfer completes byte-exact");
    eprintln!(
        "third tunnel: {:.1} MiB/s beside two stalled ones",
        report.mib_per_s()
    );
    assert!(report.mib_per_s() > 8.0, "{:.1} MiB/s", report.mib_per_s());
    let third_dest = &tunnels[2].0.stats;
    assert!(
        third_dest
            .max_queued_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the third tunnel never queued: the budget was not needed"
    );
    for (dest, _, _) in &tunnels[..2] {
        assert_eq!(get(&dest.stats.stall_resets), 0, "room was made by a reset");
    }
    assert!(
        budget.used() + MAX_PAYLOAD >= TOTAL,
        "the stalled ones let go"
    );
    floods.iter().for_each(|f| f.abort());
}

/// Bounded name lookups: a resolver that never answers gets at most the bound of lookups
/// (blocking threads); each keeps its connection counted against the tunnel's connection
/// limit until it answers, so the tunnel refuses more; the runtime's blocking pool keeps
/// working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_that_never_answers_holds_only_its_bound() {
    use securetunnel_agent::bridge::{Bridge, Phase, Role};
    use securetunnel_agent::lookup::{LookupFn, Lookups};
    use securetunnel_agent::services::LocalEndpoint;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    let (answer, wait) = std::sync::mpsc::channel::<()>();
    let wait = Arc::new(Mutex::new(wait));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let stuck: Arc<LookupFn> = Arc::new(move |_, _| {
        counted.fetch_add(1, Ordering::SeqCst);
        let _ = wait.lock().unwrap().recv();
        Err(std::io::Error::other("no answer"))
    });
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let slow = LocalEndpoint::Tcp {
        host: "slow.example".into(),
        port: 80,
    };
    let map = ServiceMap::default()
        .with("SLOW", slow)
        .with("ECHO", tcp(echo.addr.unwrap()));
    let limits = Limits {
        max_connections: 3,
        connect_attempts: 1,
        connect_timeout: Duration::from_millis(200),
        ..test_limits()
    };
    let emu = emulator(false).await;
    let tokens = emu.open_tunnel(&["SLOW", "ECHO"], Duration::from_secs(3600));
    let role = Role::Destination {
        services: map.into(),
        scope: securetunnel_agent::services::Scope::WholeMap,
        consent: securetunnel_agent::consent::Gate::always(),
    };
    let cfg = config(&emu, &tokens.destination_access_token, role, limits);
    let bridge = Bridge::new(cfg)
        .unwrap()
        .with_lookups(Lookups::with(2, stuck));
    let mut dest = run_bridge(bridge);
    let (mut src, addrs) = source(&emu, &tokens, "SLOW=0,ECHO=0", Format::V3).await;
    dest.wait_phase(Phase::Ready).await;
    src.wait_phase(Phase::Ready).await;

    // Three clients of the host-name service: two lookups start and hang; the third is
    // refused at once; all three are closed.
    for _ in 0..3 {
        let mut c = TcpStream::connect(addrs.get("SLOW")).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        within(
            "a client of the unresolvable service is closed",
            wait_closed(&mut c),
        )
        .await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 2, "lookups beyond the bound");
    // The two hanging lookups still count: one more connection fits, not two.
    let live = live_client(addrs.get("ECHO")).await;
    let mut refused = TcpStream::connect(addrs.get("ECHO")).await.unwrap();
    refused.write_all(b"hello").await.unwrap();
    within(
        "the connection over the limit is closed",
        wait_closed(&mut refused),
    )
    .await;
    assert_eq!(echo.accepted(), 1);
    // The blocking pool is not tied up.
    let pool = tokio::task::spawn_blocking(|| 7);
    assert_eq!(within("a blocking task runs", pool).await.unwrap(), 7);
    drop((live, answer));
}

/// Site consent withdrawn while the tunnel waits on a local service that stopped reading
/// (backpressure, `stall`): the connection is reset within a second, not after the stall
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_reaches_a_tunnel_waiting_on_a_stalled_consumer() {
    use securetunnel_agent::bridge::{Bridge, Phase, Role};
    use securetunnel_agent::consent::Gate;
    use securetunnel_emulator::testkit::{Behaviour, service_tcp};

    let stuck = service_tcp("127.0.0.1:0", Behaviour::Stuck).await.unwrap();
    let emu = emulator(false).await;
    let limits = Limits {
        stall_timeout: Duration::from_secs(60),
        ..test_limits()
    };
    let tokens = emu.open_tunnel(&["SVC"], Duration::from_secs(3600));
    let (granted, consent) = tokio::sync::watch::channel(true);
    let role = Role::Destination {
        services: ServiceMap::default()
            .with("SVC", tcp(stuck.addr.unwrap()))
            .into(),
        scope: securetunnel_agent::services::Scope::WholeMap,
        consent: Gate::new(consent, &[]),
    };
    let cfg = config(&emu, &tokens.destination_access_token, role, limits);
    let mut dest = run_bridge(Bridge::new(cfg).unwrap());
    let (mut src, addrs) = source(&emu, &tokens, "SVC=0", Format::V3).await;
    dest.wait_phase(Phase::Ready).await;
    src.wait_phase(Phase::Ready).await;
    let c = TcpStream::connect(addrs.get("SVC")).await.unwrap();
    let (mut rx, mut tx) = c.into_split();
    let flood = tokio::spawn(async move {
        let chunk = vec![7u8; 64 << 10];
        while tx.write_all(&chunk).await.is_ok() {}
    });
    within("the destination waits on the stuck consumer", async {
        while get(&dest.stats.stalls) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    granted.send_replace(false);
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(1), async {
        while matches!(rx.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    assert!(closed.is_ok(), "the revoke waited on the consumer");
    assert_eq!(
        get(&dest.stats.stall_resets),
        0,
        "reset as a stall, not a revoke"
    );
    flood.abort();
}
