//! The agent: follows the notify topic and turns every destination token into a running
//! bridge: a new tunnel starts one, a rotation restarts it with the new token, and a tunnel
//! that ends (closed, expired, rejected) leaves the table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::bridge::{
    Bridge, BridgeConfig, BridgeEnd, BridgeError, DataEndpoint, Limits, Phase, Role, State,
};
use crate::config::{Checked, Config};
use crate::notify::{self, MqttState, Notification, NotifyClient};
use crate::services::{ServiceMap, SharedServiceMap};
use crate::session::{Decision, SessionTable, TunnelKey};
use crate::status::{Snapshot, StatusFile, TunnelStatus, systemd};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How long bridges get to close their sockets when the agent stops.
const DRAIN: Duration = Duration::from_secs(5);

type BridgeResult = (u64, Result<BridgeEnd, BridgeError>);

struct Live {
    cancel: CancellationToken,
    state: watch::Receiver<State>,
}

pub struct Agent {
    cfg: Config,
    /// The service map bridges resolve new streams against; replaced on SIGHUP.
    services: SharedServiceMap,
    services_tx: watch::Sender<Arc<ServiceMap>>,
    /// READY=1 has been sent to systemd.
    ready: bool,
    tunnel_tls: Arc<rustls::ClientConfig>,
    table: SessionTable,
    bridges: JoinSet<BridgeResult>,
    live: HashMap<u64, Live>,
    status: StatusFile,
    mqtt: watch::Receiver<MqttState>,
}

