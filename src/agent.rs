//! The agent: follows the notify topic and turns every destination token into a running
//! bridge. A new tunnel starts one, a rotation starts the new bridge and stops the old one
//! once the new one is connected, and a tunnel that ends (closed, expired, rejected) leaves
//! the table. Live sessions are persisted, so a restart rejoins them; a replaced binary
//! (package upgrade) is re-executed once no local connection is open.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::bridge::{
    Bridge, BridgeConfig, BridgeEnd, BridgeError, DataEndpoint, Limits, Role, State, Stats,
};
use crate::config::{Checked, Config};
use crate::mqtt::{self, MqttPhase, MqttState, Notice, Notification, NotifyClient};
use crate::persist::{Moment, PersistedSession, SessionStore};
use crate::persist_writer::PersistWriter;
use crate::secret::Secret;
use crate::services::{Scope, ServiceMap, SharedServiceMap};
use crate::session::{CONNECT_WITHIN, Decision, SessionTable, TunnelKey, connect_deadline};
use crate::status::{Snapshot, StatusFile, StatusSocket, TunnelStatus};
use crate::systemd;
use crate::upgrade::{Candidate, Step, Upgrader};

/// How long bridges get to close their sockets when the agent stops.
const DRAIN: Duration = Duration::from_secs(5);
/// After a rotation the old bridge serves on until the new one is connected, at most this.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(10);
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

/// A bridge reached its first websocket.
struct Connected {
    id: u64,
    at: Moment,
}

/// A session task's end: the bridge's result, and whether one of the agent's own time
/// limits ended it.
struct SessionExit {
    id: u64,
    result: Result<BridgeEnd, BridgeError>,
    expired: Option<Expiry>,
}

/// Which of the agent's own time limits ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// `limits.max_lifetime` after its first connect.
    Lifetime,
    /// It never connected within `CONNECT_WITHIN` of its notify.
    NeverConnected,
}

/// When a session ends on the agent's own account.
#[derive(Clone, Copy, Debug)]
struct Ends {
    /// Its lifetime's end, when it connected before (a resumed session).
    lifetime: Option<Instant>,
    /// The end for a session that has not connected yet.
    connect_by: Instant,
}

struct Live {
    /// The thing the session serves.
    thing: String,
    cancel: CancellationToken,
    retire: CancellationToken,
    state: watch::Receiver<State>,
    stats: Arc<Stats>,
    /// What is on disk for this session (`None` when sessions are not persisted).
    persisted: Option<PersistedSession>,
    /// Sessions this one replaces: stopped once this one is connected.
    replaces: Vec<u64>,
}

pub struct Agent {
    cfg: Config,
    /// Per thing (the gateway's own and each downstream one), the service map its bridges
    /// resolve new streams against; replaced on SIGHUP.
    maps: BTreeMap<String, (watch::Sender<Arc<ServiceMap>>, SharedServiceMap)>,
    /// The downstream things the MQTT client subscribes for.
    downstream_tx: watch::Sender<Vec<String>>,
    tunnel_tls: Arc<rustls::ClientConfig>,
    table: SessionTable,
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
}

