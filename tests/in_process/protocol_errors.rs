//! Protocol violations, handshake failures, reconnect backoff and keepalive: errors are
//! handled, never panics.

use std::time::{Duration, Instant};

use crate::common::*;
use securetunnel_agent::bridge::{BridgeError, HandshakeError, Limits, Phase};
use securetunnel_agent::protocol::{Format, Message, Mode};
use securetunnel_agent::secret::Secret;
use securetunnel_agent::services::ServiceMap;
use securetunnel_emulator::testkit::{echo_tcp, echo_transfer, wait_closed};
use securetunnel_emulator::{CLIENT_TOKEN_MISMATCH, PeerEventKind};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn echo_tunnel() -> (Tunnel, securetunnel_emulator::testkit::EchoService) {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    (tunnel(&["SSH"], map, "SSH=0", Format::V3).await, echo)
}

async fn violation_ends_the_session_and_the_destination_reconnects(bad: WsMessage) {
    let (mut t, _echo) = echo_tunnel().await;
    assert!(
        t.emu
            .inject_ws(&t.tokens.tunnel_id, Mode::Destination, bad)
            .await
    );
    t.dest.wait_sessions(2).await;
    assert_eq!(get(&t.dest.stats.protocol_errors), 1);
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within(
        "transfer after reconnect",
        echo_transfer(client, 256 << 10, 1),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_frame_is_a_protocol_error_not_a_panic() {
    violation_ends_the_session_and_the_destination_reconnects(WsMessage::text("hello")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_is_dropped_and_the_session_goes_on() {
    let (t, _echo) = echo_tunnel().await;
    // A frame whose body is not a Message: its length prefix still delimits the next one.
    let garbage = vec![0u8, 3, 0xff, 0xff, 0xff];
    assert!(
        t.emu
            .inject_ws(
                &t.tokens.tunnel_id,
                Mode::Destination,
                WsMessage::binary(garbage)
            )
            .await
    );
    // Traffic after it shares its ordered path: by the time it flows, the frame was handled.
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within(
        "transfer after the bad frame",
        echo_transfer(client, 64 << 10, 1),
    )
    .await
    .unwrap();
    assert_eq!(get(&t.dest.stats.protocol_errors), 1);
    assert_eq!(get(&t.dest.stats.sessions), 1, "the session was dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_type_resets_its_stream_unless_ignorable() {
    let (mut t, _echo) = echo_tunnel().await;
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("first transfer", echo_transfer(client, 64 << 10, 2))
        .await
        .unwrap();
    let stream = t.emu.active_stream(&t.tokens.tunnel_id, "SSH").unwrap();
    let mut unknown = Message::stream_reset(stream, "SSH");
    unknown.r#type = 42;
    unknown.ignorable = true;
    assert!(
        t.emu
            .inject(&t.tokens.tunnel_id, Mode::Destination, &unknown)
            .await
    );
    // Traffic after the ignorable message shares its ordered path: it was skipped.
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within("transfer", echo_transfer(client, 64 << 10, 3))
        .await
        .unwrap();
    assert_eq!(get(&t.dest.stats.protocol_errors), 0);

    // Not ignorable: the destination resets that stream (the source hears STREAM_RESET);
    // the tunnel and its session go on.
    let resets = get(&t.src.stats.stream_resets_received);
    unknown.ignorable = false;
    assert!(
        t.emu
            .inject(&t.tokens.tunnel_id, Mode::Destination, &unknown)
            .await
    );
    t.src.wait_resets(resets + 1).await;
    assert_eq!(get(&t.dest.stats.protocol_errors), 1);
    assert_eq!(
        get(&t.dest.stats.sessions),
        1,
        "the whole session was dropped"
    );
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within(
        "transfer on a new stream",
        echo_transfer(client, 64 << 10, 4),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_5xx_is_retried_with_a_growing_backoff() {
    let emu = emulator(true).await;
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    emu.fail_next_handshakes(5, 503);
    // Base 20 ms, cap 200 ms: the n-th retry waits between half and all of min(cap, base x 2^n).
    let limits = test_limits();
    let mut dest = destination_with(&emu, &tokens, ServiceMap::default(), limits);
    dest.wait_phase(Phase::Ready).await;
    assert_eq!(get(&dest.stats.handshake_failures), 5);
    assert_eq!(get(&dest.stats.sessions), 1);
    let times = emu.handshake_times(&tokens.destination_access_token);
    assert_eq!(times.len(), 6);
    for (n, pair) in times.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let ceiling =
            (limits.reconnect_min_delay * 2u32.pow(n as u32 + 1)).min(limits.reconnect_max_delay);
        assert!(
            gap >= ceiling / 2,
            "retry {} came after {gap:?}, before half of {ceiling:?}",
            n + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_accepts_and_drops_gets_at_most_8_handshakes_in_the_first_window() {
    // The agent's policy scaled by 1/10 (0.5 s -> 50 ms, 30 s -> 3 s): at most 8 handshakes
    // in the first 6 s, as 8 in the first 60 s at full scale.
    let emu = emulator(false).await;
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    emu.set_drop_after_upgrade(Some(Duration::from_millis(20)));
    let limits = Limits {
        reconnect_min_delay: Duration::from_millis(50),
        reconnect_max_delay: Duration::from_secs(3),
        ..test_limits()
    };
    let dest = destination_with(&emu, &tokens, ServiceMap::default(), limits);
    let id = tokens.tunnel_id.clone();
    let mut changes = emu.changes();
    within("nine handshakes", async {
        while emu.handshakes_for_token(&tokens.destination_access_token) < 9 {
            changes.changed().await.unwrap();
        }
    })
    .await;
    let at: Vec<Instant> = emu
        .peer_events(&id)
        .into_iter()
        .filter(|e| e.kind == PeerEventKind::Connected)
        .map(|e| e.at)
        .collect();
    let window = at[8] - at[0];
    assert!(
        window >= Duration::from_secs(6),
        "9 handshakes within {window:?}"
    );
    dest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_4xx_ends_the_bridge_without_retry() {
    let emu = emulator(true).await;
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    emu.fail_next_handshakes(1, 403);
    let dest = destination(&emu, &tokens, ServiceMap::default());
    let end = within("bridge gives up", dest.task).await.unwrap();
    assert!(
        matches!(
            end,
            Err(BridgeError::Rejected(HandshakeError::Rejected {
                status: 403,
                ..
            }))
        ),
        "{end:?}"
    );
    assert_eq!(
        emu.handshakes_for_token(&tokens.destination_access_token),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_destination_with_another_client_token_is_refused_and_the_first_keeps_running() {
    let emu = emulator(true).await;
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    let mut first = destination(&emu, &tokens, ServiceMap::default());
    first.wait_phase(Phase::Ready).await;
    let mut cfg = config(
        &emu,
        &tokens.destination_access_token,
        securetunnel_agent::bridge::Role::Destination {
            services: ServiceMap::default().into(),
            scope: securetunnel_agent::services::Scope::WholeMap,
            consent: securetunnel_agent::consent::Gate::always(),
        },
        test_limits(),
    );
    cfg.client_token = Some(Secret::new(uuid::Uuid::new_v4().to_string()));
    let second = spawn_bridge(cfg);
    match within("second bridge refused", second.task).await.unwrap() {
        Err(BridgeError::Rejected(HandshakeError::Rejected {
            status: 400, body, ..
        })) => {
            assert_eq!(body, CLIENT_TOKEN_MISMATCH)
        }
        other => panic!("expected a 400 rejection, got {other:?}"),
    }
    assert!(emu.is_connected(&tokens.tunnel_id, Mode::Destination));
    assert_eq!(first.state.borrow().sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_pings_do_not_end_the_session() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let limits = Limits {
        ping_interval: Duration::from_millis(20),
        ..test_limits()
    };
    let t = tunnel_with(&["SSH"], map, "SSH=0", Format::V3, limits, true).await;
    t.emu.set_answer_pings(false);
    let pongs_before = get(&t.dest.stats.pongs_received);
    let pings_before = get(&t.dest.stats.pings_sent);
    // Traffic is the clock: keep moving data until several pings went unanswered.
    let mut seed = 0;
    while get(&t.dest.stats.pings_sent) < pings_before + 5 {
        let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
        within("transfer", echo_transfer(client, 1 << 20, seed))
            .await
            .unwrap();
        seed += 1;
    }
    // A pong already on its way when the switch flipped may still arrive; no more.
    assert!(
        get(&t.dest.stats.pongs_received) <= pongs_before + 1,
        "pongs were not dropped"
    );
    assert_eq!(get(&t.dest.stats.sessions), 1);
    assert_eq!(t.dest.state.borrow().phase, Phase::Ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tunnel_whose_service_never_answers_pings_is_not_dropped() {
    // The idle timeout needs a service that answers pings (docs/protocol.md §1.5): without a single
    // pong on this websocket, a quiet link is not taken for dead.
    let emu = emulator(false).await;
    emu.set_answer_pings(false);
    let tokens = emu.open_tunnel(&["SSH"], Duration::from_secs(600));
    let limits = test_limits().with_idle_timeout(Duration::from_millis(300));
    let mut dest = destination_with(&emu, &tokens, ServiceMap::default(), limits);
    dest.wait_phase(Phase::Ready).await;
    // Pings are the clock: ten of them (100 ms apart) span three idle timeouts.
    let mut changes = emu.changes();
    within("ten unanswered pings", async {
        while emu.pings_received(&tokens.tunnel_id, Mode::Destination) < 10 {
            changes.changed().await.unwrap();
        }
    })
    .await;
    assert_eq!(get(&dest.stats.pongs_received), 0);
    assert_eq!(get(&dest.stats.sessions), 1, "dropped for silence");
    dest.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_echo_the_subprotocol_is_refused_and_retried() {
    use securetunnel_agent::bridge::{BridgeConfig, DataEndpoint, Role};
    init_logs();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = spawn_bridge(BridgeConfig {
        role: Role::Destination {
            services: ServiceMap::default().into(),
            scope: securetunnel_agent::services::Scope::WholeMap,
            consent: securetunnel_agent::consent::Gate::always(),
        },
        endpoint: DataEndpoint::parse_override(&format!("ws://{addr}")).unwrap(),
        tls: None,
        access_token: Secret::new("token"),
        client_token: None,
        limits: test_limits(),
    });
    // A plain websocket server: it completes the upgrade without Sec-WebSocket-Protocol.
    for attempt in 1..=2 {
        let (tcp, _) = within("the bridge (re)connects", listener.accept())
            .await
            .unwrap();
        let accepted = tokio_tungstenite::accept_async(tcp).await;
        assert!(accepted.is_ok(), "attempt {attempt}: {accepted:?}");
    }
    assert_eq!(
        get(&dest.stats.sessions),
        0,
        "a session without the subprotocol was used"
    );
    assert!(get(&dest.stats.handshake_failures) >= 1);
    assert_eq!(dest.state.borrow().phase, Phase::Connecting);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_frame_above_131076_bytes_ends_the_session() {
    use securetunnel_agent::protocol::{FrameCodec, MAX_WS_FRAME};
    use tokio_util::codec::Encoder;
    let (mut t, _echo) = echo_tunnel().await;
    let id = t.tokens.tunnel_id.clone();
    // Exactly the limit: DATA frames for stream 0, which the agent drops; the session goes on.
    let mut wire = bytes::BytesMut::new();
    while MAX_WS_FRAME - wire.len() > 60_100 {
        let m = Message::data(0, "SSH", 0, vec![1u8; 50_000].into());
        FrameCodec.encode(&m, &mut wire).unwrap();
    }
    let mut payload = MAX_WS_FRAME - wire.len();
    let rest = loop {
        let mut buf = bytes::BytesMut::new();
        let m = Message::data(0, "SSH", 0, vec![2u8; payload].into());
        FrameCodec.encode(&m, &mut buf).unwrap();
        if wire.len() + buf.len() <= MAX_WS_FRAME {
            break buf;
        }
        payload -= 1;
    };
    wire.extend_from_slice(&rest);
    assert_eq!(wire.len(), MAX_WS_FRAME);
    assert!(
        t.emu
            .inject_ws(&id, Mode::Destination, WsMessage::binary(wire.freeze()))
            .await
    );
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within(
        "transfer after the largest frame",
        echo_transfer(client, 64 << 10, 1),
    )
    .await
    .unwrap();
    assert_eq!(
        get(&t.dest.stats.sessions),
        1,
        "a frame at the limit ended the session"
    );
    // One byte more is refused by the websocket layer: the session ends and is reconnected.
    let over = vec![0u8; MAX_WS_FRAME + 1];
    assert!(
        t.emu
            .inject_ws(&id, Mode::Destination, WsMessage::binary(over))
            .await
    );
    t.dest.wait_sessions(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_start_on_a_v2_stream_resets_that_stream() {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let mut t = tunnel(&["SSH"], map, "SSH=0", Format::V2).await;
    let mut held = live_client(t.addrs.get("SSH")).await;
    let id = t.tokens.tunnel_id.clone();
    let stream = t.emu.active_stream(&id, "SSH").unwrap();
    let resets = get(&t.src.stats.stream_resets_received);
    // A V2 stream carries one connection: a second one on it is the peer's error.
    let start = Message::connection_start(stream, "SSH", 2);
    assert!(t.emu.inject(&id, Mode::Destination, &start).await);
    t.src.wait_resets(resets + 1).await;
    within("the stream's client is closed", wait_closed(&mut held)).await;
    assert_eq!(get(&t.dest.stats.protocol_errors), 1);
    assert_eq!(
        get(&t.dest.stats.connections_opened),
        1,
        "a second connection was opened"
    );
    // The tunnel goes on.
    let client = TcpStream::connect(t.addrs.get("SSH")).await.unwrap();
    within(
        "transfer on a new stream",
        echo_transfer(client, 64 << 10, 5),
    )
    .await
    .unwrap();
}
