//! The agent's `[proxy]`: MQTT and the data plane through a real HTTP CONNECT proxy
//! (tinyproxy) with Basic credentials that never reach the output, a proxy that refuses the
//! broker named with the fix, a proxy that never ends its answer cut off. (`local-proxy`'s
//! HTTPS_PROXY/NO_PROXY are in `local_proxy`.)

use crate::common::e2e::*;
use crate::common::http_proxy::Tinyproxy;
use crate::common::rig::{ConfigExtra, Rig, RigOptions};
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

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
