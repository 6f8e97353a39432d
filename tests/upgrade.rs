//! Upgrades never cut a live connection: the binary is replaced under the running agent, the
//! open connection keeps moving data, and once it closes the agent re-executes the new binary
//! (same PID) and rejoins the tunnel with its tokens.
//!
//! By default the binary is replaced as a package manager does it (a new file renamed over
//! the old one). With `SECURETUNNEL_UPGRADE_DEBS="old.deb new.deb"` (CI, as root) the agent
//! runs from the installed package and the upgrade is `dpkg -i new.deb`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::e2e::*;
use common::rig::{Rig, RigOptions};
use common::*;
use securetunnel_agent::protocol::Mode;
use securetunnel_emulator::PeerEventKind;
use securetunnel_emulator::testkit::echo_tcp;

enum Install {
    /// A copy of the test build in a temporary directory.
    Copy(tempfile::TempDir),
    /// The package to upgrade to (the first one is installed at once).
    Debs(String),
}

impl Install {
    fn from_env() -> Install {
        match std::env::var("SECURETUNNEL_UPGRADE_DEBS") {
            Ok(v) => {
                let mut debs = v.split_whitespace().map(str::to_owned);
                let (Some(old), Some(new)) = (debs.next(), debs.next()) else {
                    panic!("SECURETUNNEL_UPGRADE_DEBS takes two .deb paths: old new");
                };
                dpkg(&["-i", &old]);
                Install::Debs(new)
            }
            Err(_) => {
                let dir = tempfile::tempdir().unwrap();
                std::fs::copy(
                    env!("CARGO_BIN_EXE_securetunnel-agent"),
                    dir.path().join("securetunnel-agent"),
                )
                .unwrap();
                Install::Copy(dir)
            }
        }
    }

    fn binary(&self) -> PathBuf {
        match self {
            Install::Copy(dir) => dir.path().join("securetunnel-agent"),
            Install::Debs(_) => PathBuf::from("/usr/bin/securetunnel-agent"),
        }
    }

    fn upgrade(&self) {
        match self {
            Install::Copy(dir) => {
                // A new file beside the old one, renamed over it, as dpkg does.
                let new = dir.path().join("securetunnel-agent.dpkg-new");
                std::fs::copy(env!("CARGO_BIN_EXE_securetunnel-agent"), &new).unwrap();
                std::fs::rename(&new, self.binary()).unwrap();
            }
            Install::Debs(new) => dpkg(&["-i", new]),
        }
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        if let Install::Debs(_) = self {
            let _ = Command::new("dpkg")
                .args(["--purge", "securetunnel-agent"])
                .status();
        }
    }
}

fn dpkg(args: &[&str]) {
    let out = Command::new("dpkg")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("dpkg runs");
    assert!(
        out.status.success(),
        "dpkg {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn running_binary(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_binary_is_re_executed_once_no_local_connection_is_open() {
    let install = Install::from_env();
    let rig = Rig::start(RigOptions::default()).await;
    let thing = "gw-upgrade";
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config(thing, &format!("SSH = \"{}\"", echo.addr.unwrap()), "");
    let mut agent = rig.spawn_agent_program(&install.binary(), &cfg, &[]);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(&rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let tokens = rig.emu.peer_tokens(&id, Mode::Destination).unwrap();
    let (mut src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    let held = live_client(addrs.get("SSH")).await;
    let pid = agent.pid();

    install.upgrade();
    agent.expect("a new agent binary was installed").await;
    agent
        .expect("re-executing the new binary once no local connection is open")
        .await;
    assert!(
        running_binary(pid).ends_with("(deleted)"),
        "still the old image"
    );
    // The operator's connection keeps moving data through the upgrade.
    within(
        "the held connection still echoes",
        securetunnel_emulator::testkit::echo_transfer(held, 1 << 20, 1),
    )
    .await
    .expect("the upgrade cut the live connection");

    // echo_transfer closed the connection: now the agent re-executes itself.
    agent.expect("re-executing it").await;
    agent.expect("agent started").await;
    assert_eq!(agent.pid(), pid, "same process");
    assert_eq!(
        running_binary(pid),
        install.binary().display().to_string(),
        "the new binary runs"
    );
    agent.expect("session resumed with its tokens").await;
    until(&rig.emu, "the tunnel is connected again", |e| {
        let connects = e
            .peer_events(&id)
            .into_iter()
            .filter(|ev| ev.mode == Mode::Destination && ev.kind == PeerEventKind::Connected)
            .count();
        connects == 2 && e.is_connected(&id, Mode::Destination)
    })
    .await;
    assert_eq!(rig.emu.peer_tokens(&id, Mode::Destination), Some(tokens));
    // The service resets the source's stream when the destination rejoins: connect after
    // that reset, as a user retrying would (before it, the new connection would be reset).
    src.wait_resets(1).await;
    transfer(&addrs, "SSH", 2).await;
    assert!(Path::new(&install.binary()).exists());
}
