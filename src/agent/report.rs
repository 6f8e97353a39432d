//! What the agent says about itself: status.json, the live status socket's snapshot,
//! systemd's one-line STATUS=, and a warning when the descriptor limit is too low.

use tokio::time::Instant;
use tracing::{debug, warn};

use super::Agent;
use crate::config::Config;
use crate::mqtt::{MqttPhase, MqttState};
use crate::shadow;
use crate::status::{Snapshot, StatusSocket, TunnelStatus};
use crate::systemd;
use crate::upgrade::Upgrader;

/// Characters of the last MQTT error shown in STATUS=.
const STATUS_ERROR_CHARS: usize = 160;

impl Agent {
    /// Only systemd's one line: status.json is rewritten when the tunnel table changes, not
    /// on every MQTT reconnect attempt of an offline gateway (flash wear).
    pub(super) fn on_mqtt_state(&mut self) {
        let tunnels = self.lifecycle.table().entries().len();
        systemd::status(&status_line(tunnels, &self.mqtt.borrow()));
    }

    /// The table with each bridge's state and counters, now.
    pub(super) fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let tunnels = self
            .lifecycle
            .table()
            .entries()
            .iter()
            .map(|e| match self.live.get(&e.id) {
                Some(l) => TunnelStatus::of(e, Some((&l.state.borrow(), &l.stats)), now),
                None => TunnelStatus::of(e, None, now),
            })
            .collect();
        let things: Vec<String> = self.cfg.things.keys().cloned().collect();
        let mut snapshot = Snapshot::new(&self.mqtt.borrow(), &things, tunnels);
        snapshot.upgrade_pending_since = self
            .upgrade
            .as_ref()
            .and_then(Upgrader::pending_since)
            .map(crate::status::unix);
        snapshot.consent = consent_text(&self.consent);
        let (file, mqtt) = self.audit.dropped();
        snapshot.audit_dropped = crate::status::AuditDropped { file, mqtt };
        snapshot
    }

    /// With `[shadow] enabled`: the report the MQTT client publishes, now.
    pub(super) fn update_shadow(&self) {
        if self.shadow.is_some() {
            self.refresh_shadow(&self.snapshot());
        }
    }

    /// The shadow report from `snapshot`, handed over only if it changed.
    fn refresh_shadow(&self, snapshot: &Snapshot) {
        if let Some(tx) = &self.shadow {
            let report = shadow_report(snapshot);
            tx.send_if_modified(|current| {
                let changed = *current != report;
                *current = report;
                changed
            });
        }
    }

    /// Writes status.json and systemd's STATUS= (and refreshes the shadow report); returns
    /// the STATUS= line.
    pub(super) fn write_status(&self) -> String {
        let snapshot = self.snapshot();
        self.refresh_shadow(&snapshot);
        let line = status_line(snapshot.tunnels.len(), &self.mqtt.borrow());
        systemd::status(&line);
        if let Err(e) = self.status.write(&snapshot) {
            debug!(path = %self.status.path().display(), "status not written: {e}");
        }
        line
    }
}

/// Rule: what the fleet sees of the agent's table: per tunnel its thing, services, phase,
/// since when connected, open connections and last error; never a token.
pub fn shadow_report(snapshot: &Snapshot) -> shadow::Report {
    let tunnels = snapshot
        .tunnels
        .iter()
        .map(|t| shadow::Tunnel {
            thing: t.thing.clone(),
            services: t.services.clone(),
            phase: t.phase.clone(),
            since: t.connected_since,
            open_connections: t.open_connections.values().sum(),
            last_error: t.last_error.as_deref().map(shadow::error_text),
        })
        .collect();
    shadow::Report {
        consent: snapshot.consent.clone(),
        tunnels,
    }
}

/// Rule (consent shown): "always", or "granted"/"withheld" with the services it covers
/// when it covers only some.
pub fn consent_text(gate: &crate::consent::Gate) -> String {
    let state = crate::consent::state_name(gate);
    match gate.services() {
        [] => state.to_owned(),
        some => format!("{state} for {}", some.join(", ")),
    }
}

