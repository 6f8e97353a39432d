//! The systemd service-manager protocol (`Type=notify`): no-ops when not run by systemd.
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
