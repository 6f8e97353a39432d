//! The agent: follows the notify topic and turns every destination token into a running
//! bridge. What a notify means and which bridge stops when is the lifecycle's
//! (`tunnels::Lifecycle`); this loop carries out its effects: bridges started and stopped,
//! session files written, status reported. Live sessions are persisted, so a restart
//! rejoins them; a replaced binary (package upgrade) is re-executed once no local
//! connection is open.
//!
//! `start` opens the state and rejoins persisted sessions, `reload` handles SIGHUP, `report`
//! writes status.json and systemd's STATUS=.

mod audit;
mod reload;
mod report;
mod start;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Interval};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::audit::Kind as AuditKind;
use crate::bridge::{Bridge, BridgeConfig, DataEndpoint, Limits, Role, State, Stats};
use crate::config::{Checked, Config};
use crate::consent::Gate;
use crate::mqtt::{MqttState, Notice, Notification};
use crate::persist::{Moment, PersistedSession, SessionStore};
use crate::persist_writer::PersistWriter;
use crate::secret::Secret;
use crate::services::{Scope, ServiceMap, SharedServiceMap};
use crate::status::{StatusFile, StatusSocket};
use crate::systemd;
use crate::tunnels::{
    CONNECT_WITHIN, Connected, Decision, Effect, Ends, Lifecycle, SessionExit, SessionTask,
    TunnelKey,
};
use crate::upgrade::{Candidate, Step, Upgrader};

/// How long bridges get to close their sockets when the agent stops.
const DRAIN: Duration = Duration::from_secs(5);
/// How often the agent removes what expired on disk (session files moved aside).
const HOUSEKEEPING: Duration = Duration::from_secs(3600);
/// How often the agent looks whether its binary was replaced (a package upgrade).
const BINARY_CHECK: Duration = Duration::from_secs(2);

/// Why `Agent::run` returned.
pub enum AgentExit {
    /// SIGINT/SIGTERM.
    Stopped,
    /// The binary was replaced and the new one checked: execute it (sessions are persisted
    /// and will rejoin).
    Upgrade(Candidate),
}

/// The agent's handles on one running bridge.
struct Live {
    cancel: CancellationToken,
    retire: CancellationToken,
    state: watch::Receiver<State>,
    stats: Arc<Stats>,
    /// The session's trail (its thing and token hash).
    audit: crate::audit::TunnelTrail,
    /// When its bridge started, for the audit's duration.
    started: Instant,
}

pub struct Agent {
    cfg: Config,
    /// Per thing (the gateway's own and each downstream one), the service map its bridges
    /// resolve new streams against; replaced on SIGHUP.
    maps: BTreeMap<String, (watch::Sender<Arc<ServiceMap>>, SharedServiceMap)>,
    /// The downstream things the MQTT client subscribes for.
    downstream_tx: watch::Sender<Vec<String>>,
    tunnel_tls: Arc<rustls::ClientConfig>,
    lifecycle: Lifecycle,
    /// Writes session files off the runtime; `None` when sessions are not persisted.
    store: Option<PersistWriter>,
    /// Bytes all tunnels together hold for and from local sockets.
    budget: crate::bridge::Budget,
    /// Name lookups in flight, all tunnels together.
    lookups: crate::lookup::Lookups,
    bridges: JoinSet<SessionExit>,
    connected_tx: mpsc::Sender<Connected>,
    live: HashMap<u64, Live>,
    status: StatusFile,
    mqtt: watch::Receiver<MqttState>,
    upgrade: Option<Upgrader>,
    /// The report the MQTT client publishes to the thing's shadow (`[shadow] enabled`).
    shadow: Option<watch::Sender<crate::shadow::Report>>,
    /// Site consent as every bridge asks it; `always` without `[consent]`.
    consent: Gate,
    /// Follows the consent file (`[consent] mode = "file"`); stops when dropped.
    _consent_watch: Option<crate::consent::Watcher>,
    /// The audit trail: journal, file, MQTT queue.
    audit: crate::audit::Trail,
}

