//! Upgrades never cut a live connection: the binary is replaced under the running agent, the
//! open connection keeps moving data, and once it closes the agent re-executes the new binary
//! (same PID) and rejoins the tunnel with its tokens.
//!
//! By default the binary is replaced as a package manager does it (a new file renamed over
//! the old one). With `SECURETUNNEL_UPGRADE_DEBS="old.deb new.deb"` (CI, as root) the agent
//! runs from the installed package and the upgrade is `dpkg -i new.deb`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::e2e::*;
use crate::common::rig::{Rig, RigOptions};
use crate::common::*;
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

/// The agent tried the new binary and re-executed it: same process, new program.
async fn re_executed(agent: &mut crate::common::rig::AgentProc, pid: u32, binary: &Path) {
    agent
        .expect("the new binary was ready in its trial run: re-executing it")
        .await;
    agent.expect("agent started").await;
    assert_eq!(agent.pid(), pid, "same process");
    let running = running_binary(pid);
    assert_eq!(running, binary.display().to_string(), "the new binary runs");
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
    let (t, id) = open_connected(&rig, thing, &["SSH"]).await;
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

    // echo_transfer closed the connection: now the agent tries the new binary, then
    // re-executes it.
    re_executed(&mut agent, pid, &install.binary()).await;
    agent.expect("session resumed with its tokens").await;
    // The trial run may have connected it once too, before it was stopped.
    until(&rig.emu, "the tunnel is connected again", |e| {
        let connects = e
            .peer_events(&id)
            .into_iter()
            .filter(|ev| ev.mode == Mode::Destination && ev.kind == PeerEventKind::Connected)
            .count();
        connects >= 2 && e.is_connected(&id, Mode::Destination)
    })
    .await;
    assert_eq!(rig.emu.peer_tokens(&id, Mode::Destination), Some(tokens));
    // The service resets the source's stream when the destination rejoins: connect after
    // that reset, as a user retrying would (before it, the new connection would be reset).
    src.wait_resets(1).await;
    transfer(&addrs, "SSH", 2).await;
    assert!(Path::new(&install.binary()).exists());
}

/// A copy of the test build to run as the installed agent, and a way to replace it.
struct Installed {
    dir: tempfile::TempDir,
}

impl Installed {
    fn new() -> Installed {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            env!("CARGO_BIN_EXE_securetunnel-agent"),
            dir.path().join("securetunnel-agent"),
        )
        .unwrap();
        Installed { dir }
    }

    fn binary(&self) -> PathBuf {
        self.dir.path().join("securetunnel-agent")
    }

    /// Installs a shell script as the new binary, renamed into place as dpkg does.
    fn replace_with_script(&self, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let new = self.dir.path().join("securetunnel-agent.dpkg-new");
        std::fs::write(&new, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, self.binary()).unwrap();
    }
}

/// An agent from `installed` serving `thing` (SSH to an echo service), its tunnel connected
/// and a source ready.
async fn serving(
    rig: &Rig,
    installed: &Installed,
    thing: &str,
    tunnel: &str,
    top: &str,
) -> (
    crate::common::rig::AgentProc,
    securetunnel_emulator::TunnelTokens,
    SourceListenersAddrs,
    Running,
    securetunnel_emulator::testkit::EchoService,
) {
    let echo = echo_tcp("127.0.0.1:0").await.unwrap();
    let cfg = rig.agent_config_with(
        thing,
        &crate::common::rig::ConfigExtra {
            services: &format!("SSH = \"{}\"", echo.addr.unwrap()),
            tunnel,
            top,
            ..Default::default()
        },
    );
    let mut agent = rig.spawn_agent_program(&installed.binary(), &cfg, &[]);
    agent.expect("subscribed to tunnel notifications").await;
    let t = open(rig, thing, &["SSH"], 30).await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "agent connects", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    let (src, addrs) = ready_source(&rig.emu, &t, "SSH=0").await;
    (agent, t, addrs, src, echo)
}

/// The check never blocks the runtime: a new binary whose check-config hangs, then one that
/// prints without end. Meanwhile a transfer through the live tunnel moves and the agent keeps
/// pinging; after 10 s the agent says why it stays on the running version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_whose_check_hangs_or_talks_without_end_never_stalls_the_agent() {
    let installed = Installed::new();
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, t, addrs, _src, _echo) =
        serving(&rig, &installed, "gw-hang", "idle_timeout_secs = 3", "").await;
    let pid = agent.pid();
    for (n, body) in ["sleep 60", "yes"].into_iter().enumerate() {
        installed.replace_with_script(&format!(
            "case \"$1\" in check-config) {body};; *) exit 1;; esac"
        ));
        agent.expect("checking the new binary").await;
        let pings = rig.emu.pings_received(&t.tunnel_id, Mode::Destination);
        transfer(&addrs, "SSH", n as u64).await;
        let id = t.tunnel_id.clone();
        until(&rig.emu, "the agent keeps pinging", |e| {
            e.pings_received(&id, Mode::Destination) >= pings + 3
        })
        .await;
        let line = agent
            .expect("did not finish check-config within 10s; staying on the running version")
            .await;
        assert!(line.contains("trying again in 60s"), "{line}");
    }
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
    assert_eq!(agent.pid(), pid);
    transfer(&addrs, "SSH", 9).await;
}

