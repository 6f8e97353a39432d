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
mod serve;
mod shared;
pub mod state;
pub mod testkit;

use serve::*;
pub use shared::Shared;

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
