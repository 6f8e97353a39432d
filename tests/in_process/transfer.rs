//! Byte-exact transfers through the emulator: this project's source and destination.

use crate::common::*;
use securetunnel_agent::protocol::{Format, Mode};
use securetunnel_agent::services::{LocalEndpoint, ServiceMap};
use securetunnel_emulator::testkit::{SENTINEL_LEN, echo_tcp, echo_transfer, echo_unix};
use tokio::net::TcpStream;

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
    // Every byte crossed the tunnel both ways (not a shortcut around it).
    let id = &t.tokens.tunnel_id;
    let crossed = (64 << 20) + SENTINEL_LEN as u64;
    assert_eq!(t.emu.data_bytes_to(id, Mode::Destination), crossed);
    assert_eq!(t.emu.data_bytes_to(id, Mode::Source), crossed);
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

/// A source written by hand (not this project's engine) that speaks the V1 subprotocol and
/// V1 messages: no service id, no connection id, no SERVICE_IDS from the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_rolled_v1_subprotocol_source_talks_to_our_destination() {
    use futures_util::{SinkExt, StreamExt};
    use securetunnel_agent::protocol::{
        FrameCodec, FrameReader, Message, MessageType, SUBPROTOCOL_V1,
    };
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_util::codec::Encoder;

    let mut echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let emu = emulator(false).await;
    let t = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(600));
    let map = ServiceMap::unnamed(tcp(echo.addr.unwrap()));
    let mut dest = destination(&emu, &t, map);
    dest.wait_phase(securetunnel_agent::bridge::Phase::Ready)
        .await;

    let mut req = format!("ws://{}/tunnel?local-proxy-mode=source", emu.addr())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", SUBPROTOCOL_V1.parse().unwrap());
    req.headers_mut()
        .insert("access-token", t.source_access_token.parse().unwrap());
    let tcp_stream = TcpStream::connect(emu.addr()).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp_stream)
        .await
        .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], SUBPROTOCOL_V1);
    let frames = |msgs: &[Message]| {
        let mut b = bytes::BytesMut::new();
        for m in msgs {
            FrameCodec.encode(m, &mut b).unwrap();
        }
        Ws::binary(b.freeze())
    };
    let hello = bytes::Bytes::from_static(b"hello over v1");
    ws.send(frames(&[
        Message::stream_start(1, "", 0),
        Message::data(1, "", 0, hello.clone()),
    ]))
    .await
    .unwrap();
    let mut reader = FrameReader::new(FrameCodec);
    let mut echoed = Vec::new();
    while echoed.len() < hello.len() {
        match within("echo over v1", ws.next()).await.unwrap().unwrap() {
            Ws::Binary(b) => reader.push(b),
            other => panic!("unexpected {other:?}"),
        }
        while let Some(m) = reader.next_frame().unwrap() {
            assert_eq!(
                m.kind(),
                Some(MessageType::Data),
                "a V1 peer gets no SERVICE_IDS"
            );
            assert_eq!(
                (m.stream_id, m.service_id.as_str(), m.connection_id),
                (1, "", 0)
            );
            echoed.extend_from_slice(&m.payload);
        }
    }
    assert_eq!(echoed, hello);
    ws.send(frames(&[Message::stream_reset(1, "")]))
        .await
        .unwrap();
    within("destination closes the local socket", echo.wait_closed(1)).await;
}