impl Agent {
    /// Runs until `cancel` (or an upgrade); then stops every bridge (sockets closed) within
    /// `DRAIN`. Persisted sessions stay on disk for the next start.
    pub async fn run(cfg: Config, checked: Checked, cancel: CancellationToken) -> AgentExit {
        // First: until now SIGHUP is ignored (`main`); a reload sent while the agent
        // starts waits here for the loop.
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("SIGHUP will not reload the service map: {e}");
                None
            }
        };
        for w in &checked.warnings {
            warn!("{w}");
        }
        if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
            warn!(dir = %cfg.state_dir.display(), "cannot create the state directory: {e}; status.json will not be written");
        }
        let store = if cfg.tunnel.persist_sessions {
            match SessionStore::open(&cfg.state_dir) {
                Ok(s) => Some(s),
                Err(e) => {
                    error!("{e}; tunnels will not survive a restart");
                    None
                }
            }
        } else {
            SessionStore::clear(&cfg.state_dir);
            None
        };
        // Read off the runtime (flash can be slow); the files' writer thread owns them after.
        let persisted = match store.clone() {
            Some(st) => tokio::task::spawn_blocking(move || st.load())
                .await
                .unwrap_or_default(),
            None => Default::default(),
        };
        let store = store.and_then(|st| match PersistWriter::start(st) {
            Ok(w) => Some(w),
            Err(e) => {
                error!(
                    "cannot start the session-file thread: {e}; tunnels will not survive a restart"
                );
                None
            }
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
        let (connected_tx, mut connected) = mpsc::channel(cfg.limits.max_tunnels * 2 + 4);
        check_descriptor_limit(&cfg);
        let (mqtt_state, mqtt) = watch::channel(MqttState::connecting());
        let mut agent = Agent {
            maps,
            downstream_tx,
            table: SessionTable::new(
                cfg.limits.max_tunnels,
                cfg.limits.max_lifetime,
                cfg.rotation,
            ),
            store,
            budget: crate::bridge::Budget::new(cfg.limits.max_buffered),
            lookups: crate::lookup::Lookups::default(),
            status: StatusFile::new(&cfg.state_dir),
            tunnel_tls: checked.tunnel_tls,
            bridges: JoinSet::new(),
            connected_tx,
            live: HashMap::new(),
            mqtt,
            upgrade: Upgrader::new(&cfg.path, cfg.upgrade_deadline),
            cfg,
        };
        agent.table.set_thing_caps(thing_caps(&agent.cfg));
        agent.table.set_own_thing(&agent.cfg.thing_name);
        info!(thing = %agent.cfg.thing_name, downstream = ?agent.cfg.things.keys().collect::<Vec<_>>(), version = env!("CARGO_PKG_VERSION"), pid = std::process::id(), "agent started");
        // Rejoin before the first notify can arrive.
        agent.resume(persisted).await;
        // Running from here on: resumed tunnels are served whether or not MQTT is reachable,
        // so a gateway that boots offline is started, not restarted every start timeout.
        let status = agent.write_status();
        systemd::ready(&status);
        let (tx, mut notifications) = mpsc::channel(mqtt::QUEUE);
        let mqtt_cancel = cancel.child_token();
        let client = NotifyClient {
            config: agent.cfg.mqtt.clone(),
            tls: checked.mqtt_tls.clone(),
            thing: agent.cfg.thing_name.clone(),
            topic: agent.cfg.notify_topic(),
            downstream,
            proxy: agent
                .cfg
                .proxy
                .as_ref()
                .and_then(|p| p.for_host(&agent.cfg.mqtt.host))
                .cloned(),
        };
        let spread = agent.cfg.mqtt.reconnect_spread;
        let mqtt_task = tokio::spawn(
            client
                .run(tx, mqtt_state, mqtt_cancel.clone(), spread)
                .instrument(info_span!("mqtt")),
        );
        // Live status for `securetunnel-agent status`; without it the agent still runs.
        let status_socket = match StatusSocket::bind(&agent.cfg.runtime_dir) {
            Ok(s) => {
                debug!(socket = %s.path().display(), "live status socket ready");
                Some(s)
            }
            Err(e) => {
                warn!(dir = %agent.cfg.runtime_dir.display(), "no live status (securetunnel-agent status): cannot create the status socket: {e}");
                None
            }
        };
        // Fed from this loop: a loop that hangs stops feeding it and systemd restarts us.
        let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
        let mut binary_check = tokio::time::interval(BINARY_CHECK);
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        housekeeping.reset();
        let exit = loop {
            tokio::select! {
                _ = cancel.cancelled() => break AgentExit::Stopped,
                Some(()) = recv_signal(&mut hangup) => agent.reload(),
                _ = tick(&mut watchdog) => systemd::watchdog(),
                Some(Notice { notification, ack }) = notifications.recv() => {
                    agent.on_notification(notification).await;
                    // Acted on (persisted): the broker may forget it.
                    ack.send();
                }
                Some(c) = connected.recv() => agent.on_connected(c).await,
                Some(done) = agent.bridges.join_next() => {
                    if let Ok(exit) = done {
                        agent.on_bridge_end(exit).await;
                    }
                }
                Ok(()) = agent.mqtt.changed() => agent.on_mqtt_state(),
                Some(client) = accept_status(status_socket.as_ref()) => {
                    if let Some(socket) = &status_socket {
                        socket.answer(client, || agent.snapshot());
                    }
                }
                _ = housekeeping.tick() => agent.housekeeping().await,
                done = upgrade_checked(agent.upgrade.as_mut()) => {
                    if let Some(u) = agent.upgrade.as_mut() {
                        u.done(done);
                    }
                }
                _ = binary_check.tick() => {
                    if let Some(candidate) = agent.upgrade_due() {
                        break AgentExit::Upgrade(candidate);
                    }
                }
            }
        };
        // No stream may start from here on: the bridges stop in this same turn of the loop.
        agent.stop_bridges();
        match &exit {
            AgentExit::Stopped => systemd::stopping(),
            // Same PID, new image: systemd waits for the new process's READY=1.
            AgentExit::Upgrade(_) => systemd::reexecuting(),
        }
        // Notices not acted on stay unacknowledged: the broker delivers them again.
        drop(notifications);
        mqtt_cancel.cancel();
        let _ = mqtt_task.await;
        agent.shutdown().await;
        exit
    }

    /// Starts a bridge for every persisted session whose lifetime is not over.
    async fn resume(&mut self, (sessions, warnings): (Vec<PersistedSession>, Vec<String>)) {
        for w in warnings {
            warn!("{w}");
        }
        let now_moment = Moment::now();
        for s in sessions {
            let key = TunnelKey::new(&s.thing, &s.region, &s.services);
            // Unknown elapsed time (clock unset or stepped across a reboot): the lifetime
            // starts again at this connect; the service still enforces the real one.
            let left = s
                .first_connected
                .as_ref()
                .and_then(|m| m.elapsed_until(&now_moment))
                .map(|elapsed| self.table.max_lifetime().saturating_sub(elapsed));
            if !self.maps.contains_key(&s.thing) {
                info!(thing = %s.thing, services = ?s.services, "persisted session dropped: the thing is no longer configured");
                self.forget(&s.file_id).await;
                continue;
            }
            if left.is_some_and(|l| l.is_zero()) {
                info!(region = %s.region, services = ?s.services, "persisted session dropped: its lifetime ended while the agent was down");
                self.forget(&s.file_id).await;
                continue;
            }
            let now = Instant::now();
            let deadline = left.map(|l| now + l);
            // Counted from its notify across restarts; a file without it starts anew.
            let since_notify = s
                .received
                .as_ref()
                .and_then(|m| m.since_notify(&now_moment));
            let connect_by = match (&s.first_connected, connect_deadline(since_notify, now)) {
                (None, None) => {
                    info!(region = %s.region, services = ?s.services, "persisted session dropped: it never connected within 12 h of its notify");
                    self.forget(&s.file_id).await;
                    continue;
                }
                (_, by) => by.unwrap_or(now),
            };
            let id = match self.table.resume(key, &s.access_token, deadline, now) {
                Ok(id) => id,
                Err(why) => {
                    warn!(thing = %s.thing, region = %s.region, services = ?s.services, "persisted session dropped: {why}");
                    self.forget(&s.file_id).await;
                    continue;
                }
            };
            info!(session = id, region = %s.region, services = ?s.services, token = %s.access_token, "session resumed with its tokens");
            let (token, client_token) = (s.access_token.clone(), s.client_token.clone());
            let key = TunnelKey::new(&s.thing, &s.region, &s.services);
            let ends = Ends {
                lifetime: deadline,
                connect_by,
            };
            if let Err(file) = self.start_bridge(id, &key, token, client_token, Some(s), ends) {
                self.forget(&file).await;
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

    /// Only systemd's one line: status.json is rewritten when the tunnel table changes, not
    /// on every MQTT reconnect attempt of an offline gateway (flash wear).
    fn on_mqtt_state(&mut self) {
        systemd::status(&status_line(
            self.table.entries().len(),
            &self.mqtt.borrow(),
        ));
    }

    async fn on_notification(&mut self, n: Notification) {
        let Some((_, shared)) = self.maps.get(&n.thing) else {
            warn!(thing = %n.thing, "notify refused: the thing is no longer configured");
            return;
        };
        let map = shared.current();
        let unmapped: Vec<&String> = n
            .services
            .iter()
            .filter(|s| map.resolve(s, &n.services).is_none())
            .collect();
        if unmapped.len() == n.services.len() {
            warn!(thing = %n.thing, services = ?n.services, "notify refused: none of the tunnel's services is in the thing's service map");
            return;
        }
        if !unmapped.is_empty() {
            warn!(unmapped = ?unmapped, "services not in the service map: their streams will be refused; the others are served");
        }
        let key = TunnelKey::new(&n.thing, &n.region, &n.services);
        // State (status.json) is written before the log line that announces it: whoever
        // follows the log may read the state at once.
        match self.table.decide(key, &n.token, Instant::now()) {
            Decision::Duplicate => info!(token = %n.token, "duplicate notify ignored (same token)"),
            Decision::Stale => {
                warn!(token = %n.token, "notify ignored: this token was already replaced by a newer one")
            }
            Decision::Refused(why) => {
                warn!(region = %n.region, services = ?n.services, "notify refused: {why}")
            }
            Decision::Start { id } => {
                self.start_new(id, &n).await;
                let running = self.live.values().filter(|l| !l.cancel.is_cancelled());
                debug!(session = id, running = running.count(), "bridge started");
                self.write_status();
                info!(session = id, region = %n.region, services = ?n.services, token = %n.token, "session started");
            }
            Decision::Rotate { old, id } => {
                // The old file goes before the new one is written (one writer, in order): a
                // crash between the two leaves neither, and the unacknowledged notify comes
                // again; never both, which would present the revoked token at the restart.
                let replaces = self.retire(old).await;
                self.start_new(id, &n).await;
                if let Some(l) = self.live.get_mut(&id) {
                    l.replaces = replaces;
                }
                let running = self.live.values().filter(|l| !l.cancel.is_cancelled());
                debug!(session = id, running = running.count(), "bridge started");
                self.write_status();
                info!(session = id, replaces = old, token = %n.token, "rotation: starting a bridge with the new token; the old one stops once it is connected");
            }
        }
    }

    /// The token of session `old` was replaced; returns the sessions its successor stops
    /// once connected. Rule (rotation bursts): per tunnel, only the bridge that serves and
    /// the newest one live. A bridge that has connected serves on until its successor
    /// connects (or the overlap ends) but never reconnects; one that never connected is
    /// cancelled at once and hands on what it was replacing. Its file goes now either way.
    async fn retire(&mut self, old: u64) -> Vec<u64> {
        let Some(l) = self.live.get_mut(&old) else {
            return Vec::new();
        };
        let file = l.persisted.take();
        let replaced = std::mem::take(&mut l.replaces);
        let connected = l.state.borrow().sessions > 0;
        if connected {
            l.retire.cancel();
        } else {
            debug!(
                session = old,
                "replaced before it connected: stopping it now"
            );
            l.cancel.cancel();
        }
        if let Some(p) = file {
            self.forget(&p.file_id).await;
        }
        if !connected {
            return replaced;
        }
        // It connected: what it replaced stops now, even if the agent has not heard of that
        // connect yet (`on_connected`).
        for gone in replaced {
            if let Some(g) = self.live.get(&gone) {
                g.cancel.cancel();
            }
        }
        vec![old]
    }

    /// A new session from a notify: a fresh client token, persisted before it is used.
    async fn start_new(&mut self, id: u64, n: &Notification) {
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
        if let Err(file) =
            self.start_bridge(id, &key, n.token.clone(), client_token, persisted, ends)
        {
            self.forget(&file).await;
        }
    }

    /// Starts the bridge of session `id` for tunnel `key`: it reaches only the services of
    /// `key` (its scope) that its thing's map has. `Err` with the file to forget when the
    /// bridge cannot start (the session left the table).
    fn start_bridge(
        &mut self,
        id: u64,
        key: &TunnelKey,
        token: Secret,
        client_token: Secret,
        persisted: Option<PersistedSession>,
        ends: Ends,
    ) -> Result<(), String> {
        let mut endpoint = self
            .cfg
            .tunnel
            .endpoint
            .clone()
            .unwrap_or_else(|| DataEndpoint::for_region(&key.region))
            .with_proxy(self.cfg.proxy.as_ref());
        endpoint.connect_to = crate::config::resolve_override(&self.cfg.tunnel.resolve, &endpoint);
        let config = BridgeConfig {
            role: Role::Destination {
                // Only this thing's endpoints: a stream of one thing never reaches another's.
                services: match self.maps.get(&key.thing) {
                    Some((_, map)) => map.clone(),
                    None => SharedServiceMap::from(ServiceMap::default()),
                },
                scope: Scope::Opened(key.services.clone()),
            },
            endpoint,
            tls: Some(self.tunnel_tls.clone()),
            access_token: token,
            client_token: Some(client_token),
            limits: Limits {
                max_connections: self.cfg.limits.max_connections_per_tunnel,
                stall_timeout: self.cfg.tunnel.stall_timeout,
                ..Limits::default()
            }
            .with_idle_timeout(self.cfg.tunnel.idle_timeout),
        };
        let bridge = match Bridge::new(config) {
            Ok(b) => b
                .with_budget(self.budget.clone())
                .with_lookups(self.lookups.clone()),
            Err(e) => {
                warn!(session = id, "cannot start the bridge: {e}");
                self.table.ended(id);
                return Err(persisted.map(|p| p.file_id).unwrap_or_default());
            }
        };
        let cancel = CancellationToken::new();
        let retire = bridge.retire_handle();
        self.live.insert(
            id,
            Live {
                thing: key.thing.clone(),
                cancel: cancel.clone(),
                retire: retire.clone(),
                state: bridge.state(),
                stats: bridge.stats(),
                persisted,
                replaces: Vec::new(),
            },
        );
        let task = SessionTask {
            id,
            bridge,
            cancel,
            retire,
            ends,
            max_lifetime: self.table.max_lifetime(),
            connected: self.connected_tx.clone(),
        };
        self.bridges
            .spawn(task.run().instrument(info_span!("session", id)));
        Ok(())
    }

    /// A bridge reached its first websocket: its lifetime starts (persisted), and the
    /// sessions it replaces stop.
    async fn on_connected(&mut self, c: Connected) {
        self.table.connected(c.id, Instant::now());
        let Some(live) = self.live.get_mut(&c.id) else {
            return;
        };
        let replaces = std::mem::take(&mut live.replaces);
        if let (Some(store), Some(p)) = (&self.store, live.persisted.as_mut()) {
            if p.first_connected.is_none() {
                p.first_connected = Some(c.at);
                store.save_later(p.clone()).await;
            }
        }
        for old in replaces {
            if let Some(l) = self.live.get(&old) {
                debug!(
                    session = old,
                    by = c.id,
                    "the new bridge is connected: stopping the old one"
                );
                l.cancel.cancel();
            }
        }
        self.write_status();
    }

    async fn on_bridge_end(&mut self, exit: SessionExit) {
        let SessionExit {
            id,
            result,
            expired,
        } = exit;
        let live = self.live.remove(&id);
        let Some(entry) = self.table.ended(id) else {
            debug!(session = id, "replaced bridge stopped");
            return;
        };
        if let Some(p) = live.and_then(|l| l.persisted) {
            self.forget(&p.file_id).await;
        }
        let why = match &result {
            Ok(BridgeEnd::ClosedByService { code, reason }) => {
                format!("closed by the service (code {code}, {reason:?})")
            }
            Ok(_) if expired == Some(Expiry::Lifetime) => {
                "the agent's maximum lifetime for this token ended".to_owned()
            }
            Ok(_) if expired == Some(Expiry::NeverConnected) => {
                "it never connected within 12 h of its notify".to_owned()
            }
            Ok(BridgeEnd::Cancelled) | Ok(BridgeEnd::Retired) => "stopped".to_owned(),
            Err(e) => format!("token rejected: {e}"),
        };
        self.write_status();
        info!(session = id, region = %entry.key.region, services = ?entry.key.services, "session ended: {why}");
    }

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

    /// SIGHUP: a new service map for new streams; live tunnels and connections stay.
    fn reload(&mut self) {
        systemd::reloading();
        match crate::config::load(&self.cfg.path) {
            Ok(new) => {
                let restart_only: Vec<&str> = [
                    (
                        "thing_name",
                        format!("{:?}", new.thing_name) != format!("{:?}", self.cfg.thing_name),
                    ),
                    (
                        "mqtt",
                        format!("{:?}", new.mqtt) != format!("{:?}", self.cfg.mqtt),
                    ),
                    (
                        "tunnel",
                        format!("{:?}", new.tunnel) != format!("{:?}", self.cfg.tunnel),
                    ),
                    (
                        "limits",
                        format!("{:?}", new.limits) != format!("{:?}", self.cfg.limits),
                    ),
                    ("rotation", new.rotation != self.cfg.rotation),
                    ("state_dir", new.state_dir != self.cfg.state_dir),
                    ("proxy", new.proxy != self.cfg.proxy),
                ]
                .into_iter()
                .filter_map(|(k, changed)| changed.then_some(k))
                .collect();
                if !restart_only.is_empty() {
                    warn!(changed = ?restart_only, "these settings take effect at the next restart; only [services] and [things] are reloaded");
                }
                let summary: Vec<String> = new
                    .services
                    .named()
                    .map(|(s, e)| format!("{s} -> {e}"))
                    .collect();
                if let Some((tx, _)) = self.maps.get(&self.cfg.thing_name) {
                    tx.send_replace(Arc::new(new.services.clone()));
                }
                self.cfg.services = new.services;
                self.reload_things(new.things);
                info!(services = ?summary, "service map reloaded; live tunnels keep running");
            }
            // One line per problem would split the record in journald: join them.
            Err(e) => warn!(
                "reload failed, keeping the current service map: {}",
                e.to_string().trim().replace('\n', "; ")
            ),
        }
        self.write_status();
    }

    /// Downstream things added (mapped, subscribed), changed (new map for new streams; live
    /// tunnels stay) or removed (unsubscribed; their tunnels stop).
    fn reload_things(&mut self, things: BTreeMap<String, crate::config::ThingConfig>) {
        let own = self.cfg.thing_name.clone();
        let removed: Vec<String> = self
            .maps
            .keys()
            .filter(|name| **name != own && !things.contains_key(*name))
            .cloned()
            .collect();
        for name in &removed {
            self.maps.remove(name);
            // Every bridge of the thing, one being replaced by a rotation included.
            let mut stopped = 0;
            for live in self.live.values().filter(|l| l.thing == *name) {
                live.cancel.cancel();
                stopped += 1;
            }
            info!(thing = %name, bridges = stopped, "downstream thing removed: unsubscribing; its tunnels stop");
        }
        for (name, t) in &things {
            match self.maps.get(name) {
                Some((tx, _)) => {
                    tx.send_replace(Arc::new(t.services.clone()));
                }
                None => {
                    info!(thing = %name, "downstream thing added: subscribing to its notifications");
                    self.maps
                        .insert(name.clone(), SharedServiceMap::new(t.services.clone()));
                }
            }
        }
        self.cfg.things = things;
        self.table.set_thing_caps(thing_caps(&self.cfg));
        self.downstream_tx
            .send_replace(self.cfg.things.keys().cloned().collect());
    }

    /// The table with each bridge's state and counters, now.
    fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let tunnels = self
            .table
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
        snapshot
    }

    /// Writes status.json and systemd's STATUS=; returns the latter.
    fn write_status(&self) -> String {
        let snapshot = self.snapshot();
        let line = status_line(snapshot.tunnels.len(), &self.mqtt.borrow());
        systemd::status(&line);
        if let Err(e) = self.status.write(&snapshot) {
            debug!(path = %self.status.path().display(), "status not written: {e}");
        }
        line
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
        let drained = tokio::time::timeout(DRAIN, async {
            while self.bridges.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("bridges did not stop within {DRAIN:?}; aborting them");
            self.bridges.shutdown().await;
        }
        info!("agent stopped");
    }
}

/// `things.<name>.max_tunnels`, for the session table.
fn thing_caps(cfg: &Config) -> HashMap<String, usize> {
    cfg.things
        .iter()
        .filter_map(|(name, t)| t.max_tunnels.map(|cap| (name.clone(), cap)))
        .collect()
}

/// The next status client; pending forever without a socket. An accept error (descriptors
/// exhausted) is skipped: the agent's work matters more than its status.
async fn accept_status(socket: Option<&StatusSocket>) -> Option<tokio::net::UnixStream> {
    match socket {
        Some(s) => s.accept().await.ok(),
        None => std::future::pending().await,
    }
}

/// Outside systemd the descriptor limit is the shell's (often 1024): say when the
/// configured limits could exceed it.
fn check_descriptor_limit(cfg: &Config) {
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

/// One session's bridge, with the agent's own time limits for its token and the overlap of
/// a rotation.
struct SessionTask {
    id: u64,
    bridge: Bridge,
    cancel: CancellationToken,
    retire: CancellationToken,
    ends: Ends,
    max_lifetime: Duration,
    connected: mpsc::Sender<Connected>,
}

impl SessionTask {
    async fn run(self) -> SessionExit {
        let SessionTask {
            id,
            bridge,
            cancel,
            retire,
            ends,
            max_lifetime,
            connected,
        } = self;
        let mut state = bridge.state();
        let run = bridge.run(cancel.clone());
        tokio::pin!(run);
        // A retired bridge (its token was replaced) serves until its successor connects,
        // which cancels it, or until the overlap ends.
        let overlap = async {
            retire.cancelled().await;
            tokio::time::sleep(ROTATION_OVERLAP).await;
        };
        tokio::pin!(overlap);
        let exit = |result, expired| SessionExit {
            id,
            result,
            expired,
        };
        let deadline = match ends.lifetime {
            Some(d) => d,
            None => {
                tokio::select! {
                    r = &mut run => return exit(r, None),
                    _ = &mut overlap => {
                        cancel.cancel();
                        return exit(run.await, None);
                    }
                    _ = tokio::time::sleep_until(ends.connect_by) => {
                        info!("the session never connected within 12 h of its notify: giving up on this token");
                        cancel.cancel();
                        return exit(run.await, Some(Expiry::NeverConnected));
                    }
                    true = first_websocket(&mut state) => {}
                }
                let _ = connected
                    .send(Connected {
                        id,
                        at: Moment::now(),
                    })
                    .await;
                Instant::now() + max_lifetime
            }
        };
        tokio::select! {
            r = &mut run => exit(r, None),
            _ = &mut overlap => {
                cancel.cancel();
                exit(run.await, None)
            }
            _ = tokio::time::sleep_until(deadline) => {
                info!("the agent's maximum lifetime for this token ended: closing the session");
                cancel.cancel();
                exit(run.await, Some(Expiry::Lifetime))
            }
        }
    }
}

/// `true` once the bridge had its first websocket session; `false` if it ended first.
async fn first_websocket(state: &mut watch::Receiver<State>) -> bool {
    state.wait_for(|s| s.sessions > 0).await.is_ok()
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

async fn tick(i: &mut Option<tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
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

/// Characters of the last MQTT error shown in STATUS=.
const STATUS_ERROR_CHARS: usize = 160;

#[cfg(test)]
mod status_tests {
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
}

#[cfg(test)]
mod session_task_tests {
    use super::*;
    use crate::bridge::{BridgeConfig, Limits, Role};

    /// A bridge whose data plane never answers (nothing listens on port 1).
    fn unreachable_bridge() -> Bridge {
        Bridge::new(BridgeConfig {
            role: Role::Destination {
                services: SharedServiceMap::from(ServiceMap::default()),
                scope: Scope::Opened(vec!["SSH".into()]),
            },
            endpoint: DataEndpoint::parse_override("ws://127.0.0.1:1").unwrap(),
            tls: None,
            access_token: Secret::new("AQGA-never"),
            client_token: None,
            limits: Limits::default(),
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_never_connects_ends_when_its_connect_deadline_passes() {
        let (connected, _rx) = mpsc::channel(1);
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let task = SessionTask {
            id: 1,
            bridge: unreachable_bridge(),
            cancel: CancellationToken::new(),
            retire: CancellationToken::new(),
            ends: Ends {
                lifetime: None,
                connect_by: start + hour,
            },
            max_lifetime: 10 * hour,
            connected,
        };
        let exit = task.run().await;
        assert_eq!(exit.expired, Some(Expiry::NeverConnected));
        assert!(matches!(exit.result, Ok(BridgeEnd::Cancelled)));
        assert!(start.elapsed() >= hour && start.elapsed() < hour + Duration::from_secs(60));
    }
}
