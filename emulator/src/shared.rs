//! What the accept loop, the peers and the `Emulator` handle share.

use crate::*;

/// State shared by the accept loop, the peers and the handle.
pub struct Shared {
    pub(crate) state: Mutex<State>,
    /// Bumped on every peer change, so waiters wake without polling.
    pub(crate) changes: watch::Sender<u64>,
    pub(crate) reframe: AtomicBool,
    pub(crate) drop_pongs: Arc<AtomicBool>,
    pub(crate) next_peer: AtomicU64,
    pub(crate) disconnect_on_rotate: AtomicBool,
    /// What happens to a peer replaced by a new connection of the same mode.
    pub(crate) replaced_peer: Mutex<ReplacedPeer>,
    /// Whether a (re)connected peer makes the emulator reset the other side's streams.
    pub(crate) reset_on_reconnect: AtomicBool,
    /// Fault: drop every accepted peer this long after its upgrade.
    pub(crate) drop_after: Mutex<Option<Duration>>,
    /// Fault: black-hole every accepted peer this long after its upgrade.
    pub(crate) hole_after: Mutex<Option<Duration>>,
    /// Strictness of a localproxy peer: a peer that sends a websocket message above this
    /// many bytes is closed with 1009 (0: off).
    pub(crate) max_peer_message: AtomicUsize,
    /// The largest websocket message a peer sent.
    pub(crate) largest_peer_message: AtomicUsize,
    pub(crate) region: String,
    pub(crate) minute: Duration,
    pub(crate) max_open_tunnels: usize,
    pub(crate) publisher: Option<publisher::Publisher>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub(crate) fn peer_tx(&self, tunnel: &str, mode: Mode) -> Option<mpsc::Sender<PeerCmd>> {
        let st = self.lock();
        st.tunnel(tunnel)?.peer(mode).map(|p| p.tx.clone())
    }

    /// Follows the source's streams, to reset them toward a replaced peer's partner, and
    /// counts DATA bytes each way.
    pub(crate) fn track(&self, tunnel: &str, from: Mode, msg: &Message) {
        let kind = msg.kind();
        if kind == Some(MessageType::Data) {
            if let Some(t) = self.lock().tunnel_mut(tunnel) {
                t.count_data(from.peer(), msg.payload.len());
            }
            self.changed();
            return;
        }
        if !matches!(
            kind,
            Some(MessageType::StreamStart) | Some(MessageType::StreamReset)
        ) {
            return;
        }
        let mut st = self.lock();
        let Some(t) = st.tunnel_mut(tunnel) else {
            return;
        };
        match kind {
            Some(MessageType::StreamStart) if from == Mode::Source => {
                t.active_streams
                    .insert(msg.service_id.clone(), msg.stream_id);
            }
            Some(MessageType::StreamReset)
                if t.active_streams.get(&msg.service_id) == Some(&msg.stream_id) =>
            {
                t.active_streams.remove(&msg.service_id);
            }
            _ => {}
        }
    }

    pub(crate) fn arn(&self, tunnel_id: &str) -> String {
        format!(
            "arn:aws:iot:{}:123456789012:tunnel/{tunnel_id}",
            self.region
        )
    }

    /// Publishes the destination notify, when a broker is configured.
    pub(crate) async fn notify(&self, thing: &str, token: &str, services: &[String]) {
        let Some(p) = &self.publisher else {
            debug!(thing, "no MQTT broker configured: notify not published");
            return;
        };
        if let Err(e) = p.publish_notify(thing, token, &self.region, services).await {
            warn!(thing, "notify not published: {e}");
        }
    }

    /// Revokes and reissues a token; with the switch on, the peer that used the old one is
    /// disconnected at once (docs/protocol.md §5.1 leaves the real behaviour open).
    pub(crate) fn rotate(&self, tunnel_id: &str, mode: Mode) -> Option<String> {
        let (token, peer) = {
            let mut st = self.lock();
            let token = st.rotate(tunnel_id, mode)?;
            (
                token,
                st.tunnel(tunnel_id).and_then(|t| t.peer(mode).cloned()),
            )
        };
        // Cut without a close frame: a close frame (1000) would say "tunnel closed", which a
        // rotation is not.
        if let Some(p) = peer.filter(|_| self.disconnect_on_rotate.load(Ordering::Relaxed)) {
            p.kill.cancel();
        }
        Some(token)
    }

    /// Records a peer's message size; `true` when it is above the peer size limit.
    pub(crate) fn message_too_big(&self, len: usize) -> bool {
        self.largest_peer_message.fetch_max(len, Ordering::Relaxed);
        let limit = self.max_peer_message.load(Ordering::Relaxed);
        limit != 0 && len > limit
    }

    pub(crate) fn ping_seen(&self, tunnel: &str, mode: Mode) {
        if let Some(t) = self.lock().tunnel_mut(tunnel) {
            t.count_ping(mode);
        }
        self.changed();
    }

    pub(crate) fn peer_gone(&self, tunnel: &str, mode: Mode, peer: &PeerHandle, why: &str) {
        if let Some(t) = self.lock().tunnel_mut(tunnel) {
            t.clear_peer(mode, peer.id);
            t.record(peer, mode, PeerEventKind::Gone(why.to_owned()));
        }
        self.changed();
    }
}
