//! securetunnel-emulator: an offline AWS IoT Secure Tunneling service for testing gateways
//! and tools. Never part of the device binary.
//!
//! Module map:
//! - this file: the data plane. It checks tokens as the service does, relays tunnel frames
//!   verbatim between one source and one destination per tunnel, and has fault switches.
//! - [`state`], `handshake`, `peer`: the tunnel table, the upgrade rules, one connected peer.
//! - [`control`], [`publisher`]: the AWS JSON control plane and the MQTT notify publisher.
//! - [`broker`], [`demo`], [`demo_agent`]: an embedded broker and the one-command demos.
//! - [`pki`], [`testkit`]: throwaway certificates, local services, checked transfers,
//!   log followers and the boto3/aws-cli helpers the tests use.

pub mod broker;
pub mod control;
pub mod demo;
pub mod demo_agent;
mod handshake;
mod peer;
pub mod pki;
mod pong_filter;
pub mod publisher;
pub mod state;
pub mod testkit;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_util::codec::Encoder;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

pub use handshake::{CLIENT_TOKEN_MISMATCH, PREVIOUSLY_USED};
use securetunnel_agent::bridge::ws_config;
use securetunnel_agent::protocol::{FrameCodec, Message, MessageType, Mode, SUBPROTOCOL_V1};
pub use state::{PeerEvent, PeerEventKind, TunnelTokens};

/// What the emulator does to a peer that a new connection of the same mode replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplacedPeer {
    /// Close frame (1000, "replaced by a new connection"): the pre-2022 documented behaviour.
    Close,
    /// Leave it connected: whatever the client does with it is the client's doing.
    Keep,
    /// Cut its TCP connection without a close frame.
    Drop,
}
use state::{PeerCmd, PeerHandle, State};

/// Frames waiting for one peer's writer.
const PEER_QUEUE: usize = 64;

pub enum EmulatorTls {
    /// Mint a CA and a server certificate for localhost / 127.0.0.1 / ::1.
    Generate,
    Pem {
        cert_pem: String,
        key_pem: String,
    },
    /// Plain `ws://` (loopback testing only).
    Plain,
}

pub struct EmulatorConfig {
    pub listen: SocketAddr,
    pub tls: EmulatorTls,
    /// Serve the AWS-compatible control plane (HTTP) on a free loopback port.
    pub control_plane: bool,
    /// Region reported in notifies and ARNs.
    pub region: String,
    /// How long a "minute" of tunnel lifetime lasts (time-scale switch for tests).
    pub minute: Duration,
    /// Where OpenTunnel/RotateTunnelAccessToken publish notifies.
    pub publisher: Option<publisher::PublisherConfig>,
    pub max_open_tunnels: usize,
}

impl EmulatorConfig {
    pub fn loopback(tls: EmulatorTls) -> Self {
        EmulatorConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls,
            control_plane: false,
            region: "us-east-1".into(),
            minute: Duration::from_secs(60),
            publisher: None,
            max_open_tunnels: 1000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Certificate(String),
}

/// State shared by the accept loop, the peers and the handle.
pub struct Shared {
    state: Mutex<State>,
    /// Bumped on every peer change, so waiters wake without polling.
    changes: watch::Sender<u64>,
    reframe: AtomicBool,
    drop_pongs: Arc<AtomicBool>,
    next_peer: AtomicU64,
    disconnect_on_rotate: AtomicBool,
    /// What happens to a peer replaced by a new connection of the same mode.
    replaced_peer: Mutex<ReplacedPeer>,
    /// Whether a (re)connected peer makes the emulator reset the other side's streams.
    reset_on_reconnect: AtomicBool,
    /// Fault: drop every accepted peer this long after its upgrade.
    drop_after: Mutex<Option<Duration>>,
    /// Fault: black-hole every accepted peer this long after its upgrade.
    hole_after: Mutex<Option<Duration>>,
    /// Strictness of a localproxy peer: a peer that sends a websocket message above this
    /// many bytes is closed with 1009 (0: off).
    max_peer_message: AtomicUsize,
    /// The largest websocket message a peer sent.
    largest_peer_message: AtomicUsize,
    region: String,
    minute: Duration,
    max_open_tunnels: usize,
    publisher: Option<publisher::Publisher>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn peer_tx(&self, tunnel: &str, mode: Mode) -> Option<mpsc::Sender<PeerCmd>> {
        let st = self.lock();
        st.tunnel(tunnel)?.peer(mode).map(|p| p.tx.clone())
    }