/// What the loop waits on besides the agent's own state.
struct Inputs {
    hangup: Option<Signal>,
    notifications: mpsc::Receiver<Notice>,
    connected: mpsc::Receiver<Connected>,
    status_socket: Option<StatusSocket>,
    /// Fed from this loop: a loop that hangs stops feeding it and systemd restarts us.
    watchdog: Option<Interval>,
    binary_check: Interval,
    housekeeping: Interval,
    /// With `[shadow] enabled` and tunnels live: the shadow report is refreshed (connection
    /// counts, phases).
    shadow_refresh: Option<Interval>,
    /// Site consent's changes, for the status and the shadow (the bridges act on their own).
    consent: Gate,
}

/// The stop waits at most this long for the audit file to take the last events.
const AUDIT_FLUSH: Duration = Duration::from_secs(1);

/// A session's bridge could not start; `file` is its session file, to forget.
struct NotStarted {
    file: Option<String>,
}

/// How long the stop waits for the MQTT client (its DISCONNECT takes at most 1 s).
const MQTT_STOP: std::time::Duration = std::time::Duration::from_secs(3);

impl Agent {
    /// Runs until `cancel` (or an upgrade); then stops every bridge (sockets closed) within
    /// `DRAIN`. Persisted sessions stay on disk for the next start.
    pub async fn run(cfg: Config, checked: Checked, cancel: CancellationToken) -> AgentExit {
        // First: until now SIGHUP is ignored (`main`); a reload sent while the agent
        // starts waits here for the loop.
        let hangup = start::hangup_signal();
        let (mut agent, started) = Agent::start(cfg, &checked).await;
        // Rejoin before the first notify can arrive.
        agent.resume(started.persisted).await;
        // Running from here on: resumed tunnels are served whether or not MQTT is reachable,
        // so a gateway that boots offline is started, not restarted every start timeout.
        systemd::ready(&agent.write_status());
        let mqtt_cancel = cancel.child_token();
        let (notifications, mqtt_task) = agent.start_mqtt(
            &checked,
            started.downstream,
            started.mqtt_state,
            started.audit_events,
            &mqtt_cancel,
        );
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.reset();
        let mut inputs = Inputs {
            hangup,
            notifications,
            connected: started.connected,
            status_socket: agent.bind_status_socket(),
            watchdog: systemd::watchdog_interval().map(tokio::time::interval),
            binary_check: tokio::time::interval(BINARY_CHECK),
            housekeeping,
            shadow_refresh: agent.shadow.is_some().then(|| {
                let mut i = tokio::time::interval(crate::shadow::MIN_INTERVAL);
                i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                i
            }),
            consent: agent.consent.clone(),
        };
        let exit = agent.serve(&mut inputs, &cancel).await;
        // No stream may start from here on: the bridges stop in this same turn of the loop.
        agent.stop_bridges();
        match &exit {
            AgentExit::Stopped => systemd::stopping(),
            // Same PID, new image: systemd waits for the new process's READY=1.
            AgentExit::Upgrade(_) => systemd::reexecuting(),
        }
        // Notices not acted on stay unacknowledged: the broker delivers them again.
        drop(inputs);
        mqtt_cancel.cancel();
        // Bounded: with a key in a token the client's thread may be stuck in the module.
        let _ = tokio::time::timeout(MQTT_STOP, mqtt_task).await;
        agent.shutdown().await;
        exit
    }

