//! The agent's start: its state directory and session files opened, its parts built, the
//! persisted sessions rejoined, the MQTT client and the status socket started.

use std::collections::{BTreeMap, HashMap};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Agent, report};
use crate::config::{Checked, Config};
use crate::mqtt::{self, MqttState, Notice, NotifyClient};
use crate::persist::{Moment, PersistedSession, SessionStore};
use crate::persist_writer::PersistWriter;
use crate::services::SharedServiceMap;
use crate::status::{StatusFile, StatusSocket};
use crate::tunnels::{Connected, Ends, Lifecycle, SessionTable, TunnelKey, connect_deadline};
use crate::upgrade::Upgrader;

/// What `Agent::start` hands to the loop besides the agent.
pub(super) struct Started {
    /// The sessions on disk, and warnings about files that were not usable.
    pub persisted: (Vec<PersistedSession>, Vec<String>),
    pub downstream: watch::Receiver<Vec<String>>,
    pub mqtt_state: watch::Sender<MqttState>,
    pub connected: mpsc::Receiver<Connected>,
    /// Audit events for the MQTT client to publish (`audit.mqtt_topic`).
    pub audit_events: Option<mpsc::Receiver<String>>,
}

/// SIGHUP for reloads; without it (which should not happen) the agent runs on.
pub(super) fn hangup_signal() -> Option<Signal> {
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!("SIGHUP will not reload the service map: {e}");
            None
        }
    }
}

/// `things.<name>.max_tunnels`, for the session table.
pub(super) fn thing_caps(cfg: &Config) -> HashMap<String, usize> {
    cfg.things
        .iter()
        .filter_map(|(name, t)| t.max_tunnels.map(|cap| (name.clone(), cap)))
        .collect()
}

/// The session store, when sessions are persisted and its directory is usable.
fn open_store(cfg: &Config) -> Option<SessionStore> {
    if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
        warn!(dir = %cfg.state_dir.display(), "cannot create the state directory: {e}; status.json will not be written");
    }
    if !cfg.tunnel.persist_sessions {
        SessionStore::clear(&cfg.state_dir);
        return None;
    }
    SessionStore::open(&cfg.state_dir)
        .inspect_err(|e| error!("{e}; tunnels will not survive a restart"))
        .ok()
}

/// The gate every bridge asks, and the watch on the consent file behind it. A file that
/// cannot be watched withholds consent (fail closed), with the reason.
fn follow_consent(
    settings: Option<&crate::consent::Settings>,
) -> (crate::consent::Gate, Option<crate::consent::Watcher>) {
    let Some(s) = settings else {
        return (crate::consent::Gate::always(), None);
    };
    match crate::consent::Watcher::start(s.path.clone()) {
        Ok(w) => (w.gate(&s.services), Some(w)),
        Err(e) => {
            error!(path = %s.path.display(), "cannot watch the site consent file: {e}; consent is withheld until the agent restarts (check fs.inotify.max_user_instances and the path's directories)");
            let (_, withheld) = watch::channel(false);
            (crate::consent::Gate::new(withheld, &s.services), None)
        }
    }
}

/// Why a persisted session is dropped at start (`Agent::resume_one`).
#[derive(Debug, thiserror::Error)]
pub(super) enum Dropped {
    #[error("the thing is no longer configured")]
    ThingUnconfigured,
    #[error("its lifetime ended while the agent was down")]
    LifetimeEnded,
    #[error("it never connected within 12 h of its notify")]
    NeverConnected,
    #[error(transparent)]
    NotResumed(#[from] crate::tunnels::NotResumed),
    #[error("its bridge could not start")]
    BridgeFailed,
}

impl Agent {
    pub(super) async fn start(cfg: Config, checked: &Checked) -> (Agent, Started) {
        for w in &checked.warnings {
            warn!("{w}");
        }
        let store = open_store(&cfg);
        // Read off the runtime (flash can be slow); the files' writer thread owns them after.
        let persisted = match store.clone() {
            Some(st) => tokio::task::spawn_blocking(move || st.load())
                .await
                .unwrap_or_default(),
            None => Default::default(),
        };
        let store = store.and_then(|st| {
            PersistWriter::start(st)
                .inspect_err(|e| error!("cannot start the session-file thread: {e}; tunnels will not survive a restart"))
                .ok()
        });
        let mut maps = BTreeMap::new();
        maps.insert(
            cfg.thing_name.clone(),
            SharedServiceMap::new(cfg.services.clone()),
        );
        for (name, t) in &cfg.things {
            maps.insert(name.clone(), SharedServiceMap::new(t.services.clone()));
        }
        let (downstream_tx, downstream) = watch::channel(cfg.things.keys().cloned().collect());
        let (connected_tx, connected) = mpsc::channel(cfg.limits.max_tunnels * 2 + 4);
        report::check_descriptor_limit(&cfg);
        let (mqtt_state, mqtt) = watch::channel(MqttState::connecting());
        let limits = &cfg.limits;
        let mut table = SessionTable::new(limits.max_tunnels, limits.max_lifetime, cfg.rotation);
        table.set_thing_caps(thing_caps(&cfg));
        table.set_own_thing(&cfg.thing_name);
        let (consent, consent_watch) = follow_consent(cfg.consent.as_ref());
        let (audit, audit_events) = super::audit::start(&cfg);
        let agent = Agent {
            audit,
            consent,
            _consent_watch: consent_watch,
            maps,
            downstream_tx,
            lifecycle: Lifecycle::new(table),
            store,
            budget: crate::bridge::Budget::new(cfg.limits.max_buffered),
            lookups: crate::lookup::Lookups::default(),
            status: StatusFile::new(&cfg.state_dir),
            tunnel_tls: checked.tunnel_tls.clone(),
            bridges: JoinSet::new(),
            connected_tx,
            live: HashMap::new(),
            mqtt,
            upgrade: Upgrader::new(&cfg.path, cfg.upgrade_deadline),
            shadow: cfg
                .shadow
                .then(|| watch::channel(crate::shadow::Report::default()).0),
            cfg,
        };
        info!(thing = %agent.cfg.thing_name, downstream = ?agent.cfg.things.keys().collect::<Vec<_>>(), version = env!("CARGO_PKG_VERSION"), pid = std::process::id(), "agent started");
        let started = Started {
            persisted,
            downstream,
            mqtt_state,
            connected,
            audit_events,
        };
        (agent, started)
    }

