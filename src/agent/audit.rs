//! The agent's part of the audit trail: its sinks started, and the tunnel steps only the
//! agent sees (a notify accepted or refused, a rotation, a session's end with its totals,
//! site consent). Connects and local connections are recorded by the bridges.

use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tracing::warn;

use super::{Agent, Live};
use crate::audit::{Event, FileSink, Kind, Trail};
use crate::bridge::{BridgeEnd, BridgeError};
use crate::config::Config;
use crate::mqtt::Notification;
use crate::tunnels::{Expiry, SessionExit};

/// The trail of `cfg`: the journal, the file in the state directory (unless off), and the
/// queue the MQTT client publishes from (with `audit.mqtt_topic`).
pub(super) fn start(cfg: &Config) -> (Trail, Option<mpsc::Receiver<String>>) {
    let file = cfg.audit.file.and_then(|bound| {
        FileSink::start(&cfg.state_dir, bound)
            .inspect_err(|e| {
                warn!(dir = %cfg.state_dir.display(), "the audit file cannot be written: {e}; audit events go to the journal only")
            })
            .ok()
    });
    let (tx, rx) = match &cfg.audit.mqtt_topic {
        Some(_) => {
            let (tx, rx) = mpsc::channel(crate::audit::MQTT_QUEUE);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    (Trail::new(file, tx), rx)
}

impl Agent {
    /// A notify's outcome: accepted (`kind` NotifyAccepted or Rotated) or refused (`why`).
    pub(super) fn audit_notify(&self, n: &Notification, kind: Kind, why: Option<&str>) {
        let mut e = Event {
            tunnel: Some(n.token.to_string()),
            region: Some(n.region.clone()),
            services: Some(n.services.clone()),
            ..Event::new(kind, &n.thing)
        };
        if let Some(why) = why {
            e = e.because(why);
        }
        self.audit.record(&e);
    }

    /// A rotation: the new token's session replaces the one of `old`.
    pub(super) fn audit_rotation(&self, n: &Notification, old: u64) {
        let mut e = Event {
            tunnel: Some(n.token.to_string()),
            region: Some(n.region.clone()),
            services: Some(n.services.clone()),
            ..Event::new(Kind::Rotated, &n.thing)
        };
        e.replaces = self.live.get(&old).map(|l| l.audit.tunnel().to_owned());
        self.audit.record(&e);
    }

    /// Site consent changed.
    pub(super) fn audit_consent(&self) {
        let Some(settings) = &self.cfg.consent else {
            return;
        };
        let kind = match crate::consent::state_name(&self.consent) {
            "granted" => Kind::ConsentGranted,
            _ => Kind::ConsentWithdrawn,
        };
        let e = Event {
            services: Some(settings.services.clone()).filter(|s| !s.is_empty()),
            ..Event::new(kind, &self.cfg.thing_name)
        };
        self.audit
            .record(&e.because(&format!("file {}", settings.path.display())));
    }
}

/// Rule (end reason): why a session ended, for the log and the audit trail; a retired
/// bridge stopped once its successor connected was replaced by a rotation.
pub(super) fn end_reason(
    result: &Result<BridgeEnd, BridgeError>,
    expired: Option<Expiry>,
    retired: bool,
) -> String {
    match result {
        Ok(BridgeEnd::ClosedByService { code, reason }) => {
            format!("closed by the service (code {code}, {reason:?})")
        }
        Ok(_) if expired == Some(Expiry::Lifetime) => {
            "the agent's maximum lifetime for this token ended".to_owned()
        }
        Ok(_) if expired == Some(Expiry::NeverConnected) => {
            "it never connected within 12 h of its notify".to_owned()
        }
        Ok(BridgeEnd::Retired) => "replaced by a rotation".to_owned(),
        Ok(BridgeEnd::Cancelled) if retired => "replaced by a rotation".to_owned(),
        Ok(BridgeEnd::Cancelled) => "stopped".to_owned(),
        Err(e) => format!("token rejected: {e}"),
    }
}

/// A session ended: closed or expired, with its totals.
/// Rule (stop reason): at the agent's stop, a session the stop cancelled "the agent
/// stopped"; one that had ended on its own just before keeps its own reason.
pub(super) fn stop_reason(exit: &SessionExit, retired: bool) -> String {
    match exit.result {
        Ok(BridgeEnd::Cancelled) if !retired && exit.expired.is_none() => {
            "the agent stopped".to_owned()
        }
        _ => end_reason(&exit.result, exit.expired, retired),
    }
}

pub(super) fn record_end(live: &Live, expired: Option<Expiry>, why: &str) {
    let kind = match expired {
        Some(_) => Kind::Expired,
        None => Kind::Closed,
    };
    let stats = &live.stats;
    let e = Event {
        channel: live.state.borrow().channel_id.clone(),
        connections: Some(stats.connections_opened.load(Ordering::Relaxed)),
        refused: Some(stats.refused_streams.load(Ordering::Relaxed)),
        bytes_from_tunnel: Some(stats.bytes_from_tunnel.load(Ordering::Relaxed)),
        bytes_to_tunnel: Some(stats.bytes_to_tunnel.load(Ordering::Relaxed)),
        duration_ms: Some(live.started.elapsed().as_millis() as u64),
        ..live.audit.event(kind)
    };
    live.audit.record(&e.because(why));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retired_bridge_stopped_by_its_successor_was_replaced_by_a_rotation() {
        let stopped = Ok(BridgeEnd::Cancelled);
        assert_eq!(end_reason(&stopped, None, true), "replaced by a rotation");
        assert_eq!(end_reason(&stopped, None, false), "stopped");
        let closed = Ok(BridgeEnd::ClosedByService {
            code: 1000,
            reason: "bye".into(),
        });
        assert_eq!(
            end_reason(&closed, None, true),
            "closed by the service (code 1000, \"bye\")"
        );
        assert_eq!(
            end_reason(&stopped, Some(Expiry::Lifetime), false),
            "the agent's maximum lifetime for this token ended"
        );
    }

    #[test]
    fn at_the_stop_a_session_that_ended_on_its_own_keeps_its_reason() {
        let exit = |result, expired| SessionExit {
            id: 1,
            result,
            expired,
        };
        let cancelled = exit(Ok(BridgeEnd::Cancelled), None);
        assert_eq!(stop_reason(&cancelled, false), "the agent stopped");
        assert_eq!(stop_reason(&cancelled, true), "replaced by a rotation");
        let expired = exit(Ok(BridgeEnd::Cancelled), Some(Expiry::Lifetime));
        assert!(stop_reason(&expired, false).contains("maximum lifetime"));
        let closed = exit(
            Ok(BridgeEnd::ClosedByService {
                code: 1000,
                reason: String::new(),
            }),
            None,
        );
        assert!(stop_reason(&closed, false).starts_with("closed by the service"));
    }
}