    /// The loop: one event at a time, until `cancel` or an upgrade is due.
    async fn serve(&mut self, i: &mut Inputs, cancel: &CancellationToken) -> AgentExit {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return AgentExit::Stopped,
                Some(()) = recv_signal(&mut i.hangup) => self.reload(),
                _ = tick(&mut i.watchdog) => systemd::watchdog(),
                Some(Notice { notification, ack }) = i.notifications.recv() => {
                    self.on_notification(notification).await;
                    // Acted on (persisted): the broker may forget it.
                    ack.send();
                }
                Some(c) = i.connected.recv() => self.on_connected(c).await,
                Some(done) = self.bridges.join_next() => {
                    if let Ok(exit) = done {
                        self.on_bridge_end(exit).await;
                    }
                }
                Ok(()) = self.mqtt.changed() => self.on_mqtt_state(),
                Some(client) = report::accept_status(i.status_socket.as_ref()) => {
                    if let Some(socket) = &i.status_socket {
                        socket.answer(client, || self.snapshot());
                    }
                }
                _ = i.housekeeping.tick() => self.housekeeping().await,
                // Only with tunnels: an idle agent does not wake for it, and the table's
                // changes (the last tunnel gone) refresh it through `write_status`.
                _ = tick(&mut i.shadow_refresh), if !self.live.is_empty() => self.update_shadow(),
                () = i.consent.changed() => {
                    self.audit_consent();
                    self.write_status();
                }
                done = upgrade_checked(self.upgrade.as_mut()) => {
                    if let Some(u) = self.upgrade.as_mut() {
                        u.done(done);
                    }
                }
                _ = i.binary_check.tick() => {
                    if let Some(candidate) = self.upgrade_due() {
                        return AgentExit::Upgrade(candidate);
                    }
                }
            }
        }
    }

    /// Carries out the lifecycle's effects, in order.
    async fn carry_out(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Stop(id) => self.stop(id),
                Effect::Retire(id) => {
                    if let Some(l) = self.live.get(&id) {
                        debug!(
                            session = id,
                            "retiring the replaced bridge: it serves on until its successor connects and never reconnects"
                        );
                        l.retire.cancel();
                    }
                }
                Effect::Forget(file_id) => self.forget(&file_id).await,
                Effect::Save(p) => {
                    if let Some(store) = &self.store {
                        store.save_later(p).await;
                    }
                }
            }
        }
    }

    /// Hourly: unusable session files moved aside go once they are 12 h old.
    async fn housekeeping(&self) {
        if let Some(store) = &self.store {
            store.sweep_rejected().await;
        }
    }

    async fn forget(&self, file_id: &str) {
        if let Some(store) = &self.store {
            store.remove(file_id).await;
        }
    }

    async fn on_notification(&mut self, n: Notification) {
        if let Err(why) = self.any_service_mapped(&n) {
            self.audit_notify(&n, AuditKind::NotifyRefused, Some(why));
            return;
        }
        let key = TunnelKey::new(&n.thing, &n.region, &n.services);
        // State (status.json) is written before the log line that announces it: whoever
        // follows the log may read the state at once.
        let decision = self.lifecycle.decide(key, &n.token, Instant::now());
        match decision {
            Decision::Duplicate => info!(token = %n.token, "duplicate notify ignored (same token)"),
            Decision::Stale => {
                let why = "this token was already replaced by a newer one";
                self.audit_notify(&n, AuditKind::NotifyRefused, Some(why));
                warn!(token = %n.token, "notify ignored: {why}")
            }
            Decision::Refused(why) => {
                self.audit_notify(&n, AuditKind::NotifyRefused, Some(&why.to_string()));
                warn!(region = %n.region, services = ?n.services, "notify refused: {why}")
            }
            Decision::Start { id } => {
                self.audit_notify(&n, AuditKind::NotifyAccepted, None);
                self.start_new(id, &n, Vec::new()).await;
                self.write_status();
                info!(session = id, region = %n.region, services = ?n.services, token = %n.token, "session started");
            }
            Decision::Rotate { old, id } => {
                // The old file goes before the new one is written (one writer, in order): a
                // crash between the two leaves neither, and the unacknowledged notify comes
                // again; never both, which would present the revoked token at the restart.
                let connected = self
                    .live
                    .get(&old)
                    .is_some_and(|l| l.state.borrow().sessions > 0);
                self.audit_rotation(&n, old);
                let (effects, replaces) = self.lifecycle.retire(old, connected);
                self.carry_out(effects).await;
                self.start_new(id, &n, replaces).await;
                self.write_status();
                info!(session = id, replaces = old, token = %n.token, "rotation: starting a bridge with the new token; the old one stops once it is connected");
            }
        }
    }

    /// Rule (notify scope): a notify none of whose services the thing's map has is refused;
    /// the unmapped ones of the others are refused stream by stream. `Err` says why.
    fn any_service_mapped(&self, n: &Notification) -> Result<(), &'static str> {
        let Some((_, shared)) = self.maps.get(&n.thing) else {
            let why = "the thing is no longer configured";
            warn!(thing = %n.thing, "notify refused: {why}");
            return Err(why);
        };
        let map = shared.current();
        let unmapped: Vec<&String> = n
            .services
            .iter()
            .filter(|s| map.resolve(s, &n.services).is_none())
            .collect();
        if unmapped.len() == n.services.len() {
            let why = "none of the tunnel's services is in the thing's service map";
            warn!(thing = %n.thing, services = ?n.services, "notify refused: {why}");
            return Err(why);
        }
        if !unmapped.is_empty() {
            warn!(unmapped = ?unmapped, "services not in the service map: their streams will be refused; the others are served");
        }
        Ok(())
    }

    /// A new session from a notify: a fresh client token, persisted before it is used.
    async fn start_new(&mut self, id: u64, n: &Notification, replaces: Vec<u64>) {
        let client_token = Secret::new(uuid::Uuid::new_v4().to_string());
        let mut persisted = None;
        if let Some(store) = &self.store {
            let p = PersistedSession {
                file_id: SessionStore::new_id(),
                thing: n.thing.clone(),
                region: n.region.clone(),
                services: n.services.clone(),
                access_token: n.token.clone(),
                client_token: client_token.clone(),
                first_connected: None,
                received: Some(Moment::now()),
            };
            if let Err(e) = store.save(p.clone()).await {
                warn!("cannot persist the session: {e}; it will not survive a restart");
            }
            persisted = Some(p);
        }
        let ends = Ends {
            lifetime: None,
            connect_by: Instant::now() + CONNECT_WITHIN,
        };
        let key = TunnelKey::new(&n.thing, &n.region, &n.services);
        let token = n.token.clone();
        if let Err(NotStarted { file: Some(file) }) =
            self.start_bridge(id, &key, token, client_token, persisted, ends)
        {
            self.forget(&file).await;
        }
        self.lifecycle.set_replaces(id, replaces);
        let running = self.live.values().filter(|l| !l.cancel.is_cancelled());
        debug!(session = id, running = running.count(), "bridge started");
    }

    /// The bridge configuration of a session for tunnel `key`: it reaches only the services
    /// of `key` (its scope) that its thing's map has.
    fn bridge_config(&self, key: &TunnelKey, token: Secret, client_token: Secret) -> BridgeConfig {
        let mut endpoint = self
            .cfg
            .tunnel
            .endpoint
            .clone()
            .unwrap_or_else(|| DataEndpoint::for_region(&key.region))
            .with_proxy(self.cfg.proxy.as_ref());
        endpoint.connect_to = crate::config::resolve_override(&self.cfg.tunnel.resolve, &endpoint);
        let limits = Limits {
            max_connections: self.cfg.limits.max_connections_per_tunnel,
            stall_timeout: self.cfg.tunnel.stall_timeout,
            ..Limits::default()
        };
        BridgeConfig {
            role: Role::Destination {
                // Only this thing's endpoints: a stream of one thing never reaches another's.
                services: match self.maps.get(&key.thing) {
                    Some((_, map)) => map.clone(),
                    None => SharedServiceMap::from(ServiceMap::default()),
                },
                scope: Scope::Opened(key.services.clone()),
                consent: self.consent.clone(),
            },
            endpoint,
            tls: Some(self.tunnel_tls.clone()),
            access_token: token,
            client_token: Some(client_token),
            limits: limits.with_idle_timeout(self.cfg.tunnel.idle_timeout),
        }
    }

    /// Starts the bridge of session `id`. `Err` with the file to forget when the bridge
    /// cannot start (the session left the table).
    fn start_bridge(
        &mut self,
        id: u64,
        key: &TunnelKey,
        token: Secret,
        client_token: Secret,
        persisted: Option<PersistedSession>,
        ends: Ends,
    ) -> Result<(), NotStarted> {
        let audit = self.audit.tunnel(&key.thing, token.to_string());
        let bridge = match Bridge::new(self.bridge_config(key, token, client_token)) {
            Ok(b) => b
                .with_budget(self.budget.clone())
                .with_lookups(self.lookups.clone())
                .with_audit(audit.clone()),
            Err(e) => {
                warn!(session = id, "cannot start the bridge: {e}");
                self.lifecycle.abandon(id);
                let file = persisted.map(|p| p.file_id);
                return Err(NotStarted { file });
            }
        };
        let (cancel, retire) = (CancellationToken::new(), bridge.retire_handle());
        let live = Live {
            cancel: cancel.clone(),
            retire: retire.clone(),
            state: bridge.state(),
            stats: bridge.stats(),
            audit,
            started: Instant::now(),
        };
        self.live.insert(id, live);
        self.lifecycle
            .started(id, &key.thing, persisted, Vec::new());
        let max_lifetime = self.lifecycle.table().max_lifetime();
        let connected = self.connected_tx.clone();
        let task = SessionTask::new(id, bridge, cancel, retire, ends, max_lifetime, connected);
        self.bridges
            .spawn(task.run().instrument(info_span!("session", id)));
        Ok(())
    }

    /// A bridge reached its first websocket: its lifetime starts (persisted), and the
    /// sessions it replaces stop.
    async fn on_connected(&mut self, c: Connected) {
        let effects = self.lifecycle.connected(c.id, c.at, Instant::now());
        for old in effects.iter().filter_map(|e| match e {
            Effect::Stop(old) => Some(old),
            _ => None,
        }) {
            debug!(
                session = old,
                by = c.id,
                "the new bridge is connected: stopping the old one"
            );
        }
        self.carry_out(effects).await;
        self.write_status();
    }

    async fn on_bridge_end(&mut self, exit: SessionExit) {
        let SessionExit {
            id,
            result,
            expired,
        } = exit;
        let live = self.live.remove(&id);
        let retired = live.as_ref().is_some_and(|l| l.retire.is_cancelled());
        let why = audit::end_reason(&result, expired, retired);
        if let Some(l) = &live {
            audit::record_end(l, expired, &why);
        }
        let Some((entry, effects)) = self.lifecycle.ended(id) else {
            debug!(session = id, "replaced bridge stopped");
            return;
        };
        self.carry_out(effects).await;
        self.write_status();
        info!(session = id, region = %entry.key.region, services = ?entry.key.services, "session ended: {why}");
    }
}

