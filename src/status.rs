//! What the agent is doing, for operators and supervisors: a JSON snapshot written
//! atomically to `<state_dir>/status.json` whenever the tunnel table changes. Tokens appear
//! only as `token:<hash>`.

use std::path::{Path, PathBuf};

use serde::Serialize;
use tokio::time::Instant;

use crate::session::Entry;

#[derive(Debug, Serialize)]
pub struct TunnelStatus {
    pub id: u64,
    pub region: String,
    pub services: Vec<String>,
    pub token: String,
    pub rotations: u32,
    pub age_secs: u64,
    /// The agent's own end for this token; `None` until its first connect.
    pub expires_in_secs: Option<u64>,
    pub phase: String,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub mqtt: String,
    pub tunnels: Vec<TunnelStatus>,
}

impl TunnelStatus {
    pub fn of(e: &Entry, phase: &str, now: Instant) -> Self {
        TunnelStatus {
            id: e.id,
            region: e.key.region.clone(),
            services: e.key.services.clone(),
            token: e.token.clone(),
            rotations: e.rotations,
            age_secs: now.saturating_duration_since(e.created).as_secs(),
            expires_in_secs: e
                .deadline
                .map(|d| d.saturating_duration_since(now).as_secs()),
            phase: phase.to_owned(),
        }
    }
}

pub struct StatusFile {
    path: PathBuf,
}

impl StatusFile {
    pub fn new(state_dir: &Path) -> Self {
        StatusFile {
            path: state_dir.join("status.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write-then-rename, so a reader never sees half a file.
    pub fn write(&self, snapshot: &Snapshot) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// The systemd service-manager protocol (`Type=notify`): no-ops when not run by systemd.
pub mod systemd {
    use std::time::Duration;

    use sd_notify::NotifyState;

    fn send(states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("sd_notify: {e}");
        }
    }

    /// READY=1 with the status that justifies it (MQTT subscribed), in one message.
    pub fn ready(status: &str) {
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn status(text: &str) {
        send(&[NotifyState::Status(text)]);
    }

    pub fn stopping() {
        send(&[NotifyState::Stopping]);
    }

    /// Before re-executing a new binary (same PID): reloading until its READY=1.
    pub fn reexecuting() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    /// RELOADING=1 with the monotonic timestamp newer systemd requires, then READY=1.
    pub fn reloading() {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        send(&[NotifyState::Ready]);
    }

    pub fn watchdog() {
        send(&[NotifyState::Watchdog]);
    }

    /// Half of `WatchdogSec=`, when systemd asked for a watchdog for this process.
    pub fn watchdog_interval() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(100)))
    }
}
