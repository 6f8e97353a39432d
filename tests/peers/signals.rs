//! Signals, reloads and the service manager: `run` exits 0 on SIGTERM and SIGINT, SIGHUP
//! reloads the service map (and an invalid file keeps the old one), SIGHUP during start-up
//! never kills, a bad config exits 2 (which the unit does not restart), systemd's READY,
//! STATUS and WATCHDOG.

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::testkit::echo_tcp;

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
async fn sighup_reloads_the_service_map_and_live_tunnels_keep_running() {
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, first) = agent(&rig, "gw-hup", &["SSH"], "").await;
    let t = open(&rig, "gw-hup", &["SSH"], 30).await;
    agent.expect("session started").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (_src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let mut held = live_client(addrs.get("SSH")).await;

    // Point SSH somewhere else and reload.
    let second = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.files.dir.join("gw-hup.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &first.addr.unwrap().to_string(),
        &second.addr.unwrap().to_string(),
    );
    std::fs::write(&cfg, text).unwrap();
    let pid = agent.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let line = agent.expect("service map reloaded").await;
    assert!(line.contains(&second.addr.unwrap().to_string()), "{line}");

    // New streams go to the new endpoint; the live connection still works, on the old one.
    transfer(&addrs, "SSH", 7).await;
    assert_eq!(second.accepted(), 1);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    held.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    within(
        "the live connection still echoes",
        held.read_exact(&mut buf),
    )
    .await
    .unwrap();
    assert_eq!(&buf, b"still");
    assert_eq!(
        first.closed(),
        0,
        "a live connection was dropped by the reload"
    );
    assert_eq!(agent.count("session started"), 1);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_2_which_the_unit_does_not_restart() {
    let rig = Rig::start(RigOptions::default()).await;
    let cfg = rig.agent_config("gw-bad", "SSH = 99999", "");
    let mut agent = rig.spawn_agent(&cfg);
    let status = within("the agent exits", agent.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(2));
    // The log reader may still be behind the exit: wait for the line.
    agent.expect("\"99999\" is not a port number").await;
    let unit = include_str!("../../packaging/systemd/securetunnel-agent.service");
    assert!(unit.contains("\nRestartPreventExitStatus=2\n"), "{unit}");
    assert!(unit.contains("\nStartLimitBurst="), "{unit}");
    assert!(
        !unit.contains("ExecStartPre="),
        "check-config before run would fail the start outside RestartPreventExitStatus"
    );
}

async fn datagram(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let n = within("a notify datagram", sock.recv(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_gets_ready_with_the_broker_down_then_status_and_watchdog() {
    let rig = Rig::start(RigOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&sock_path).unwrap();
    // No broker where the agent looks: a gateway that boots offline.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().port();
    drop(closed);
    let cfg = rig.agent_config_with(
        "gw-sd",
        &crate::common::rig::ConfigExtra {
            services: "SSH = 22",
            mqtt_port: Some(nowhere),
            ..Default::default()
        },
    );
    let mut agent = rig.spawn_agent_with_env(
        &cfg,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    );
    let ready = within("READY=1 with the broker down", async {
        loop {
            let m = datagram(&sock).await;
            if m.contains("READY=1") {
                break m;
            }
        }
    })
    .await;
    assert!(ready.contains("MQTT connecting"), "{ready}");
    // Offline: STATUS= says why, and the watchdog keeps being fed.
    let mut why = false;
    let mut watchdogs = 0;
    while !why || watchdogs < 2 {
        let m = datagram(&sock).await;
        why |= m.contains("STATUS=0 tunnel(s) live; MQTT connecting (last error:");
        watchdogs += m.matches("WATCHDOG=1").count();
    }
    assert_eq!(agent.count("subscribed"), 0);
    agent.child.start_kill().unwrap();
}