/// Exec what was checked: a new binary that passes check-config and, while being checked,
/// has another file written over it in place (the same inode). What the agent executes is
/// never that other file: it is checked on its own (and refused here), and it never runs as
/// the agent; the running version serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_rewritten_after_its_check_is_not_executed() {
    let installed = Installed::new();
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _t, addrs, _src, _echo) =
        serving(&rig, &installed, "gw-swap-bin", "", "").await;
    let pid = agent.pid();
    let marker = installed.dir.path().join("unchecked-ran");
    let unchecked = installed.dir.path().join("unchecked");
    std::fs::write(
        &unchecked,
        format!(
            "#!/bin/sh\ncase \"$1\" in check-config) exit 2;; *) touch {};; esac\n",
            marker.display()
        ),
    )
    .unwrap();
    installed.replace_with_script(&format!(
        "case \"$1\" in check-config) cat {} > {}; exit 0;; *) exit 1;; esac",
        unchecked.display(),
        installed.binary().display()
    ));
    agent.expect("checking the new binary").await;
    agent
        .expect("refuses the configuration, staying on the running version")
        .await;
    assert!(
        !marker.exists(),
        "the file written after the check ran as the agent"
    );
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited"
    );
    assert_eq!(agent.pid(), pid);
    assert_eq!(agent.count("agent started"), 1, "it re-executed");
    transfer(&addrs, "SSH", 3).await;
}

/// An upgrade cannot be held off for ever: with a connection left open, the checked new
/// binary waits (`status` says since when), then runs once `upgrade_deadline_minutes` passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_connection_holds_an_upgrade_off_only_until_its_deadline() {
    let installed = Installed::new();
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, _t, addrs, _src, _echo) = serving(
        &rig,
        &installed,
        "gw-deadline",
        "",
        "upgrade_deadline_minutes = 0.1",
    )
    .await;
    let pid = agent.pid();
    let _held = live_client(addrs.get("SSH")).await;
    let new = installed.dir.path().join("securetunnel-agent.dpkg-new");
    std::fs::copy(env!("CARGO_BIN_EXE_securetunnel-agent"), &new).unwrap();
    std::fs::rename(&new, installed.binary()).unwrap();
    agent
        .expect("the new binary accepts the configuration")
        .await;
    agent
        .expect("re-executing the new binary once no local connection is open")
        .await;
    let status = agent.status();
    assert!(status["upgrade_pending_since"].is_u64(), "{status}");
    agent.expect("the upgrade waited its deadline").await;
    re_executed(&mut agent, pid, &installed.binary()).await;
}

/// A broken new version rolls back by itself: a binary that passes check-config but exits 1
/// in `run`. Its trial run fails, the running version starts again in the same process,
/// says so (log and status.json), serves the tunnel again within the documented bound
/// (trial 30 s, stop 10 s, rejoin), and does not try that file again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_dies_in_run_is_rolled_back_and_the_tunnel_served_again() {
    let installed = Installed::new();
    let rig = Rig::start(RigOptions::default()).await;
    let (mut agent, t, addrs, _src, _echo) = serving(&rig, &installed, "gw-rollback", "", "").await;
    let pid = agent.pid();
    installed.replace_with_script(
        "case \"$1\" in check-config) exit 0;; *) echo 'broken build' >&2; exit 1;; esac",
    );
    agent.expect("trial run of the new binary").await;
    let started = std::time::Instant::now();
    let line = agent
        .expect("rolled back: the new binary failed its trial run")
        .await;
    assert!(line.contains("exited"), "{line}");
    agent.expect("agent started").await;
    agent.expect("session resumed with its tokens").await;
    let id = t.tunnel_id.clone();
    until(&rig.emu, "the tunnel is served again", |e| {
        e.is_connected(&id, Mode::Destination)
    })
    .await;
    transfer(&addrs, "SSH", 4).await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(45),
        "the README says 45 s"
    );
    assert_eq!(agent.pid(), pid, "same process");
    let status = agent.status();
    assert!(
        status["upgrade_rolled_back"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("exited")),
        "{status}"
    );
    assert_eq!(agent.count("trial run of the new binary"), 1, "tried again");
}