    /// The MQTT client, as its own task; notices come out of the returned channel.
    pub(super) fn start_mqtt(
        &self,
        checked: &Checked,
        downstream: watch::Receiver<Vec<String>>,
        state: watch::Sender<MqttState>,
        audit_events: Option<mpsc::Receiver<String>>,
        cancel: &CancellationToken,
    ) -> (mpsc::Receiver<Notice>, JoinHandle<()>) {
        let (tx, notifications) = mpsc::channel(mqtt::QUEUE);
        let cfg = &self.cfg;
        let shadow = self.shadow.as_ref().map(watch::Sender::subscribe);
        let client = NotifyClient::new(cfg, checked.mqtt_tls.clone(), downstream, shadow)
            .with_audit(cfg, self.audit.clone(), audit_events);
        let spread = cfg.mqtt.reconnect_spread;
        let run = client
            .run(tx, state, cancel.clone(), spread)
            .instrument(info_span!("mqtt"));
        let task = if checked.identity.in_token {
            // The token signs each handshake synchronously, and a TPM takes tens to hundreds
            // of ms: the client runs on a thread of its own, so no bridge waits for it.
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || runtime.block_on(run))
        } else {
            tokio::spawn(run)
        };
        (notifications, task)
    }

    /// Live status for `securetunnel-agent status`; without it the agent still runs.
    pub(super) fn bind_status_socket(&self) -> Option<StatusSocket> {
        match StatusSocket::bind(&self.cfg.runtime_dir) {
            Ok(s) => {
                debug!(socket = %s.path().display(), "live status socket ready");
                Some(s)
            }
            Err(e) => {
                warn!(dir = %self.cfg.runtime_dir.display(), "no live status (securetunnel-agent status): cannot create the status socket: {e}");
                None
            }
        }
    }

    /// Starts a bridge for every persisted session whose lifetime is not over.
    pub(super) async fn resume(
        &mut self,
        (sessions, warnings): (Vec<PersistedSession>, Vec<String>),
    ) {
        for w in warnings {
            warn!("{w}");
        }
        let now_moment = Moment::now();
        for s in sessions {
            if let Err(why) = self.resume_one(&s, &now_moment) {
                info!(thing = %s.thing, region = %s.region, services = ?s.services, "persisted session dropped: {why}");
                self.forget(&s.file_id).await;
            }
        }
    }

    /// Rule (resume): a persisted session rejoins with its tokens unless its thing left the
    /// configuration, its lifetime ended while the agent was down, or it never connected
    /// within 12 h of its notify. Unknown elapsed time (clock unset or stepped across a
    /// reboot) starts the lifetime again at this connect; the service still enforces the
    /// real one.
    fn resume_one(&mut self, s: &PersistedSession, now_moment: &Moment) -> Result<(), Dropped> {
        let left = s
            .first_connected
            .as_ref()
            .and_then(|m| m.elapsed_until(now_moment))
            .map(|elapsed| {
                self.lifecycle
                    .table()
                    .max_lifetime()
                    .saturating_sub(elapsed)
            });
        if !self.maps.contains_key(&s.thing) {
            return Err(Dropped::ThingUnconfigured);
        }
        if left.is_some_and(|l| l.is_zero()) {
            return Err(Dropped::LifetimeEnded);
        }
        let now = Instant::now();
        let deadline = left.map(|l| now + l);
        // Counted from its notify across restarts; a file without it starts anew.
        let since_notify = s.received.as_ref().and_then(|m| m.since_notify(now_moment));
        let connect_by = match (&s.first_connected, connect_deadline(since_notify, now)) {
            (None, None) => return Err(Dropped::NeverConnected),
            (_, by) => by.unwrap_or(now),
        };
        let key = TunnelKey::new(&s.thing, &s.region, &s.services);
        let id = self
            .lifecycle
            .resume(key.clone(), &s.access_token, deadline, now)?;
        info!(session = id, region = %s.region, services = ?s.services, token = %s.access_token, "session resumed with its tokens");
        let ends = Ends {
            lifetime: deadline,
            connect_by,
        };
        let (token, client_token) = (s.access_token.clone(), s.client_token.clone());
        self.start_bridge(id, &key, token, client_token, Some(s.clone()), ends)
            .map_err(|_| Dropped::BridgeFailed)
    }
}