/// A second destination presenting the same token and client token (a reconnect from
/// elsewhere) replaces the first: the first is closed, the source's streams are reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacing_destination_closes_the_old_one_and_resets_the_sources_streams() {
    use securetunnel_agent::bridge::{BridgeEnd, Phase};
    use securetunnel_agent::secret::Secret;
    use securetunnel_emulator::testkit::wait_closed;

    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let client_token = uuid::Uuid::new_v4().to_string();
    let emu = emulator(true).await;
    let t = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(600));
    let role = || securetunnel_agent::bridge::Role::Destination {
        services: map.clone().into(),
        scope: securetunnel_agent::services::Scope::WholeMap,
        consent: securetunnel_agent::consent::Gate::always(),
    };
    let mut cfg = config(&emu, &t.destination_access_token, role(), test_limits());
    cfg.client_token = Some(Secret::new(client_token.as_str()));
    let mut first = spawn_bridge(cfg);
    first.wait_phase(Phase::Ready).await;
    let (mut src, addrs) = source(&emu, &t, "SSH=0", Format::V3).await;
    src.wait_phase(Phase::Ready).await;
    let mut client = live_client(addrs.get("SSH")).await;

    let mut cfg = config(&emu, &t.destination_access_token, role(), test_limits());
    cfg.client_token = Some(Secret::new(client_token.as_str()));
    let mut second = spawn_bridge(cfg);
    second.wait_phase(Phase::Ready).await;
    let end = within("first destination ends", first.task)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(&end, BridgeEnd::ClosedByService { reason, .. } if reason.contains("replaced")),
        "{end:?}"
    );
    within("source closes the old client", wait_closed(&mut client)).await;
    let next = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    within(
        "through the new destination",
        echo_transfer(next, 256 << 10, 8),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_listener_on_a_tunnel_without_services_sends_no_service_id() {
    // As localproxy: `-s 5555` against a tunnel opened without services (docs/protocol.md §3.3).
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let map = ServiceMap::unnamed(tcp(echo.addr.unwrap()));
    let t = tunnel(&[], map, "0", Format::V3).await;
    let client = TcpStream::connect(t.addrs.get("")).await.unwrap();
    within(
        "echo without a service id",
        echo_transfer(client, 256 << 10, 8),
    )
    .await
    .unwrap();
    assert_eq!(echo.accepted(), 1);
}

/// Interop with localproxy peers: every websocket message either end sends stays within
/// 65,538 bytes (one largest tunnel frame, what localproxy itself sends). The emulator plays
/// a localproxy peer's strictness and closes, with 1009, an end that sends more. 64 MiB each
/// way through this project's source and destination, byte-checked, with local reads and
/// writes of random sizes on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_in_messages_a_localproxy_peer_accepts() {
    use securetunnel_agent::bridge::Phase;
    use securetunnel_agent::protocol::MAX_SENT_MESSAGE;
    use securetunnel_emulator::testkit::{Behaviour, echo_transfer_random_sizes, service_tcp};

    let echo = service_tcp("127.0.0.1:0", Behaviour::EchoRandomSizes)
        .await
        .unwrap();
    let emu = emulator(true).await;
    emu.set_max_peer_message(Some(65_538));
    let t = emu.open_tunnel(&["SSH"], std::time::Duration::from_secs(3600));
    let map = ServiceMap::default().with("SSH", tcp(echo.addr.unwrap()));
    let mut dest = destination(&emu, &t, map);
    let (mut src, addrs) = source(&emu, &t, "SSH=0", Format::V3).await;
    dest.wait_phase(Phase::Ready).await;
    src.wait_phase(Phase::Ready).await;
    let client = TcpStream::connect(addrs.get("SSH")).await.unwrap();
    let report = within(
        "64 MiB each way",
        echo_transfer_random_sizes(client, 64 << 20, 26),
    )
    .await
    .expect("the transfer completes byte-exact");
    eprintln!("{:.1} MiB/s each way", report.mib_per_s());
    assert_eq!(get(&dest.stats.sessions), 1, "the destination was closed");
    assert_eq!(get(&src.stats.sessions), 1, "the source was closed");
    let largest = emu.largest_peer_message();
    assert!(largest <= MAX_SENT_MESSAGE, "a {largest}-byte message");
    assert!(
        largest > MAX_SENT_MESSAGE / 2,
        "never a full frame: {largest}"
    );
}
