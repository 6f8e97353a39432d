//! README claims about the agent process that other tests do not cover: where the data plane
//! is, what status.json holds, signals and exit codes, reloads. Each runs the agent binary
//! against mosquitto and the emulator.

mod common;

use common::e2e::*;
use common::rig::{ConfigExtra, DATA_HOST, Rig, RigOptions};
use common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

fn signal(agent: &common::rig::AgentProc, sig: i32) {
    // SAFETY: kill(2) with a live child's pid and a valid signal number.
    assert_eq!(unsafe { libc::kill(agent.pid() as i32, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_plane_endpoint_comes_from_the_notifys_region() {
    // No tunnel.endpoint: the agent derives data.tunneling.iot.us-east-1.amazonaws.com from
    // the notify, verifies that name in TLS, and reaches it through tunnel.resolve.
    let rig = Rig::start(RigOptions::default()).await;
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
    signal(&agent, sig);
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

    // A broken file: the reload is refused with the reason, the old map keeps serving.
    std::fs::write(
        &cfg,
        good.replace("[services]", "[services]\nBAD = \"no such\""),
    )
    .unwrap();
    signal(&agent, libc::SIGHUP);
    let line = agent
        .expect("reload failed, keeping the current service map")
        .await;
    assert!(agent.log.text().contains("BAD"), "{line}");
    transfer(&addrs, "SSH", 1).await;
    transfer(&addrs, "WEB", 2).await;

    // WEB removed: its new streams are refused, SSH still served, the tunnel lives on.
    let web_line = format!("WEB = \"{}\"\n", echo.addr.unwrap());
    assert!(good.contains(&web_line), "{good}");
    std::fs::write(&cfg, good.replace(&web_line, "")).unwrap();
    signal(&agent, libc::SIGHUP);
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
