//! A new binary's trial run, before it replaces the running one. A binary can pass
//! `check-config` and still die in `run` (a crash, a missing library, an exit before it is
//! ready); executed in place, it would leave the gateway without an agent. So the running
//! agent, once its bridges are stopped and its sessions are on disk, starts the candidate as
//! a child with the same arguments and waits for its READY=1 (on a private notify socket,
//! so the service manager hears nothing of it) for at most `TRIAL_READY`. Ready: the child
//! stops and the candidate is executed in place (same PID, as systemd and procd expect).
//! Not ready: the child is stopped and the running version starts again, saying why (log,
//! `status`), and does not try the same file again. The service manager never sees the
//! trial: it is the same process throughout, fed its watchdog while it waits.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use tokio::net::UnixDatagram;
use tracing::{info, warn};

use crate::systemd;
use crate::upgrade::Candidate;

/// How long a candidate gets to become ready in its trial run.
pub const TRIAL_READY: Duration = Duration::from_secs(30);
/// How long the trial child gets to stop (it drains its tunnels for up to 5 s).
const TRIAL_STOP: Duration = Duration::from_secs(10);

/// The last rollback of this process, for `status`: (SHA-256 of the file, why). One per
/// process: it outlives the agent run that saw it.
static ROLLED_BACK: Mutex<Option<(String, String)>> = Mutex::new(None);

/// The last rollback of this process: (SHA-256 of the refused file, why).
pub fn rolled_back() -> Option<(String, String)> {
    ROLLED_BACK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Runs `candidate` with this process's arguments until it is ready (`Ok`) or fails to be
/// (`Err` with why); the child is stopped either way. `runtime_dir` holds the private notify
/// socket.
pub async fn trial(candidate: &Candidate, runtime_dir: &Path) -> Result<(), String> {
    let socket_path = runtime_dir.join(format!("trial-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket_path);
    let socket = UnixDatagram::bind(&socket_path).map_err(|e| {
        format!(
            "cannot make its notify socket {}: {e}",
            socket_path.display()
        )
    })?;
    let _cleanup = RemoveOnDrop(socket_path.clone());
    let mut cmd = std::process::Command::new(candidate.exec_path());
    // SAFETY: prctl is async-signal-safe. The child dies with us: were this process killed
    // (procd's SIGKILL after term_timeout), no second agent would live on.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd
        .args(std::env::args_os().skip(1))
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("WATCHDOG_PID")
        .env_remove("WATCHDOG_USEC")
        .stdin(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start it: {e}"))?;
    let mut child = TrialChild::watch(child);
    info!(
        pid = child.pid,
        "trial run of the new binary: waiting for it to be ready"
    );
    let outcome = tokio::select! {
        status = &mut child.exited => {
            child.reaped = true;
            Err(match status {
                Ok(Ok(s)) => format!("it exited ({s}) before it was ready"),
                Ok(Err(e)) => format!("cannot wait for it: {e}"),
                Err(e) => format!("cannot wait for it: {e}"),
            })
        }
        ready = ready(&socket) => ready,
        _ = tokio::time::sleep(TRIAL_READY) => {
            Err(format!("it was not ready within {}s", TRIAL_READY.as_secs()))
        }
    };
    child.stop().await;
    outcome
}

/// The trial child, waited for on a blocking thread; killed if dropped before it was reaped
/// (the trial given up half-way).
struct TrialChild {
    pid: i32,
    exited: tokio::task::JoinHandle<std::io::Result<std::process::ExitStatus>>,
    reaped: bool,
}

impl TrialChild {
    fn watch(mut child: std::process::Child) -> Self {
        TrialChild {
            pid: child.id() as i32,
            exited: tokio::task::spawn_blocking(move || child.wait()),
            reaped: false,
        }
    }

    /// SIGTERM, then SIGKILL if it has not stopped within `TRIAL_STOP`.
    async fn stop(&mut self) {
        if self.reaped {
            return;
        }
        self.signal(libc::SIGTERM);
        if tokio::time::timeout(TRIAL_STOP, &mut self.exited)
            .await
            .is_err()
        {
            self.signal(libc::SIGKILL);
            let _ = (&mut self.exited).await;
        }
        self.reaped = true;
    }

    fn signal(&self, sig: i32) {
        // SAFETY: our own child, not reaped yet (its waiter has not returned).
        unsafe {
            libc::kill(self.pid, sig);
        }
    }
}

impl Drop for TrialChild {
    fn drop(&mut self) {
        if !self.reaped {
            self.signal(libc::SIGKILL);
        }
    }
}

/// Records a rollback for `status` and says so.
pub fn record_rollback(candidate: &Candidate, why: &str) {
    let sha = candidate.identity().sha256_hex();
    warn!(
        path = %candidate.path().display(),
        sha256 = %sha,
        "rolled back: the new binary failed its trial run ({why}); the running version goes on and will not try this file again"
    );
    *ROLLED_BACK.lock().unwrap_or_else(|e| e.into_inner()) = Some((sha, why.to_owned()));
    crate::upgrade::refuse_for_process(candidate);
}

/// Waits for READY=1 on the trial's notify socket, feeding our own watchdog meanwhile.
async fn ready(socket: &UnixDatagram) -> Result<(), String> {
    let mut buf = vec![0u8; 4096];
    let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
    loop {
        let tick = async {
            match watchdog.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick => systemd::watchdog(),
            got = socket.recv(&mut buf) => {
                let n = got.map_err(|e| format!("its notify socket failed: {e}"))?;
                if is_ready(&buf[..n]) {
                    return Ok(());
                }
            }
        }
    }
}

/// Rule (trial readiness): a notify message with a `READY=1` line.
pub fn is_ready(message: &[u8]) -> bool {
    message
        .split(|b| *b == b'\n')
        .any(|line| line == b"READY=1")
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_ready_line_counts() {
        assert!(is_ready(b"READY=1\nSTATUS=subscribed\n"));
        assert!(is_ready(b"STATUS=x\nREADY=1"));
        assert!(!is_ready(b"STATUS=READY=1\n"));
        assert!(!is_ready(b"WATCHDOG=1\n"));
    }
}
