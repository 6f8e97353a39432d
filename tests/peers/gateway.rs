//! Gateway mode: one agent serves tunnels to the things behind it. mosquitto's ACL lets the
//! gateway's certificate read two downstream things' notify topics (and a third added on
//! reload) and not a fourth (mosquitto 2.0 grants the subscription and withholds the
//! messages; a broker that refuses the SUBSCRIBE is tested in mqtt.rs); the emulator's
//! control plane opens tunnels by thing name; echo services stand in for the devices.

use crate::common::e2e::*;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

const GATEWAY: &str = "gw-gate";

async fn connected(rig: &Rig, t: &securetunnel_emulator::TunnelTokens) {
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downstream_things_get_their_own_endpoints_and_a_refused_one_leaves_the_rest_working() {
    let rig = Rig::start(RigOptions {
        extra_acl: "user gw-gate\ntopic read $aws/things/PLC-42/tunnels/notify\n\
                    topic read $aws/things/cam-7/tunnels/notify\ntopic read $aws/things/meter-3/tunnels/notify",
        ..RigOptions::default()
    })
    .await;
    let (own, plc, cam, meter) = (
        echo_tcp("127.0.0.1:0").await.unwrap(),
        echo_tcp("127.0.0.1:0").await.unwrap(),
        echo_tcp("127.0.0.1:0").await.unwrap(),
        echo_tcp("127.0.0.1:0").await.unwrap(),
    );
    let addr = |e: &securetunnel_emulator::testkit::EchoService| e.addr.unwrap();
    // The same service name on two things: each must reach its own device only.
    let things = |with_cam: bool, with_meter: bool| {
        let mut t = format!(
            "[things.PLC-42.services]\nSHARED = \"{}\"\nHTTP = \"{}\"\n\
             [things.denied-9.services]\nSHARED = \"{}\"\n",
            addr(&plc),
            addr(&plc),
            addr(&own)
        );
        if with_cam {
            t += &format!(
                "[things.cam-7.services]\nSHARED = \"{}\"\nRTSP = \"{}\"\n",
                addr(&cam),
                addr(&cam)
            );
        }
        if with_meter {
            t += &format!("[things.meter-3.services]\nSHARED = \"{}\"\n", addr(&meter));
        }
        t
    };
    let cfg = rig.agent_config_with(
        GATEWAY,
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", addr(&own)),
            rest: &things(true, false),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    // The thing the ACL does not allow: its notify never reaches the agent.
    let t_denied = open(&rig, "denied-9", &["SHARED"], 30).await;

    // One tunnel per thing, the same service name: each reaches its own device.
    let t_plc = open(&rig, "PLC-42", &["SHARED"], 30).await;
    connected(&rig, &t_plc).await;
    let (_src_plc, plc_addrs) = ready_source(&rig.emu, &t_plc, "SHARED=0").await;
    transfer(&plc_addrs, "SHARED", 1).await;
    let t_cam = open(&rig, "cam-7", &["SHARED"], 30).await;
    connected(&rig, &t_cam).await;
    let (_src_cam, cam_addrs) = ready_source(&rig.emu, &t_cam, "SHARED=0").await;
    transfer(&cam_addrs, "SHARED", 2).await;
    assert_eq!((plc.accepted(), cam.accepted(), own.accepted()), (1, 1, 0));

    // A service only another thing maps is never connected for this one.
    let t_cross = open(&rig, "PLC-42", &["RTSP"], 30).await;
    agent
        .expect("notify refused: none of the tunnel's services is in the thing's service map")
        .await;
    assert!(!rig.emu.is_connected(&t_cross.tunnel_id, Mode::Destination));

    // The gateway's own tunnels still work; the denied thing's never started.
    let t_own = open(&rig, GATEWAY, &["SSH"], 30).await;
    connected(&rig, &t_own).await;
    assert!(!rig.emu.is_connected(&t_denied.tunnel_id, Mode::Destination));
    let status = agent.status();
    let mut by_thing: Vec<String> = status["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["thing"].as_str().unwrap().to_owned())
        .collect();
    by_thing.sort();
    assert_eq!(by_thing, ["PLC-42", "cam-7", GATEWAY]);

    // Reload: cam-7 removed (unsubscribed, its tunnel stops), meter-3 added; PLC-42's
    // tunnel is untouched.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(&things(true, false), &things(false, true)),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    agent.expect("downstream thing removed").await;
    agent.expect("service map reloaded").await;
    let cam_id = t_cam.tunnel_id.clone();
    until(&rig.emu, "cam-7's tunnel stops", |e| {
        !e.is_connected(&cam_id, Mode::Destination)
    })
    .await;
    // A new tunnel to the removed thing is not served.
    let t_cam2 = open(&rig, "cam-7", &["SHARED"], 30).await;
    // meter-3's subscription is granted before its first notify is published.
    agent
        .expect("subscribed to downstream things' notifications things=[\"meter-3\"]")
        .await;
    let t_meter = open(&rig, "meter-3", &["SHARED"], 30).await;
    connected(&rig, &t_meter).await;
    let (_src_meter, meter_addrs) = ready_source(&rig.emu, &t_meter, "SHARED=0").await;
    transfer(&meter_addrs, "SHARED", 3).await;
    transfer(&plc_addrs, "SHARED", 4).await;
    assert_eq!(
        (plc.accepted(), cam.accepted(), meter.accepted()),
        (2, 1, 1)
    );
    assert!(rig.emu.is_connected(&t_plc.tunnel_id, Mode::Destination));
    assert!(!rig.emu.is_connected(&t_cam2.tunnel_id, Mode::Destination));
    assert_eq!(
        agent.count("session started"),
        4,
        "PLC-42 kept its first session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_thing_cap_refuses_that_things_extra_tunnel_only() {
    let rig = Rig::start(RigOptions {
        extra_acl: "user gw-cap\ntopic read $aws/things/PLC-1/tunnels/notify",
        ..RigOptions::default()
    })
    .await;
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let e = echo.addr.unwrap();
    let cfg = rig.agent_config_with(
        "gw-cap",
        &ConfigExtra {
            services: &format!("SSH = \"{e}\""),
            rest: &format!(
                "[things.PLC-1]\nmax_tunnels = 1\n[things.PLC-1.services]\nHTTP = \"{e}\"\nMODBUS = \"{e}\"\n"
            ),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let first = open(&rig, "PLC-1", &["HTTP"], 30).await;
    connected(&rig, &first).await;
    let second = open(&rig, "PLC-1", &["MODBUS"], 30).await;
    let line = agent.expect("notify refused").await;
    assert!(line.contains("things.PLC-1.max_tunnels"), "{line}");
    assert!(!rig.emu.is_connected(&second.tunnel_id, Mode::Destination));
    let own = open(&rig, "gw-cap", &["SSH"], 30).await;
    connected(&rig, &own).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_things_session_rejoins_after_a_restart_unless_the_thing_was_removed() {
    let rig = Rig::start(RigOptions {
        extra_acl: "user gw-rejoin\ntopic read $aws/things/PLC-7/tunnels/notify\n\
                    topic read $aws/things/PLC-8/tunnels/notify",
        ..RigOptions::default()
    })
    .await;
    let plc = echo_tcp("127.0.0.1:0").await.unwrap();
    let things = |with_plc8: bool| {
        let mut t = format!(
            "[things.PLC-7.services]\nHTTP = \"{}\"\n",
            plc.addr.unwrap()
        );
        if with_plc8 {
            t += &format!(
                "[things.PLC-8.services]\nHTTP = \"{}\"\n",
                plc.addr.unwrap()
            );
        }
        t
    };
    let cfg = rig.agent_config_with(
        "gw-rejoin",
        &ConfigExtra {
            services: "SSH = 22",
            rest: &things(true),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    let t7 = open(&rig, "PLC-7", &["HTTP"], 30).await;
    let t8 = open(&rig, "PLC-8", &["HTTP"], 30).await;
    connected(&rig, &t7).await;
    connected(&rig, &t8).await;
    assert_eq!(agent.session_files(), 2);

    // Killed; PLC-8 is removed from the configuration while the agent is down.
    agent.kill9().await;
    let (id7, id8) = (t7.tunnel_id.clone(), t8.tunnel_id.clone());
    until(&rig.emu, "the service sees the gateway gone", |e| {
        !e.is_connected(&id7, Mode::Destination) && !e.is_connected(&id8, Mode::Destination)
    })
    .await;
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&things(true), &things(false))).unwrap();
    let mut agent = rig.spawn_agent(&cfg);
    // Sessions are resumed (or dropped) before MQTT subscribes, in the order of their files.
    agent.expect("subscribed to tunnel notifications").await;
    assert_eq!(
        agent.count("persisted session dropped: the thing is no longer configured"),
        1
    );
    assert_eq!(agent.count("session resumed with its tokens"), 1);
    let id = t7.tunnel_id.clone();
    until(&rig.emu, "PLC-7's session rejoins", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t7, "HTTP=0").await;
    transfer(&addrs, "HTTP", 9).await;
    assert_eq!(agent.session_files(), 1);
    assert!(!rig.emu.is_connected(&t8.tunnel_id, Mode::Destination));
}

/// Subscriptions never starve: sets of 49 downstream things are swapped in by reload until
/// 147 were removed, so every CONNACK queues the most unsubscribes the agent remembers; after
/// the broker restarts, the gateway's own notify is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_many_removed_things_a_reconnect_still_subscribes_the_gateways_own_topic() {
    let mut rig = Rig::start(RigOptions::default()).await;
    let own = echo_tcp("127.0.0.1:0").await.unwrap();
    let set = |n: usize| -> String {
        (0..49)
            .map(|i| format!("[things.t{n}-{i}.services]\nHTTP = 80\n"))
            .collect()
    };
    let cfg = rig.agent_config_with(
        "gw-swap",
        &ConfigExtra {
            services: &format!("SSH = \"{}\"", own.addr.unwrap()),
            mqtt: "reconnect_spread_secs = 0",
            rest: &set(0),
            ..ConfigExtra::default()
        },
    );
    let mut agent = rig.spawn_agent(&cfg);
    agent.expect("subscribed to tunnel notifications").await;
    for n in 1..4 {
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, text.replace(&set(n - 1), &set(n))).unwrap();
        agent.signal(libc::SIGHUP);
        agent.expect("service map reloaded").await;
    }
    rig.mosquitto.restart().await;
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, "gw-swap", &["SSH"], 30).await;
    connected(&rig, &t).await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    transfer(&addrs, "SSH", 7).await;
    assert!(
        !agent.log.text().contains("cannot queue"),
        "a request found no room"
    );
}
