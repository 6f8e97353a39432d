//! The tunnels' state in the thing's named shadow `securetunnel` (`[shadow] enabled`), as a
//! mosquitto subscriber receives it: the documents through a tunnel's life, one after every
//! reconnect, at most one per 5 s under a burst of changes, and nothing with the option off.

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions, Subscriber};
use securetunnel_emulator::testkit::{TcpRelay, echo_tcp};

/// Things may publish their own shadow update; the admin reads every shadow topic and may
/// write one (the marker of the option-off test).
const SHADOW_ACL: &str = "topic readwrite $aws/things/+/shadow/#\n\
    pattern write $aws/things/%u/shadow/name/securetunnel/update";

fn topic(thing: &str) -> String {
    format!("$aws/things/{thing}/shadow/name/securetunnel/update")
}

async fn rig() -> Rig {
    Rig::start(RigOptions {
        extra_acl: SHADOW_ACL,
        ..RigOptions::default()
    })
    .await
}

/// The next document on `topic`: its arrival and reported state.
async fn next_doc(sub: &mut Subscriber, topic: &str) -> (Instant, Value) {
    let (at, t, payload) = sub.next().await;
    assert_eq!(t, topic);
    let doc: Value = serde_json::from_str(&payload).unwrap();
    (at, doc["state"]["reported"].clone())
}

/// Documents until one satisfies `done`; all of them, in order.
async fn docs_until(
    sub: &mut Subscriber,
    topic: &str,
    done: impl Fn(&Value) -> bool,
) -> Vec<(Instant, Value)> {
    let mut seen = Vec::new();
    loop {
        let d = next_doc(sub, topic).await;
        let finished = done(&d.1);
        seen.push(d);
        if finished {
            return seen;
        }
    }
}

fn tunnels(r: &Value) -> &Vec<Value> {
    r["tunnels"].as_array().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shadow_follows_a_tunnel_from_open_through_a_connection_to_close() {
    let rig = rig().await;
    let thing = "gw-shadow";
    let mut sub = Subscriber::start(&rig, &topic(thing)).await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let services = format!("SSH = \"{}\"", echo.addr.unwrap());
    let cfg = rig.agent_config(thing, &services, "[shadow]\nenabled = true");
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    // After the CONNACK: no tunnel yet.
    let (_, first) = next_doc(&mut sub, &topic(thing)).await;
    assert_eq!(first["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(first["consent"], "always");
    assert!(first["mqtt_connected_since"].as_u64().unwrap() > 1_700_000_000);
    assert!(tunnels(&first).is_empty(), "{first}");

    let (t, _) = open_connected(&rig, thing, &["SSH"]).await;
    let mut all = docs_until(&mut sub, &topic(thing), |r| {
        tunnels(r)
            .first()
            .is_some_and(|t| t["phase"] == "connected")
    })
    .await;
    let open = tunnels(&all.last().unwrap().1)[0].clone();
    assert_eq!(open["thing"], thing);
    assert_eq!(open["services"], json!(["SSH"]));
    assert!(open["since"].as_u64().is_some(), "{open}");
    assert_eq!(open["open_connections"], 0);

    // A connection held open through the tunnel shows.
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let held = tokio::net::TcpStream::connect(addrs.get("SSH"))
        .await
        .unwrap();
    all.extend(
        docs_until(&mut sub, &topic(thing), |r| {
            tunnels(r)
                .first()
                .is_some_and(|t| t["open_connections"] == 1)
        })
        .await,
    );
    drop(held);

    rig.api("close_tunnel", json!({"tunnelId": t.tunnel_id}))
        .await
        .unwrap();
    all.extend(docs_until(&mut sub, &topic(thing), |r| tunnels(r).is_empty()).await);
    assert_eq!(all.last().unwrap().1["tunnels_not_listed"], 0);
    // Never a token, in any document.
    for (_, r) in &all {
        let text = r.to_string();
        assert!(!text.contains(&t.destination_access_token), "{text}");
        assert!(!text.contains(&t.source_access_token), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_follows_every_reconnect_even_without_a_change() {
    let rig = rig().await;
    let thing = "gw-shadow-re";
    let mut sub = Subscriber::start(&rig, &topic(thing)).await;
    let relay = TcpRelay::start(format!("127.0.0.1:{}", rig.mosquitto.port).parse().unwrap())
        .await
        .unwrap();
    let cfg = rig.agent_config_with(
        thing,
        &ConfigExtra {
            services: "SSH = 22",
            mqtt: "reconnect_spread_secs = 0",
            mqtt_port: Some(relay.addr.port()),
            rest: "[shadow]\nenabled = true",
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let (_, first) = next_doc(&mut sub, &topic(thing)).await;
    // The link dies; the agent notices (1.5 keep-alives) and connects again.
    relay.black_hole();
    agent.expect("subscribed to tunnel notifications").await;
    // QoS 1 is at least once: the first document comes again if its PUBACK was lost in the
    // dead link; then the new connection's.
    let since = |r: &Value| r["mqtt_connected_since"].as_u64().unwrap();
    let docs = docs_until(&mut sub, &topic(thing), |r| since(r) != since(&first)).await;
    let again = &docs.last().unwrap().1;
    assert!(since(again) > since(&first), "{first} {again}");
    assert!(
        docs[..docs.len() - 1].iter().all(|(_, r)| *r == first),
        "{docs:?}"
    );
    assert!(tunnels(again).is_empty(), "{again}");
    assert_eq!(relay.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_changes_yields_at_most_one_document_per_5_seconds() {
    let rig = rig().await;
    let thing = "gw-shadow-burst";
    let mut sub = Subscriber::start(&rig, &topic(thing)).await;
    let cfg = rig.agent_config(
        thing,
        "SSH = 22\nVNC = 5900\nHTTP = 80",
        "[shadow]\nenabled = true",
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let mut docs = vec![next_doc(&mut sub, &topic(thing)).await];
    // Three tunnels opened at once: each changes the table.
    for service in ["SSH", "VNC", "HTTP"] {
        open(&rig, thing, &[service], 30).await;
    }
    docs.extend(
        docs_until(&mut sub, &topic(thing), |r| {
            tunnels(r).len() == 3 && tunnels(r).iter().all(|t| t["phase"] == "connected")
        })
        .await,
    );
    // 3 opens and 3 connects, and more changes of phase: fewer documents than changes.
    assert!(docs.len() <= 4, "{} documents: {docs:?}", docs.len());
    for pair in docs.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        // Timed at the subscriber: a delivery delayed on a loaded machine shortens the next
        // gap, so the margin is generous; unpaced documents come milliseconds apart.
        assert!(gap.as_millis() >= 3500, "documents {gap:?} apart: {docs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_to_the_shadow_with_the_option_off() {
    let rig = rig().await;
    let thing = "gw-shadow-off";
    let mut sub = Subscriber::start(&rig, &topic(thing)).await;
    let (_agent, _echo) = agent(&rig, thing, &["SSH"], "").await;
    open_connected(&rig, thing, &["SSH"]).await;
    // A marker, published after the agent's CONNACK and the tunnel's connect: with the
    // option on, the document of the CONNACK would arrive before it.
    sub.client
        .publish(topic(thing), rumqttc::QoS::AtLeastOnce, false, "marker")
        .await
        .unwrap();
    let (_, _, payload) = sub.next().await;
    assert_eq!(payload, "marker");
}