impl Agent {
    /// The checked new binary, once it is due (`Upgrader::tick`).
    fn upgrade_due(&mut self) -> Option<Candidate> {
        let open: usize = self
            .live
            .values()
            .map(|l| l.stats.open_connections.load(Ordering::Relaxed))
            .sum();
        let before = self.upgrade.as_ref()?.pending_since();
        let step = self.upgrade.as_mut()?.tick(open);
        if self.upgrade.as_ref()?.pending_since() != before {
            self.write_status();
        }
        self.upgrade.as_mut()?.announce_waiting(open);
        match step {
            Step::Wait => None,
            Step::Exec(c) => {
                info!("the new binary is due: re-executing it; tunnels rejoin with their tokens");
                Some(c)
            }
        }
    }

    fn stop(&self, id: u64) {
        if let Some(l) = self.live.get(&id) {
            debug!(session = id, "stopping the bridge");
            l.cancel.cancel();
        }
    }

    fn stop_bridges(&self) {
        for live in self.live.values() {
            live.cancel.cancel();
        }
    }

    /// Stops every bridge; persisted sessions stay on disk, so the next start rejoins them.
    async fn shutdown(&mut self) {
        // What was asked of the session files is on disk before the process ends or
        // re-executes.
        if let Some(store) = &self.store {
            store.flush().await;
        }
        self.stop_bridges();
        let (bridges, live) = (&mut self.bridges, &mut self.live);
        let drained = tokio::time::timeout(DRAIN, async {
            while let Some(done) = bridges.join_next().await {
                // Each tunnel's end with its totals, as at any other end.
                if let Ok(exit) = done
                    && let Some(l) = live.remove(&exit.id)
                {
                    let why = audit::stop_reason(&exit, l.retire.is_cancelled());
                    audit::record_end(&l, exit.expired, &why);
                }
            }
        })
        .await;
        if drained.is_err() {
            warn!("bridges did not stop within {DRAIN:?}; aborting them");
            self.bridges.shutdown().await;
        }
        for l in std::mem::take(&mut self.live).into_values() {
            audit::record_end(&l, None, "the agent stopped");
        }
        // The connections' closing events are in the audit file before the process ends.
        self.audit.flush(AUDIT_FLUSH).await;
        info!("agent stopped");
    }
}

/// The end of the upgrade check under way; pending for ever without one.
async fn upgrade_checked(upgrade: Option<&mut Upgrader>) -> crate::upgrade::CheckDone {
    match upgrade {
        Some(u) => u.checked().await,
        None => std::future::pending().await,
    }
}

async fn recv_signal(s: &mut Option<Signal>) -> Option<()> {
    match s {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn tick(i: &mut Option<Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}
