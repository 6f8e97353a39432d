//! README claims about the agent process that other tests do not cover: where the data plane
//! is, what status.json holds, signals and exit codes, reloads. Each runs the agent binary
//! against mosquitto and the emulator.

mod common;

use common::e2e::*;
use common::http_proxy::Tinyproxy;
use common::rig::{ConfigExtra, Rig, RigOptions};
use common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_endpoint_comes_from_the_notifys_region() {
    // No tunnel.endpoint: the agent derives data.tunneling.iot.eu-west-1.amazonaws.com from
    // the notify, verifies that name in TLS, and reaches it through tunnel.resolve.
    let rig = Rig::start(RigOptions {
        region: "eu-west-1",
        ..RigOptions::default()
    })
    .await;
    const DATA_HOST: &str = "data.tunneling.iot.eu-west-1.amazonaws.com";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let resolve = format!("resolve = {{ \"{DATA_HOST}\" = \"{}\" }}", rig.emu.addr());
    let cfg = rig.agent_config_with(
        "gw-region",
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            tunnel: &resolve,
            region_endpoint: true,
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-region", &["SSH"], 30).await;
    let line = agent.expect("websocket connected").await;
    assert!(line.contains(&format!("wss://{DATA_HOST}:443")), "{line}");
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_holds_token_hashes_only() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-status", &["SSH"], "").await;
    let t = open(&rig, "gw-status", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let status = agent.status();
    let text = status.to_string();
    assert!(
        !text.contains(&t.destination_access_token),
        "status.json holds the token: {text}"
    );
    let tunnels = status["tunnels"].as_array().expect("tunnels listed");
    assert_eq!(tunnels.len(), 1, "{text}");
    let token = tunnels[0]["token"].as_str().unwrap();
    let hex = token.strip_prefix("token:").expect("token:<hash>");
    assert!(
        hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        "{token}"
    );
}

async fn exits_0_on(sig: i32, thing: &str) {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    agent.signal(sig);
    let status = within("the agent exits", agent.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_0_on_sigterm() {
    exits_0_on(libc::SIGTERM, "gw-term").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exits_0_on_sigint() {
    exits_0_on(libc::SIGINT, "gw-int").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_with_an_invalid_config_keeps_the_old_map_and_a_removed_service_is_refused() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, echo) = agent(&rig, "gw-hup2", &["SSH", "WEB"], "").await;
    let t = open(&rig, "gw-hup2", &["SSH", "WEB"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (src, addrs) = ready_source(&rig.emu, &t, "SSH=0,WEB=0").await;
    let cfg = rig.files.dir.join("gw-hup2.toml");
    let good = std::fs::read_to_string(&cfg).unwrap();

    // A broken file that also drops WEB: the reload is refused with the reason, and the old
    // map, WEB included, keeps serving.
    let web_line = format!("WEB = \"{}\"\n", echo.addr.unwrap());
    assert!(good.contains(&web_line), "{good}");
    let broken = good
        .replace(&web_line, "")
        .replace("[services]", "[services]\nBAD = \"no such\"");
    std::fs::write(&cfg, broken).unwrap();
    agent.signal(libc::SIGHUP);
    let line = agent
        .expect("reload failed, keeping the current service map")
        .await;
    assert!(line.contains("service \"BAD\""), "{line}");
    transfer(&addrs, "SSH", 1).await;
    transfer(&addrs, "WEB", 2).await;

    // WEB removed: its new streams are refused, SSH still served, the tunnel lives on.
    std::fs::write(&cfg, good.replace(&web_line, "")).unwrap();
    agent.signal(libc::SIGHUP);
    agent.expect("service map reloaded").await;
    let accepted = echo.accepted();
    // The WEB stream is still open (V3): the refusal is a CONNECTION_RESET on it.
    let resets =
        || get(&src.stats.stream_resets_received) + get(&src.stats.connection_resets_received);
    let before = resets();
    let mut refused = tokio::net::TcpStream::connect(addrs.get("WEB"))
        .await
        .unwrap();
    use tokio::io::AsyncWriteExt;
    refused.write_all(b"hello").await.unwrap();
    within(
        "the removed service's stream is refused",
        securetunnel_emulator::testkit::wait_closed(&mut refused),
    )
    .await;
    assert!(resets() > before);
    agent.expect("the service is not in the service map").await;
    assert_eq!(
        echo.accepted(),
        accepted,
        "the removed service was connected"
    );
    transfer(&addrs, "SSH", 3).await;
    assert_eq!(agent.count("session started"), 1);
}

/// A front for the broker the tests can switch: relay to mosquitto, or refuse (accept and
/// close at once, recording when: each is one CONNECT attempt of the agent).
struct BrokerFront {
    addr: std::net::SocketAddr,
    refusing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<std::sync::Mutex<tokio_util::sync::CancellationToken>>,
    attempts: tokio::sync::watch::Receiver<Vec<std::time::Instant>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

impl BrokerFront {
    async fn start(broker: std::net::SocketAddr) -> BrokerFront {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refusing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = std::sync::Arc::new(std::sync::Mutex::new(
            tokio_util::sync::CancellationToken::new(),
        ));
        let (tx, attempts) = tokio::sync::watch::channel(Vec::new());
        let (r, c) = (refusing.clone(), cut.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if r.load(Ordering::SeqCst) {
                    tx.send_modify(|v| v.push(std::time::Instant::now()));
                    drop(client);
                    continue;
                }
                let token = c.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(broker).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        BrokerFront {
            addr,
            refusing,
            cut,
            attempts,
            _task: tokio_util::task::AbortOnDropHandle::new(task),
        }
    }

    /// Cuts the relayed connections (both sides see EOF) and refuses new ones.
    fn outage(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut c = self.cut.lock().unwrap();
        c.cancel();
        *c = tokio_util::sync::CancellationToken::new();
    }

    fn restore(&self) {
        self.refusing
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    async fn wait_attempts(&mut self, n: usize) -> Vec<std::time::Instant> {
        within("CONNECT attempts", self.attempts.wait_for(|v| v.len() >= n))
            .await
            .unwrap()
            .clone()
    }
}

async fn agent_behind_front(
    rig: &Rig,
    thing: &str,
) -> (
    common::rig::AgentProc,
    BrokerFront,
    securetunnel_emulator::testkit::EchoService,
) {
    let front = BrokerFront::start(([127, 0, 0, 1], rig.mosquitto.port).into()).await;
    let (agent, echo) = agent_via_mqtt_port(rig, thing, front.addr.port()).await;
    (agent, front, echo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_reconnects_back_off_and_an_outage_is_logged_once() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, mut front, _echo) = agent_behind_front(&rig, "gw-mqtt-backoff").await;
    front.outage();
    agent.expect("MQTT connection ended").await;
    // Failures 2, 3 and 4 of the streak wait at least half of 1, 2 and 4 s... and never
    // two CONNECTs within 1 s.
    let at = front.wait_attempts(4).await;
    let gaps: Vec<_> = at.windows(2).map(|w| w[1] - w[0]).collect();
    for (gap, floor) in gaps.iter().zip([1.0, 2.0, 4.0]) {
        assert!(
            gap.as_secs_f64() >= floor * 0.99,
            "attempt gaps {gaps:?}: one is below its backoff floor of {floor} s"
        );
    }
    assert_eq!(
        agent.count("MQTT connection ended"),
        1,
        "the outage was logged more than once"
    );
    front.restore();
    agent.expect("MQTT reconnected; subscribed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notify_published_during_an_mqtt_outage_arrives_after_it() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, front, _echo) = agent_behind_front(&rig, "gw-qos1").await;
    front.outage();
    agent.expect("MQTT connection ended").await;
    // OpenTunnel while the agent is offline: the broker keeps the QoS 1 notify for its
    // persistent session.
    let t = open(&rig, "gw-qos1", &["SSH"], 30).await;
    front.restore();
    // The broker delivers it right after the CONNACK, before the SUBACK.
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.peer_token_is(&id, Mode::Destination, &t.destination_access_token)
    })
    .await;
}

/// A TLS "broker" that accepts every CONNECT and grants (or refuses, SUBACK 0x80, as a
/// broker whose policy denies the topic) every SUBSCRIBE. It records when each connection
/// came and the ALPN protocol it negotiated (it speaks `x-amzn-mqtt-ca` and `mqtt`).
struct FakeBroker {
    port: u16,
    connects: tokio::sync::watch::Receiver<Vec<std::time::Instant>>,
    alpn: std::sync::Arc<std::sync::Mutex<Vec<Option<Vec<u8>>>>>,
    /// Topic filters in each SUBSCRIBE received.
    filters: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    _task: tokio_util::task::AbortOnDropHandle<()>,
}

async fn fake_broker(rig: &Rig, grant: bool) -> FakeBroker {
    fake_broker_refusing(rig, if grant { |_| false } else { |_| true }).await
}

/// A broker that answers CONNECT, PINGREQ and SUBSCRIBE, refusing the filters `refuse` names
/// (one SUBACK code per filter).
async fn fake_broker_refusing(rig: &Rig, refuse: fn(&str) -> bool) -> FakeBroker {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config =
        rustls::ServerConfig::builder_with_provider(securetunnel_agent::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                rig.files.server.cert_der(),
                rig.files.server.key_der().unwrap(),
            )
            .unwrap();
    config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec(), b"mqtt".to_vec()];
    let alpn = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = alpn.clone();
    let filters_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let all_filters = filters_seen.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tx.send_modify(|v| v.push(std::time::Instant::now()));
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            let filters = all_filters.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                seen.lock().unwrap().push(negotiated);
                loop {
                    // Fixed header, then the remaining length (variable-length integer).
                    let Ok(first) = tls.read_u8().await else {
                        return;
                    };
                    let (mut len, mut shift) = (0usize, 0);
                    loop {
                        let Ok(b) = tls.read_u8().await else { return };
                        len |= ((b & 0x7f) as usize) << shift;
                        shift += 7;
                        if b & 0x80 == 0 {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if tls.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let reply = match first >> 4 {
                        1 => vec![0x20, 0x02, 0x00, 0x00],
                        8 => {
                            // Packet id, then (length, filter, QoS) per filter.
                            let mut codes = Vec::new();
                            let mut at = 2;
                            while at + 2 <= body.len() {
                                let n = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                                let filter = String::from_utf8_lossy(&body[at + 2..at + 2 + n]);
                                codes.push(if refuse(&filter) { 0x80 } else { 0x01 });
                                at += 2 + n + 1;
                            }
                            filters.lock().unwrap().push(codes.len());
                            let mut r = vec![0x90, 2 + codes.len() as u8, body[0], body[1]];
                            r.extend(codes);
                            r
                        }
                        12 => vec![0xd0, 0x00],
                        _ => continue,
                    };
                    if tls.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    FakeBroker {
        port,
        connects: rx,
        alpn,
        filters: filters_seen,
        _task: tokio_util::task::AbortOnDropHandle::new(task),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_reported_and_asked_again_with_backoff() {
    let rig = Rig::start(RigOptions::default()).await;
    let mut broker = fake_broker(&rig, false).await;
    let cfg = rig.agent_config_with(
        "gw-denied",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt_port: Some(broker.port),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    let line = agent.expect("refused the subscription").await;
    assert!(line.contains("iot:Subscribe"), "{line}");
    // Not deaf for good: it reconnects and asks again, backing off.
    let at = within(
        "the agent asks again",
        broker.connects.wait_for(|v| v.len() >= 3),
    )
    .await
    .unwrap()
    .clone();
    assert!(at[2] - at[1] >= std::time::Duration::from_secs(1), "{at:?}");
    assert_eq!(agent.count("subscribed to tunnel notifications"), 0);
    // At warning level once; the repeats are debug lines.
    assert_eq!(agent.count("WARN"), 1, "{}", agent.log.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_rotation_keeps_the_old_session_beside_the_new_one() {
    let rig = Rig::start(RigOptions::default()).await;
    // The service leaves a replaced destination connected: only the agent could close it.
    rig.emu
        .set_replaced_peer(securetunnel_emulator::ReplacedPeer::Keep);
    let (mut agent, _echo) = agent(
        &rig,
        "gw-par",
        &["SSH"],
        "[rotation]\npolicy = \"parallel\"\n",
    )
    .await;
    let t = open(&rig, "gw-par", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let r = rotate(&rig, &id, "DESTINATION", "gw-par").await;
    let new = r["destinationAccessToken"].as_str().unwrap().to_owned();
    agent.expect("session started").await;
    until(&rig.emu, "the new session connects", |e| {
        e.peer_token_is(&id, Mode::Destination, &new)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
    let old_gone = rig.emu.peer_events(&id).iter().any(|e| {
        e.access_token == t.destination_access_token
            && matches!(e.kind, securetunnel_emulator::PeerEventKind::Gone(_))
    });
    assert!(
        !old_gone,
        "the old session was closed: {:?}",
        rig.emu.peer_events(&id)
    );
    assert_eq!(agent.count("rotation:"), 0);
    assert_eq!(agent.status()["tunnels"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_replaced_token_is_ignored() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-redeliver", &["SSH"], "").await;
    let t = open(&rig, "gw-redeliver", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    let r = rotate(&rig, &id, "DESTINATION", "gw-redeliver").await;
    let new = r["destinationAccessToken"].as_str().unwrap().to_owned();
    until(&rig.emu, "the agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new)
    })
    .await;
    let old_handshakes = rig.emu.handshakes_for_token(&t.destination_access_token);
    // The broker delivers the first notify again (QoS 1 redelivery).
    let notify = serde_json::json!({
        "clientAccessToken": t.destination_access_token,
        "clientMode": "destination",
        "region": "us-east-1",
        "services": ["SSH"],
    });
    rig.emu
        .publish_raw(
            "$aws/things/gw-redeliver/tunnels/notify",
            notify.to_string().into_bytes(),
        )
        .await
        .unwrap();
    agent.expect("this token was already replaced").await;
    assert_eq!(
        rig.emu.handshakes_for_token(&t.destination_access_token),
        old_handshakes,
        "the replaced token was presented again"
    );
    assert!(rig.emu.peer_token_is(&id, Mode::Destination, &new));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_alpn_is_offered_in_the_tls_handshake() {
    // Port 443 offers x-amzn-mqtt-ca (unit test `port_443_offers_the_amazon_mqtt_alpn_...`);
    // here the same setting, named, on a free port, against a broker that negotiates it.
    let rig = Rig::start(RigOptions::default()).await;
    let broker = fake_broker(&rig, true).await;
    let cfg = rig.agent_config_with(
        "gw-alpn",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt: "alpn = \"x-amzn-mqtt-ca\"",
            mqtt_port: Some(broker.port),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    assert_eq!(
        broker
            .alpn
            .lock()
            .unwrap()
            .first()
            .cloned()
            .flatten()
            .as_deref(),
        Some(&b"x-amzn-mqtt-ca"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_ca_pins_the_broker_even_when_the_platform_trusts_it() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config("gw-pin", "SSH = 22", "");
    // mqtt.ca names another CA; the platform store (SSL_CERT_FILE) holds the broker's.
    let text = std::fs::read_to_string(&cfg).unwrap().replacen(
        &format!("ca = \"{}\"", rig.files.ca.display()),
        &format!("ca = \"{}\"", rig.emu_ca.display()),
        1,
    );
    std::fs::write(&cfg, text).unwrap();
    let platform = rig.files.ca.to_str().unwrap();
    let mut agent = rig.spawn_agent_with_env(&cfg, &[("SSL_CERT_FILE", platform)]);
    let line = agent.expect("MQTT connection ended").await;
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "{line}"
    );
    assert_eq!(agent.count("subscribed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_ca_only_pins_the_data_plane() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config_with(
        "gw-pin2",
        &ConfigExtra {
            services: "SSH = 22",
            tunnel: "ca_only = true",
            ..ConfigExtra::default()
        },
    );
    // tunnel.ca names another CA (the broker's); the platform store holds the emulator's.
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("ca = \"{}\"\nca_only", rig.emu_ca.display()),
        &format!("ca = \"{}\"\nca_only", rig.files.ca.display()),
    );
    assert!(
        text.contains(&format!("ca = \"{}\"\nca_only", rig.files.ca.display())),
        "{text}"
    );
    std::fs::write(&cfg, text).unwrap();
    let platform = rig.emu_ca.to_str().unwrap();
    let mut agent = rig.spawn_agent_with_env(&cfg, &[("SSL_CERT_FILE", platform)]);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-pin2", &["SSH"], 30).await;
    let line = agent.expect("TLS handshake").await;
    assert!(
        line.contains("UnknownIssuer") || line.contains("certificate"),
        "{line}"
    );
    assert!(!rig.emu.is_connected(&t.tunnel_id, Mode::Destination));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_the_data_plane_go_through_the_configured_http_proxy() {
    let rig = Rig::start(RigOptions::default()).await;
    let tp = Tinyproxy::start("BasicAuth op s3cret-pw").await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let rest = format!("[proxy]\nurl = \"{}\"\n", tp.url("op:s3cret-pw@"));
    let cfg = rig.agent_config_with(
        "gw-proxy",
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            rest: &rest,
            ..ConfigExtra::default()
        },
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"))
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains(&format!("{} for MQTT and the data plane", tp.url("op@"))),
        "{summary}"
    );
    assert!(!summary.contains("s3cret-pw"), "{summary}");

    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    tp.saw_connect(&format!("127.0.0.1:{}", rig.mosquitto.port))
        .await;
    let t = open(&rig, "gw-proxy", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    tp.saw_connect(&rig.emu.addr().to_string()).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 1).await;
    assert!(!agent.log.text().contains("s3cret-pw"));
}

/// `securetunnel-agent status [--json]` against `cfg`: exit code, stdout, stderr.
async fn status_cmd(cfg: &std::path::Path, json: bool) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_securetunnel-agent"));
    cmd.arg("status").arg("--config").arg(cfg);
    if json {
        cmd.arg("--json");
    }
    let out = within("status answers", cmd.output()).await.unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn status_json(cfg: &std::path::Path) -> serde_json::Value {
    let (code, out, err) = status_cmd(cfg, true).await;
    assert_eq!(code, Some(0), "{out}{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_live_during_a_transfer_and_exits_3_once_the_agent_stopped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-live", &["SSH", "WEB"], "").await;
    let cfg = rig.files.dir.join("gw-live.toml");
    let t = open(&rig, "gw-live", &["SSH", "WEB"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0,WEB=0").await;

    // One SSH connection stays open across two rounds of 256 KiB echoed.
    const ROUND: usize = 256 << 10;
    let mut c = tokio::net::TcpStream::connect(addrs.get("SSH"))
        .await
        .unwrap();
    let mut back = vec![0u8; ROUND];
    let mut round = async |c: &mut tokio::net::TcpStream| {
        c.write_all(&vec![7u8; ROUND]).await.unwrap();
        within("the echo comes back", c.read_exact(&mut back))
            .await
            .unwrap();
    };
    round(&mut c).await;
    let first = status_json(&cfg).await;
    assert_eq!(first["mqtt"], "subscribed", "{first}");
    let tunnel = &first["tunnels"][0];
    assert_eq!(tunnel["phase"], "connected", "{first}");
    assert_eq!(tunnel["region"], "us-east-1");
    assert_eq!(tunnel["services"], serde_json::json!(["SSH", "WEB"]));
    assert_eq!(tunnel["open_connections"], serde_json::json!({"SSH": 1}));
    assert_eq!(tunnel["reconnects"], 0);
    assert!(tunnel["channel_id"].is_string() && tunnel["connected_since"].is_u64());
    let token = tunnel["token"].as_str().unwrap();
    assert!(token.starts_with("token:") && token.len() == 14, "{token}");
    let bytes = |v: &serde_json::Value, k: &str| v["tunnels"][0][k].as_u64().unwrap();
    assert!(
        bytes(&first, "bytes_from_tunnel") >= ROUND as u64,
        "{first}"
    );
    assert!(bytes(&first, "bytes_to_tunnel") >= ROUND as u64, "{first}");

    round(&mut c).await;
    let second = status_json(&cfg).await;
    for k in ["bytes_from_tunnel", "bytes_to_tunnel"] {
        assert!(bytes(&second, k) >= 2 * ROUND as u64, "{k}: {second}");
    }

    let (code, text, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(0), "{err}");
    for needle in [
        "MQTT: subscribed",
        &format!("Tunnel 1 to gw-live ({token}): connected, region us-east-1, services SSH, WEB"),
        "connections open: SSH 1, WEB 0",
        "reconnects 0",
    ] {
        assert!(text.contains(needle), "{needle:?} in\n{text}");
    }
    assert!(!text.contains(&t.destination_access_token[..20]));

    // Only the agent's user (and root) may ask.
    use std::os::unix::fs::PermissionsExt;
    let run = rig.files.dir.join("run-gw-live");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("status.sock")), 0o600);

    drop(c);
    assert_eq!(agent.terminate().await.code(), Some(0));
    let (code, _, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("the agent is not running"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_tunnel_reconnecting_with_its_next_attempt_and_error() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-retry", &["SSH"], "").await;
    let cfg = rig.files.dir.join("gw-retry.toml");
    let t = open(&rig, "gw-retry", &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    // The link dies and the service answers 503 until the test lets it through.
    rig.emu.fail_next_handshakes(1000, 503);
    rig.emu.drop_peer(&id, Mode::Destination);
    agent.expect("reconnecting with backoff").await;
    // Between attempts after a refused one (the first error is the cut link): the tunnel
    // shows when the next attempt comes and why the last one failed.
    let waiting = within("status shows the refused attempt", async {
        loop {
            let s = status_json(&cfg).await;
            let t = &s["tunnels"][0];
            // From the cut on (the first wait included), nothing is connected.
            if t["phase"] == "reconnecting" {
                assert!(t["connected_since"].is_null(), "{s}");
            }
            if t["next_attempt_in_secs"].is_u64()
                && t["last_error"].as_str().unwrap_or("").contains("503")
            {
                return s;
            }
        }
    })
    .await;
    let tunnel = &waiting["tunnels"][0];
    assert_eq!(tunnel["phase"], "reconnecting", "{waiting}");
    assert!(tunnel["connected_since"].is_null(), "{waiting}");
    assert_eq!(tunnel["reconnects"], 0, "{waiting}");
    let (code, text, err) = status_cmd(&cfg, false).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(text.contains("): reconnecting, region us-east-1"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("last error:") && l.contains("HTTP 503")),
        "{text}"
    );

    rig.emu.fail_next_handshakes(0, 503);
    until(&rig.emu, "the agent reconnects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    // The emulator counts the peer at the upgrade; the agent a moment later.
    let back = within("status shows the tunnel connected again", async {
        loop {
            let s = status_json(&cfg).await;
            if s["tunnels"][0]["phase"] == "connected" {
                return s;
            }
        }
    })
    .await;
    assert!(back["tunnels"][0]["connected_since"].is_u64(), "{back}");
    assert_eq!(back["tunnels"][0]["reconnects"], 1, "{back}");
    assert!(
        back["tunnels"][0]["next_attempt_in_secs"].is_null(),
        "{back}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_the_broker_is_named_with_the_fix() {
    let rig = Rig::start(RigOptions::default()).await;
    let tp = Tinyproxy::start("BasicAuth op s3cret-pw").await;
    let rest = format!("[proxy]\nurl = \"{}\"\n", tp.url(""));
    let cfg = rig.agent_config_with(
        "gw-proxy-407",
        &ConfigExtra {
            services: "SSH = 22",
            rest: &rest,
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    let line = agent.expect("refused CONNECT to the broker").await;
    assert!(
        line.contains(&format!(
            "proxy {} refused CONNECT to the broker: 407",
            tp.url("")
        )) && line.contains("use http://user:password@host:port"),
        "{line}"
    );
}

/// A proxy that answers CONNECT with bytes and never a line end: the agent reads at most
/// 8 KiB of it per attempt (the bounded proxy connect, for MQTT too), names the proxy in its
/// error, and stays small however long the proxy goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_never_ends_its_answer_is_cut_off_and_named() {
    use tokio::io::AsyncWriteExt;
    let rig = Rig::start(RigOptions::default()).await;
    let endless = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = endless.local_addr().unwrap();
    let _proxy = tokio::spawn(async move {
        while let Ok((mut s, _)) = endless.accept().await {
            tokio::spawn(async move {
                let junk = vec![b'A'; 64 << 10];
                while s.write_all(&junk).await.is_ok() {}
            });
        }
    });
    let cfg = rig.agent_config_with(
        "gw-proxy-endless",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt: "reconnect_spread_secs = 0",
            rest: &format!("[proxy]\nurl = \"http://{proxy}\"\n"),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    for _ in 0..3 {
        let line = agent.expect("MQTT connection").await;
        assert!(
            line.contains(&format!("proxy http://{proxy}")) && line.contains("over 8 KiB"),
            "{line}"
        );
    }
    let peak = securetunnel_emulator::testkit::proc_status_kib(agent.pid(), "VmHWM:").unwrap();
    assert!(peak < 16 * 1024, "the agent grew to {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_thing_the_broker_refuses_is_logged_once_and_the_rest_stay_subscribed() {
    let rig = Rig::start(RigOptions::default()).await;
    let broker = fake_broker_refusing(&rig, |f| f.contains("denied-9")).await;
    // Ten downstream things and the gateway's own topic: 11 filters, at most 8 a SUBSCRIBE.
    let mut rest =
        "[things.PLC-42.services]\nHTTP = 80\n[things.denied-9.services]\nHTTP = 80\n".to_owned();
    for i in 0..8 {
        rest += &format!("[things.m{i}.services]\nHTTP = 80\n");
    }
    let cfg = rig.agent_config_with(
        "gw-some",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt_port: Some(broker.port),
            rest: &rest,
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    // One SUBACK answers the batch: the refusal is logged, then the own topic's success.
    let line = agent
        .expect("the broker refused the subscription to $aws/things/denied-9/tunnels/notify")
        .await;
    agent.expect("subscribed to tunnel notifications").await;
    assert!(
        line.contains("thing=denied-9")
            && line.contains("topicfilter/$aws/things/denied-9/tunnels/notify"),
        "{line}"
    );
    // Not a reason to drop the connection: the gateway's own topic and PLC-42 were granted.
    assert_eq!(broker.connects.borrow().len(), 1);
    assert_eq!(agent.count("refused the subscription"), 1);
    assert_eq!(agent.count("PLC-42/tunnels/notify"), 0);
    agent
        .expect("subscribed to downstream things' notifications")
        .await;
    let per_subscribe = broker.filters.lock().unwrap().clone();
    assert_eq!(per_subscribe.iter().sum::<usize>(), 11, "{per_subscribe:?}");
    assert!(per_subscribe.iter().all(|n| *n <= 8), "{per_subscribe:?}");
    // `status` names the refused thing.
    let status = status_json(&cfg).await;
    assert_eq!(
        status["things"],
        serde_json::json!([
            {"name": "PLC-42", "refused": false},
            {"name": "denied-9", "refused": true},
            {"name": "m0", "refused": false},
            {"name": "m1", "refused": false},
            {"name": "m2", "refused": false},
            {"name": "m3", "refused": false},
            {"name": "m4", "refused": false},
            {"name": "m5", "refused": false},
            {"name": "m6", "refused": false},
            {"name": "m7", "refused": false},
        ])
    );
    let (_, text, _) = status_cmd(&cfg, false).await;
    assert!(
        text.contains("Downstream things: PLC-42, denied-9 (subscription refused), m0"),
        "{text}"
    );
}

/// Signals before handlers: from the agent's first line on, SIGHUP is ignored or caught, never
/// left to its default, which kills (procd would count a crash); a flood of SIGHUPs while it
/// comes up does not stop it from subscribing. (The window before the handler is a few
/// milliseconds: the unit test `signals::tests` shows the ignored disposition survives exec.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_start_up_does_not_kill_the_agent() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config("gw-hup", "SSH = 22", "");
    let mut agent = rig.spawn_agent(&cfg);
    let pid = agent.pid();
    // From its first line (main has run, the configuration is being read; the reload
    // handler comes later) until it says it started, SIGHUP is never left to its default
    // (which kills): ignored, then caught.
    agent.expect("").await;
    let mut samples = 0;
    while agent.count("agent started") == 0 && agent.child.try_wait().unwrap().is_none() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let mask = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0)
        };
        let hup = 1u64 << (libc::SIGHUP - 1);
        assert!(
            (mask("SigIgn:") | mask("SigCgt:")) & hup != 0,
            "SIGHUP has its default disposition during start-up"
        );
        samples += 1;
        tokio::task::yield_now().await;
    }
    assert!(samples > 0, "the start-up was not sampled");
    // Then SIGHUP it every millisecond until it is subscribed.
    within("the agent comes up under SIGHUPs", async {
        while agent.count("subscribed to tunnel notifications") == 0 {
            agent.signal(libc::SIGHUP);
            assert!(
                agent.child.try_wait().unwrap().is_none(),
                "SIGHUP killed the agent (pid {pid})"
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    })
    .await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
}

/// status.json is not rewritten by MQTT state changes (an offline gateway reconnects every
/// few seconds, and status.json may be on flash): only tunnel-table changes write it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_reconnects_do_not_rewrite_status_json() {
    use std::os::unix::fs::MetadataExt;
    let rig = Rig::start(RigOptions::default()).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = rig.agent_config_with(
        "gw-offline",
        &ConfigExtra {
            services: "SSH = 22",
            mqtt: "reconnect_spread_secs = 0",
            mqtt_port: Some(port),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("agent started").await;
    agent.expect("MQTT connection ended").await;
    let path = rig.files.dir.join("state-gw-offline/status.json");
    let written = |p: &std::path::Path| {
        let m = std::fs::metadata(p).unwrap();
        (m.ino(), m.mtime(), m.mtime_nsec())
    };
    let before = written(&path);
    for _ in 0..3 {
        agent.expect("MQTT connection failed").await;
    }
    assert_eq!(written(&path), before, "status.json was rewritten");
}
