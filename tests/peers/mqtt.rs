//! The MQTT link, end to end with the agent process: reconnect backoff and an outage logged
//! once, a notify published during an outage (QoS 1), a broker restart, a refused
//! subscription (for the agent's own topic and for one downstream thing), the ALPN offered
//! in the TLS handshake. Fronts and fake brokers stand in where mosquitto cannot misbehave.

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;

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
    crate::common::rig::AgentProc,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_agent_resubscribes_and_follows_a_rotation() {
    let mut rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _echo) = agent(&rig, "gw-mq", &["SSH"], "").await;
    let t = open(&rig, "gw-mq", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;

    rig.mosquitto.restart().await;
    agent.expect("MQTT connection ended").await;
    agent.expect("subscribed to tunnel notifications").await;
    within("publisher reconnects", rig.emu.wait_publisher()).await;

    let r = rotate(&rig, &id, "DESTINATION", "gw-mq").await;
    let new_dest = r["destinationAccessToken"].as_str().unwrap().to_owned();
    agent
        .expect("rotation: starting a bridge with the new token")
        .await;
    until(&rig.emu, "agent follows the rotation", |e| {
        e.peer_token_is(&id, Mode::Destination, &new_dest)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 4).await;
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