impl Agent {
    /// Runs until `cancel`; then stops every bridge (sockets closed) within `DRAIN`.
    pub async fn run(cfg: Config, checked: Checked, cancel: CancellationToken) {
        for w in &checked.warnings {
            warn!("{w}");
        }
        if let Err(e) = std::fs::create_dir_all(&cfg.state_dir) {
            warn!(dir = %cfg.state_dir.display(), "cannot create the state directory: {e}; status.json will not be written");
        }
        let (tx, mut notifications) = mpsc::channel(notify::QUEUE);
        let (mqtt_state, mqtt) = watch::channel(MqttState::Connecting);
        let client = NotifyClient {
            config: cfg.mqtt.clone(),
            tls: checked.mqtt_tls.clone(),
            topic: cfg.notify_topic(),
        };
        let mqtt_task = tokio::spawn(
            client
                .run(tx, mqtt_state, cancel.child_token())
                .instrument(info_span!("mqtt")),
        );
        let (services_tx, services) = SharedServiceMap::new(cfg.services.clone());
        let mut agent = Agent {
            services,
            services_tx,
            ready: false,
            table: SessionTable::new(
                cfg.limits.max_tunnels,
                cfg.limits.max_lifetime,
                cfg.rotation,
            ),
            status: StatusFile::new(&cfg.state_dir),
            tunnel_tls: checked.tunnel_tls,
            bridges: JoinSet::new(),
            live: HashMap::new(),
            mqtt,
            cfg,
        };
        info!(thing = %agent.cfg.thing_name, "agent started");
        agent.write_status();
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!("SIGHUP will not reload the service map: {e}");
                None
            }
        };
        // Fed from this loop: a loop that hangs stops feeding it and systemd restarts us.
        let mut watchdog = systemd::watchdog_interval().map(tokio::time::interval);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some(()) = recv_signal(&mut hangup) => agent.reload(),
                _ = tick(&mut watchdog) => systemd::watchdog(),
                Some(n) = notifications.recv() => agent.on_notification(n),
                Some(done) = agent.bridges.join_next() => {
                    if let Ok((id, result)) = done {
                        agent.on_bridge_end(id, result);
                    }
                }
                Ok(()) = agent.mqtt.changed() => agent.on_mqtt_state(),
            }
        }
        systemd::stopping();
        agent.shutdown().await;
        let _ = mqtt_task.await;
    }

    fn on_mqtt_state(&mut self) {
        let status = self.write_status();
        // Ready once notifications can arrive: the first confirmed subscription.
        if !self.ready && *self.mqtt.borrow() == MqttState::Subscribed {
            self.ready = true;
            systemd::ready(&status);
        }
    }

    fn on_notification(&mut self, n: Notification) {
        let map = self.services.current();
        let unmapped: Vec<&String> = n
            .services
            .iter()
            .filter(|s| map.resolve(s, &n.services).is_none())
            .collect();
        if unmapped.len() == n.services.len() {
            warn!(services = ?n.services, "notify refused: none of the tunnel's services is in the service map");
            return;
        }
        if !unmapped.is_empty() {
            warn!(unmapped = ?unmapped, "services not in the service map: their streams will be refused; the others are served");
        }
        let key = TunnelKey::new(&n.region, &n.services);
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
            Decision::Start { id, deadline } => {
                let (region, services, token) =
                    (n.region.clone(), n.services.clone(), n.token.to_string());
                self.start_bridge(id, n, deadline);
                self.write_status();
                info!(session = id, region = %region, services = ?services, token = %token, "session started");
            }
            Decision::Rotate { old, id, deadline } => {
                if let Some(old) = self.live.remove(&old) {
                    old.cancel.cancel();
                }
                let token = n.token.to_string();
                self.start_bridge(id, n, deadline);
                self.write_status();
                info!(session = id, replaces = old, token = %token, "rotation: restarting the bridge with the new token");
            }
        }
    }

    fn start_bridge(&mut self, id: u64, n: Notification, deadline: Instant) {
        let endpoint = self
            .cfg
            .tunnel
            .endpoint
            .clone()
            .unwrap_or_else(|| DataEndpoint::for_region(&n.region));
        let config = BridgeConfig {
            role: Role::Destination {
                services: self.services.clone(),
            },
            endpoint,
            tls: Some(self.tunnel_tls.clone()),
            access_token: n.token,
            client_token: None,
            limits: Limits {
                max_connections: self.cfg.limits.max_connections_per_tunnel,
                stall_timeout: self.cfg.tunnel.stall_timeout,
                ..Limits::default()
            },
        };
        let bridge = match Bridge::new(config) {
            Ok(b) => b,
            Err(e) => {
                warn!(session = id, "cannot start the bridge: {e}");
                self.table.ended(id);
                return;
            }
        };
        let cancel = CancellationToken::new();
        self.live.insert(
            id,
            Live {
                cancel: cancel.clone(),
                state: bridge.state(),
            },
        );
        let span = info_span!("session", id);
        self.bridges.spawn(
            async move {
                let run = bridge.run(cancel.clone());
                tokio::pin!(run);
                let result = tokio::select! {
                    r = &mut run => r,
                    _ = tokio::time::sleep_until(deadline) => {
                        info!("maximum lifetime reached: closing the session");
                        cancel.cancel();
                        run.await
                    }
                };
                (id, result)
            }
            .instrument(span),
        );
    }

    fn on_bridge_end(&mut self, id: u64, result: Result<BridgeEnd, BridgeError>) {
        self.live.remove(&id);
        let Some(entry) = self.table.ended(id) else {
            debug!(session = id, "replaced bridge stopped");
            return;
        };
        let why = match &result {
            Ok(BridgeEnd::ClosedByService { code, reason }) => {
                format!("closed by the service (code {code}, {reason:?})")
            }
            Ok(BridgeEnd::Cancelled) => "lifetime reached or agent stopping".to_owned(),
            Err(e) => format!("token rejected: {e}"),
        };
        self.write_status();
        info!(session = id, region = %entry.key.region, services = ?entry.key.services, "session ended: {why}");
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
                ]
                .into_iter()
                .filter_map(|(k, changed)| changed.then_some(k))
                .collect();
                if !restart_only.is_empty() {
                    warn!(changed = ?restart_only, "these settings take effect at the next restart; only [services] is reloaded");
                }
                let summary: Vec<String> = new
                    .services
                    .named()
                    .map(|(s, e)| format!("{s} -> {e}"))
                    .collect();
                self.services_tx
                    .send_replace(Arc::new(new.services.clone()));
                self.cfg.services = new.services;
                info!(services = ?summary, "service map reloaded; live tunnels keep running");
            }
            Err(e) => warn!("reload failed, keeping the current service map:\n{e}"),
        }
        self.write_status();
    }

    /// Writes status.json and tells systemd; returns the one-line status.
    fn write_status(&self) -> String {
        let now = Instant::now();
        let tunnels = self
            .table
            .entries()
            .iter()
            .map(|e| {
                let phase = self
                    .live
                    .get(&e.id)
                    .map_or(Phase::Ended, |l| l.state.borrow().phase);
                TunnelStatus::of(e, &format!("{phase:?}").to_lowercase(), now)
            })
            .collect();
        let mqtt = *self.mqtt.borrow();
        let snapshot = Snapshot {
            mqtt: format!("{mqtt:?}").to_lowercase(),
            tunnels,
        };
        let line = format!(
            "{} tunnel(s) live; MQTT {}",
            snapshot.tunnels.len(),
            snapshot.mqtt
        );
        systemd::status(&line);
        if let Err(e) = self.status.write(&snapshot) {
            debug!(path = %self.status.path().display(), "status not written: {e}");
        }
        line
    }

    async fn shutdown(&mut self) {
        for live in self.live.values() {
            live.cancel.cancel();
        }
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