    /// Follows the source's streams, to reset them toward a replaced peer's partner, and
    /// counts DATA bytes each way.
    fn track(&self, tunnel: &str, from: Mode, msg: &Message) {
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

    fn arn(&self, tunnel_id: &str) -> String {
        format!(
            "arn:aws:iot:{}:123456789012:tunnel/{tunnel_id}",
            self.region
        )
    }

    /// Publishes the destination notify, when a broker is configured.
    async fn notify(&self, thing: &str, token: &str, services: &[String]) {
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
    fn rotate(&self, tunnel_id: &str, mode: Mode) -> Option<String> {
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
    fn message_too_big(&self, len: usize) -> bool {
        self.largest_peer_message.fetch_max(len, Ordering::Relaxed);
        let limit = self.max_peer_message.load(Ordering::Relaxed);
        limit != 0 && len > limit
    }

    fn ping_seen(&self, tunnel: &str, mode: Mode) {
        if let Some(t) = self.lock().tunnel_mut(tunnel) {
            t.count_ping(mode);
        }
        self.changed();
    }

    fn peer_gone(&self, tunnel: &str, mode: Mode, peer: &PeerHandle, why: &str) {
        if let Some(t) = self.lock().tunnel_mut(tunnel) {
            t.clear_peer(mode, peer.id);
            t.record(peer, mode, PeerEventKind::Gone(why.to_owned()));
        }
        self.changed();
    }
}

pub struct Emulator {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: bool,
    ca_pem: Option<String>,
    control_addr: Option<SocketAddr>,
    _accept: AbortOnDropHandle<()>,
    _control: Option<AbortOnDropHandle<()>>,
}

impl Emulator {
    pub async fn start(cfg: EmulatorConfig) -> Result<Emulator, EmulatorError> {
        let (acceptor, ca_pem) = tls_acceptor(cfg.tls, &cfg.region)?;
        let listener =
            TcpListener::bind(cfg.listen)
                .await
                .map_err(|source| EmulatorError::Listen {
                    addr: cfg.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| EmulatorError::Listen {
                addr: cfg.listen,
                source,
            })?;
        let control = if cfg.control_plane {
            let any = SocketAddr::from(([127, 0, 0, 1], 0));
            let l = TcpListener::bind(any)
                .await
                .map_err(|source| EmulatorError::Listen { addr: any, source })?;
            let a = l
                .local_addr()
                .map_err(|source| EmulatorError::Listen { addr: any, source })?;
            Some((l, a))
        } else {
            None
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changes: watch::Sender::new(0),
            reframe: AtomicBool::new(false),
            drop_pongs: Arc::new(AtomicBool::new(false)),
            next_peer: AtomicU64::new(1),
            disconnect_on_rotate: AtomicBool::new(false),
            replaced_peer: Mutex::new(ReplacedPeer::Close),
            reset_on_reconnect: AtomicBool::new(true),
            drop_after: Mutex::new(None),
            hole_after: Mutex::new(None),
            max_peer_message: AtomicUsize::new(0),
            largest_peer_message: AtomicUsize::new(0),
            region: cfg.region,
            minute: cfg.minute,
            max_open_tunnels: cfg.max_open_tunnels,
            publisher: cfg.publisher.map(publisher::Publisher::start),
        });
        let tls = acceptor.is_some();
        let accept = tokio::spawn(accept_loop(listener, acceptor, shared.clone()));
        info!(%addr, tls, "tunneling service emulator listening");
        let (control_addr, control_task) = match control {
            Some((l, a)) => {
                info!(addr = %a, "control plane listening");
                (
                    Some(a),
                    Some(AbortOnDropHandle::new(tokio::spawn(control::serve(
                        l,
                        shared.clone(),
                    )))),
                )
            }
            None => (None, None),
        };
        Ok(Emulator {
            shared,
            addr,
            tls,
            ca_pem,
            control_addr,
            _accept: AbortOnDropHandle::new(accept),
            _control: control_task,
        })
    }

    /// `http://127.0.0.1:<port>`, the `--endpoint-url` for boto3 and aws-cli.
    pub fn control_endpoint(&self) -> Option<String> {
        self.control_addr.map(|a| format!("http://{a}"))
    }

    /// Waits until the notify publisher is connected to its broker.
    pub async fn wait_publisher(&self) {
        if let Some(p) = &self.shared.publisher {
            p.wait_connected().await;
        }
    }

    /// Publishes any payload on any topic through the emulator's MQTT identity (tests).
    pub async fn publish_raw(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match &self.shared.publisher {
            Some(p) => p.publish(topic, payload).await,
            None => Err("no publisher configured".into()),
        }
    }

    /// Calls a control-plane operation in-process (`OpenTunnel`, ...), as over HTTP.
    pub async fn api(
        &self,
        operation: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, control::ApiError> {
        let target = format!("{}{operation}", control::TARGET_PREFIX);
        control::dispatch(&self.shared, &target, &body).await
    }

    /// Switch: what happens to a peer that a new connection of the same mode replaces
    /// (default `Close`).
    pub fn set_replaced_peer(&self, policy: ReplacedPeer) {
        *self
            .shared
            .replaced_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = policy;
    }

    /// Switch: whether a (re)connected peer resets the other side's open streams (default on).
    pub fn set_reset_streams_on_reconnect(&self, on: bool) {
        self.shared.reset_on_reconnect.store(on, Ordering::Relaxed);
    }

    /// Fault: accept every upgrade, then cut the connection (no close frame) after `after`.
    pub fn set_drop_after_upgrade(&self, after: Option<Duration>) {
        *self
            .shared
            .drop_after
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = after;
    }

    /// Fault: black-hole every accepted peer `after` its upgrade (see `black_hole`).
    pub fn set_black_hole_after_upgrade(&self, after: Option<Duration>) {
        *self
            .shared
            .hole_after
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = after;
    }

    /// Every tunnel's id, oldest first.
    pub fn tunnel_ids(&self) -> Vec<String> {
        let st = self.shared.lock();
        let mut t: Vec<_> = st.tunnels().map(|t| (t.created_at, t.id.clone())).collect();
        t.sort();
        t.into_iter().map(|(_, id)| id).collect()
    }

    /// Fault: the peer stops reading and writing without closing anything (a dead link).
    pub fn black_hole(&self, tunnel_id: &str, mode: Mode) -> bool {
        match self.peer(tunnel_id, mode) {
            Some(p) => {
                p.hole.cancel();
                true
            }
            None => false,
        }
    }

    /// Every connection and disconnection of the tunnel's peers, oldest first.
    pub fn peer_events(&self, tunnel_id: &str) -> Vec<PeerEvent> {
        self.shared
            .lock()
            .tunnel(tunnel_id)
            .map(|t| t.events.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// DATA payload bytes relayed toward `mode`'s peers so far.
    pub fn data_bytes_to(&self, tunnel_id: &str, mode: Mode) -> u64 {
        self.shared
            .lock()
            .tunnel(tunnel_id)
            .map_or(0, |t| t.data_bytes(mode))
    }

    /// Pings the tunnel's `mode` peers sent so far (answered or not).
    pub fn pings_received(&self, tunnel_id: &str, mode: Mode) -> u64 {
        self.shared
            .lock()
            .tunnel(tunnel_id)
            .map_or(0, |t| t.pings(mode))
    }

    /// The access and client token the connected peer of `mode` presented.
    pub fn peer_tokens(&self, tunnel_id: &str, mode: Mode) -> Option<(String, Option<String>)> {
        self.peer(tunnel_id, mode)
            .map(|p| (p.token.clone(), p.client_token.clone()))
    }

    /// Switch: cut the connection (no close frame) of the peer whose token is rotated, at once.
    pub fn set_disconnect_on_rotate(&self, on: bool) {
        self.shared
            .disconnect_on_rotate
            .store(on, Ordering::Relaxed);
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The value for `-e/--proxy-endpoint` (or `DataEndpoint::parse_override`).
    pub fn endpoint(&self) -> String {
        if self.tls {
            self.addr.to_string()
        } else {
            format!("ws://{}", self.addr)
        }
    }

    /// PEM of the CA that signed the generated server certificate.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn open_tunnel(&self, services: &[&str], lifetime: Duration) -> TunnelTokens {
        let tokens = self.shared.lock().open_tunnel(services, lifetime, None);
        close_at_lifetime(&self.shared, &tokens.tunnel_id, lifetime);
        tokens
    }

    /// Revokes the mode's token and returns a new one.
    pub fn rotate(&self, tunnel_id: &str, mode: Mode) -> Option<String> {
        self.shared.rotate(tunnel_id, mode)
    }

    /// Whether the peer connected in `mode` presented `token` in its handshake.
    pub fn peer_token_is(&self, tunnel_id: &str, mode: Mode, token: &str) -> bool {
        let st = self.shared.lock();
        st.tunnel(tunnel_id)
            .and_then(|t| t.peer(mode))
            .is_some_and(|p| p.token == token)
    }

    /// Subscribes to changes, for waiting on conditions without missing one.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// CloseTunnel: both peers get a close frame; the tunnel's tokens stop working.
    pub fn close_tunnel(&self, tunnel_id: &str) {
        close_tunnel(&self.shared, tunnel_id, "tunnel closed");
    }

    /// Waits until `mode` of the tunnel is connected (or disconnected, with `connected` false).
    pub async fn wait_peer(&self, tunnel_id: &str, mode: Mode, connected: bool) {
        let mut rx = self.shared.changes.subscribe();
        loop {
            let now = self
                .shared
                .lock()
                .tunnel(tunnel_id)
                .is_some_and(|t| t.peer(mode).is_some());
            if now == connected || rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether the tunnel is closed (CloseTunnel or its lifetime ended).
    pub fn is_closed(&self, tunnel_id: &str) -> bool {
        self.shared
            .lock()
            .tunnel(tunnel_id)
            .is_none_or(|t| t.closed)
    }

    pub fn is_connected(&self, tunnel_id: &str, mode: Mode) -> bool {
        self.shared
            .lock()
            .tunnel(tunnel_id)
            .is_some_and(|t| t.peer(mode).is_some())
    }

    /// Handshakes that presented this token, accepted or not.
    pub fn handshakes_for_token(&self, token: &str) -> u64 {
        self.shared.lock().handshakes_for_token(token)
    }

    /// When each handshake presenting this token arrived, oldest first.
    pub fn handshake_times(&self, token: &str) -> Vec<std::time::Instant> {
        self.shared.lock().handshake_times(token)
    }

    /// The stream the source has open for a service, as the emulator saw it.
    pub fn active_stream(&self, tunnel_id: &str, service: &str) -> Option<i32> {
        self.shared
            .lock()
            .tunnel(tunnel_id)?
            .active_streams
            .get(service)
            .copied()
    }

    /// Fault: cut a peer's connection without a close frame.
    pub fn drop_peer(&self, tunnel_id: &str, mode: Mode) {
        if let Some(p) = self.peer(tunnel_id, mode) {
            p.kill.cancel();
        }
    }

    /// Fault: send a tunnel message (e.g. SESSION_RESET, STREAM_RESET) to a peer.
    pub async fn inject(&self, tunnel_id: &str, mode: Mode, msg: &Message) -> bool {
        let mut raw = BytesMut::new();
        if FrameCodec.encode(msg, &mut raw).is_err() {
            return false;
        }
        self.send_to(tunnel_id, mode, PeerCmd::Frame(raw.freeze()))
            .await
    }

    /// Fault: send any websocket message (a text frame, malformed bytes) to a peer.
    pub async fn inject_ws(&self, tunnel_id: &str, mode: Mode, msg: WsMessage) -> bool {
        self.send_to(tunnel_id, mode, PeerCmd::Ws(msg)).await
    }

    /// Fault: cut relayed byte streams at random points and merge frames into messages.
    pub fn set_reframe(&self, on: bool) {
        self.shared.reframe.store(on, Ordering::Relaxed);
    }

    /// Fault: answer the next `n` handshakes with `status`.
    pub fn fail_next_handshakes(&self, n: u32, status: u16) {
        self.shared.lock().fail_next_handshakes(n, status);
    }

    /// Strictness of a localproxy peer: a peer sending a websocket message of more than
    /// `limit` bytes is closed with 1009 (message too big); `None` accepts up to the frame
    /// limit.
    pub fn set_max_peer_message(&self, limit: Option<usize>) {
        self.shared
            .max_peer_message
            .store(limit.unwrap_or(0), Ordering::Relaxed);
    }

    /// The largest websocket message any peer sent so far.
    pub fn largest_peer_message(&self) -> usize {
        self.shared.largest_peer_message.load(Ordering::Relaxed)
    }

    /// Fault: stop answering pings (pongs are dropped on the way out).
    pub fn set_answer_pings(&self, on: bool) {
        self.shared.drop_pongs.store(!on, Ordering::Relaxed);
    }

    fn peer(&self, tunnel_id: &str, mode: Mode) -> Option<PeerHandle> {
        self.shared.lock().tunnel(tunnel_id)?.peer(mode).cloned()
    }

    async fn send_to(&self, tunnel_id: &str, mode: Mode, cmd: PeerCmd) -> bool {
        match self.peer(tunnel_id, mode) {
            Some(p) => p.tx.send(cmd).await.is_ok(),
            None => false,
        }
    }
}

/// Opens a tunnel from the control plane: lifetime in (scaled) minutes.
fn open_tunnel(shared: &Arc<Shared>, spec: state::TunnelSpec) -> TunnelTokens {
    let lifetime = shared.minute * spec.timeout_minutes;
    let tokens = shared.lock().open_with(spec, lifetime);
    close_at_lifetime(shared, &tokens.tunnel_id, lifetime);
    tokens
}

/// Rotation never extends this: the deadline is fixed when the tunnel opens.
fn close_at_lifetime(shared: &Arc<Shared>, tunnel_id: &str, lifetime: Duration) {
    let (shared, id) = (Arc::downgrade(shared), tunnel_id.to_owned());
    tokio::spawn(async move {
        tokio::time::sleep(lifetime).await;
        if let Some(shared) = shared.upgrade() {
            close_tunnel(&shared, &id, "tunnel lifetime ended");
        }
    });
}

fn close_tunnel(shared: &Shared, tunnel_id: &str, reason: &str) {
    let peers = shared.lock().close_tunnel(tunnel_id);
    for p in peers {
        if p.tx
            .try_send(PeerCmd::Close(1000, reason.to_owned()))
            .is_err()
        {
            p.kill.cancel();
        }
    }
    info!(tunnel = %tunnel_id, reason, "tunnel closed");
    shared.changed();
}

/// The acceptor, and the PEM of the CA that signed a generated certificate. A generated
/// certificate also names the region's real data-plane host, so an agent that derives the
/// endpoint from the notify's region verifies it as it would the real service.
fn tls_acceptor(
    tls: EmulatorTls,
    region: &str,
) -> Result<(Option<TlsAcceptor>, Option<String>), EmulatorError> {
    let cert_err = |e: &dyn std::fmt::Display| EmulatorError::Certificate(e.to_string());
    let (issued, ca_pem) = match tls {
        EmulatorTls::Plain => return Ok((None, None)),
        EmulatorTls::Pem { cert_pem, key_pem } => (pki::Issued { cert_pem, key_pem }, None),
        EmulatorTls::Generate => {
            let ca = pki::TestPki::new("securetunnel emulator CA").map_err(|e| cert_err(&e))?;
            let host = securetunnel_agent::bridge::DataEndpoint::for_region(region).host;
            let issued = ca.server(&[&host]).map_err(|e| cert_err(&e))?;
            (issued, Some(ca.ca_pem()))
        }
    };
    let key = issued.key_der().map_err(|e| cert_err(&e))?;
    let config = rustls::ServerConfig::builder_with_provider(securetunnel_agent::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_err(&e))?
        .with_no_client_auth()
        .with_single_cert(issued.cert_der(), key)
        .map_err(|e| cert_err(&e))?;
    Ok((Some(TlsAcceptor::from(Arc::new(config))), ca_pem))
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    conns.spawn(serve(tcp, tls.clone(), shared.clone()));
                }
                Err(e) => {
                    debug!("emulator accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next() => {}
        }
    }
}

async fn serve(tcp: TcpStream, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn securetunnel_agent::bridge::Io> = match tls {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(s) => Box::new(s),
            Err(e) => {
                debug!("emulator TLS handshake failed: {e}");
                return;
            }
        },
        None => Box::new(tcp),
    };
    let io = pong_filter::PongFilter::new(io, shared.drop_pongs.clone());
    let mut decision = None;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let channel_id = uuid::Uuid::new_v4().to_string();
        let verdict = handshake::decide(&mut shared.lock(), req);
        let channel = HeaderValue::from_str(&channel_id).unwrap_or(HeaderValue::from_static("-"));
        match verdict {
            Ok(accepted) => {
                let h = resp.headers_mut();
                h.insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_static(accepted.subprotocol),
                );
                h.insert("channel-id", channel);
                decision = Some(accepted);
                Ok(resp)
            }
            Err(rejected) => {
                debug!(status = rejected.status, body = %rejected.body, "emulator rejected a handshake");
                let mut err = ErrorResponse::new(Some(rejected.body));
                *err.status_mut() =
                    StatusCode::from_u16(rejected.status).unwrap_or(StatusCode::BAD_REQUEST);
                err.headers_mut().insert("channel-id", channel);
                Err(err)
            }
        }
    };
    let mut ws = match tokio_tungstenite::accept_hdr_async_with_config(
        io,
        callback,
        Some(ws_config()),
    )
    .await
    {
        Ok(ws) => ws,
        Err(e) => {
            debug!("emulator websocket handshake ended: {e}");
            return;
        }
    };
    ws.get_mut().start_framing();
    let Some(accepted) = decision else { return };
    let (tunnel_id, mode) = (accepted.tunnel_id, accepted.mode);
    let id = shared.next_peer.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(PEER_QUEUE);
    let handle = PeerHandle {
        id,
        tx: tx.clone(),
        kill: CancellationToken::new(),
        subprotocol: accepted.subprotocol,
        token: accepted.token,
        client_token: accepted.client_token,
        hole: CancellationToken::new(),
    };
    if !register(&shared, &tunnel_id, mode, handle.clone()) {
        return;
    }
    let faults = peer::Faults {
        drop_after: *shared.drop_after.lock().unwrap_or_else(|e| e.into_inner()),
        hole_after: *shared.hole_after.lock().unwrap_or_else(|e| e.into_inner()),
    };
    peer::run(shared, tunnel_id, mode, handle, ws, (tx, rx), faults).await;
}

/// Installs a newly connected peer: SERVICE_IDS first (V2/V3 peers), the replaced peer
/// closed, and STREAM_RESET for the open streams sent to the other side (docs/protocol.md §3.5).
fn register(shared: &Shared, tunnel_id: &str, mode: Mode, peer: PeerHandle) -> bool {
    let (old, other, resets) = {
        let mut st = shared.lock();
        let Some(t) = st.tunnel_mut(tunnel_id).filter(|t| !t.closed) else {
            return false;
        };
        if peer.subprotocol != SUBPROTOCOL_V1 {
            let mut raw = BytesMut::new();
            if FrameCodec
                .encode(&Message::service_ids(&t.services), &mut raw)
                .is_ok()
            {
                // The queue is new and empty: this cannot fail.
                let _ = peer.tx.try_send(PeerCmd::Frame(raw.freeze()));
            }
        }
        t.record(&peer, mode, PeerEventKind::Connected);
        let old = t.set_peer(mode, peer);
        // A (re)connected peer knows none of the open streams: the service resets them on
        // the other side (docs/protocol.md §3.5), unless the switch is off.
        let resets: Vec<Message> = if shared.reset_on_reconnect.load(Ordering::Relaxed) {
            t.active_streams
                .drain()
                .map(|(service, stream)| Message::stream_reset(stream, &service))
                .collect()
        } else {
            Vec::new()
        };
        (old, t.peer(mode.peer()).cloned(), resets)
    };
    if let Some(old) = old {
        let policy = *shared
            .replaced_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        info!(tunnel = %tunnel_id, %mode, ?policy, "peer replaced by a new connection");
        match policy {
            // A black-holed peer reads no commands: it can only be dropped.
            _ if old.hole.is_cancelled() => old.kill.cancel(),
            ReplacedPeer::Close => {
                if old
                    .tx
                    .try_send(PeerCmd::Close(1000, "replaced by a new connection".into()))
                    .is_err()
                {
                    old.kill.cancel();
                }
            }
            ReplacedPeer::Keep => {}
            ReplacedPeer::Drop => old.kill.cancel(),
        }
    }
    if let Some(other) = other {
        for msg in resets {
            let mut raw = BytesMut::new();
            if FrameCodec.encode(&msg, &mut raw).is_err() {
                continue;
            }
            // The service does not drop its resets: behind a full queue (the other peer busy
            // with data), it is delivered once there is room.
            match other.tx.try_send(PeerCmd::Frame(raw.freeze())) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(cmd)) => {
                    let tx = other.tx.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(cmd).await;
                    });
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    debug!("the other peer is gone: no STREAM_RESET to deliver");
                }
            }
        }
    }
    shared.changed();
    true
}