/// Rule: systemd's one-line STATUS=: live tunnels and the MQTT phase, with the last MQTT
/// error while it is not subscribed (cut to `STATUS_ERROR_CHARS`).
pub fn status_line(tunnels: usize, mqtt: &MqttState) -> String {
    let phase = format!("{:?}", mqtt.phase).to_lowercase();
    match (&mqtt.last_error, mqtt.phase) {
        (Some(e), p) if p != MqttPhase::Subscribed => {
            let e: String = e.chars().take(STATUS_ERROR_CHARS).collect();
            format!("{tunnels} tunnel(s) live; MQTT {phase} (last error: {e})")
        }
        _ => format!("{tunnels} tunnel(s) live; MQTT {phase}"),
    }
}

/// The next status client; pending forever without a socket. An accept error (descriptors
/// exhausted) is skipped: the agent's work matters more than its status.
pub(super) async fn accept_status(socket: Option<&StatusSocket>) -> Option<tokio::net::UnixStream> {
    match socket {
        Some(s) => s.accept().await.ok(),
        None => std::future::pending().await,
    }
}

/// Outside systemd the descriptor limit is the shell's (often 1024): say when the
/// configured limits could exceed it.
pub(super) fn check_descriptor_limit(cfg: &Config) {
    let (needed, _) = crate::config::resource_needs(&cfg.limits);
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))?
                .split_whitespace()
                .nth(3)?
                .parse::<u64>()
                .ok()
        });
    if let Some(soft) = soft.filter(|s| *s < needed) {
        warn!(
            needed,
            limit = soft,
            "the open-files limit is lower than the configured limits can need: connections may fail with 'too many open files'; raise it (ulimit -n, LimitNOFILE) or lower limits.max_tunnels / limits.max_connections_per_tunnel"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_last_mqtt_error_until_subscribed() {
        let mut m = MqttState::connecting();
        assert_eq!(status_line(2, &m), "2 tunnel(s) live; MQTT connecting");
        m.last_error = Some("connection refused".into());
        assert_eq!(
            status_line(2, &m),
            "2 tunnel(s) live; MQTT connecting (last error: connection refused)"
        );
        m.last_error = Some("x".repeat(1000));
        assert!(status_line(0, &m).len() < 250);
        m.phase = MqttPhase::Subscribed;
        assert_eq!(status_line(1, &m), "1 tunnel(s) live; MQTT subscribed");
    }

    #[test]
    fn the_shadow_reports_each_tunnel_without_its_token_and_sums_its_connections() {
        let tunnel: TunnelStatus = serde_json::from_value(serde_json::json!({
            "id": 7, "thing": "plc-1", "region": "eu-west-1", "services": ["HTTP", "SSH"],
            "token": "token:0badf00d", "rotations": 1, "age_secs": 30,
            "expires_in_secs": 600, "phase": "connected", "next_attempt_in_secs": null,
            "connected_since": 1796000000, "channel_id": "ch-1",
            "open_connections": {"HTTP": 2, "SSH": 1}, "bytes_from_tunnel": 5,
            "bytes_to_tunnel": 6, "reconnects": 0, "last_error": "e".repeat(500)
        }))
        .unwrap();
        let snapshot = Snapshot::new(&MqttState::connecting(), &[], vec![tunnel]);
        let report = shadow_report(&snapshot);
        assert_eq!(report.consent, "always");
        let t = &report.tunnels[0];
        assert_eq!((t.thing.as_str(), t.phase.as_str()), ("plc-1", "connected"));
        assert_eq!(t.services, ["HTTP", "SSH"]);
        assert_eq!((t.since, t.open_connections), (Some(1796000000), 3));
        assert_eq!(
            t.last_error.as_ref().map(|e| e.len()),
            Some(shadow::MAX_ERROR_CHARS)
        );
        let doc = shadow::document(&report, 1);
        assert!(!doc.contains("0badf00d") && !doc.contains("ch-1"), "{doc}");
    }

    #[test]
    fn consent_shows_the_services_it_covers_when_it_covers_only_some() {
        use crate::consent::Gate;
        assert_eq!(consent_text(&Gate::always()), "always");
        let (tx, rx) = tokio::sync::watch::channel(false);
        assert_eq!(consent_text(&Gate::new(rx.clone(), &[])), "withheld");
        let ssh = Gate::new(rx, &["SSH".to_owned(), "VNC".to_owned()]);
        assert_eq!(consent_text(&ssh), "withheld for SSH, VNC");
        tx.send_replace(true);
        assert_eq!(consent_text(&ssh), "granted for SSH, VNC");
    }
}
