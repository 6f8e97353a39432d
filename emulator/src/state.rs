//! The emulator's tunnel table: tunnels, their tokens (current and revoked), connected
//! peers and the streams the source has open. No I/O; the lock around it is never held
//! across an await.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

use securetunnel_agent::protocol::Mode;

/// Orders to one connected peer's writer.
#[derive(Debug)]
pub enum PeerCmd {
    /// Raw tunnel frames (prefix included), relayed or injected.
    Frame(Bytes),
    /// Any websocket message, e.g. a text frame to test the client.
    Ws(WsMessage),
    Close(u16, String),
}

#[derive(Debug, Clone)]
pub struct PeerHandle {
    pub id: u64,
    pub tx: mpsc::Sender<PeerCmd>,
    /// Drops the TCP connection without a close frame.
    pub kill: CancellationToken,
    pub subprotocol: &'static str,
    /// The access token this peer's handshake presented.
    pub token: String,
    /// The client token it presented, if any.
    pub client_token: Option<String>,
    /// Fault: the peer stops reading and writing without closing anything.
    pub hole: CancellationToken,
}

/// What happened to a tunnel's peers, in order, for tests that check ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerEvent {
    pub at: std::time::Instant,
    pub mode: Mode,
    pub peer: u64,
    pub access_token: String,
    pub client_token: Option<String>,
    pub kind: PeerEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEventKind {
    Connected,
    /// The connection ended; why.
    Gone(String),
}

#[derive(Debug)]
struct Slot {
    token: String,
    used: bool,
    client_token: Option<String>,
    peer: Option<PeerHandle>,
    last_updated: SystemTime,
}

/// What OpenTunnel was given, as DescribeTunnel returns it.
#[derive(Debug, Clone, Default)]
pub struct TunnelSpec {
    pub description: Option<String>,
    pub tags: Vec<(String, String)>,
    pub thing_name: Option<String>,
    /// `None` when OpenTunnel had no destinationConfig.
    pub services: Option<Vec<String>>,
    pub timeout_minutes: u32,
}

#[derive(Debug)]
pub struct Tunnel {
    pub id: String,
    pub services: Vec<String>,
    pub thing_name: Option<String>,
    pub spec: TunnelSpec,
    pub closed: bool,
    pub created_at: SystemTime,
    pub last_updated_at: SystemTime,
    pub lifetime: Duration,
    slots: [Slot; 2],
    /// service id -> stream id, as opened by the source's STREAM_START.
    pub active_streams: HashMap<String, i32>,
    /// Peer connections and disconnections, oldest first (bounded).
    pub events: std::collections::VecDeque<PeerEvent>,
    /// Pings received from each mode's peers (source, destination).
    pub pings: [u64; 2],
    /// DATA payload bytes relayed toward each mode (source, destination).
    pub data: [u64; 2],
}

/// Peer events kept per tunnel.
const MAX_EVENTS: usize = 4096;

fn idx(mode: Mode) -> usize {
    match mode {
        Mode::Source => 0,
        Mode::Destination => 1,
    }
}

impl Tunnel {
    pub fn peer(&self, mode: Mode) -> Option<&PeerHandle> {
        self.slots[idx(mode)].peer.as_ref()
    }

    /// Installs a new peer, returning the one it replaces.
    pub fn set_peer(&mut self, mode: Mode, peer: PeerHandle) -> Option<PeerHandle> {
        let slot = &mut self.slots[idx(mode)];
        slot.last_updated = SystemTime::now();
        slot.peer.replace(peer)
    }

    /// Removes the peer if it is still `id` (not already replaced).
    pub fn clear_peer(&mut self, mode: Mode, id: u64) -> bool {
        let slot = &mut self.slots[idx(mode)];
        if slot.peer.as_ref().is_some_and(|p| p.id == id) {
            slot.peer = None;
            slot.last_updated = SystemTime::now();
            return true;
        }
        false
    }

    pub fn last_updated(&self, mode: Mode) -> SystemTime {
        self.slots[idx(mode)].last_updated
    }

    /// Pings received from `mode`'s peers.
    pub fn pings(&self, mode: Mode) -> u64 {
        self.pings[idx(mode)]
    }

    pub fn count_data(&mut self, to: Mode, bytes: usize) {
        self.data[idx(to)] += bytes as u64;
    }

    pub fn data_bytes(&self, to: Mode) -> u64 {
        self.data[idx(to)]
    }

    pub fn count_ping(&mut self, mode: Mode) {
        self.pings[idx(mode)] += 1;
    }

    /// Records a peer event.
    pub fn record(&mut self, peer: &PeerHandle, mode: Mode, kind: PeerEventKind) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(PeerEvent {
            at: std::time::Instant::now(),
            mode,
            peer: peer.id,
            access_token: peer.token.clone(),
            client_token: peer.client_token.clone(),
            kind,
        });
    }
}

#[derive(Debug)]
struct TokenRef {
    tunnel: String,
    mode: Mode,
    revoked: bool,
}

/// How a presented token stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenUse {
    Fresh,
    Used { client_token: Option<String> },
    Revoked,
    TunnelClosed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelTokens {
    pub tunnel_id: String,
    pub source_access_token: String,
    pub destination_access_token: String,
}

#[derive(Debug, Default)]
pub struct State {
    tunnels: BTreeMap<String, Tunnel>,
    tokens: HashMap<String, TokenRef>,
    handshakes: HashMap<String, Vec<std::time::Instant>>,
    fail_next: Option<(u32, u16)>,
}

fn new_token() -> String {
    // Shaped like a real CAT: opaque, a few hundred characters.
    let mut t = String::from("AQGA");
    for _ in 0..6 {
        t.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    t
}

impl State {
    pub fn open_tunnel(
        &mut self,
        services: &[&str],
        lifetime: Duration,
        thing_name: Option<&str>,
    ) -> TunnelTokens {
        let spec = TunnelSpec {
            thing_name: thing_name.map(str::to_owned),
            services: Some(services.iter().map(|s| s.to_string()).collect()),
            timeout_minutes: (lifetime.as_secs() / 60).clamp(1, 720) as u32,
            ..TunnelSpec::default()
        };
        self.open_with(spec, lifetime)
    }

    pub fn open_with(&mut self, spec: TunnelSpec, lifetime: Duration) -> TunnelTokens {
        let id = uuid::Uuid::new_v4().to_string();
        let now = SystemTime::now();
        let slot = |token: String| Slot {
            token,
            used: false,
            client_token: None,
            peer: None,
            last_updated: now,
        };
        let (src, dst) = (new_token(), new_token());
        for (t, mode) in [(&src, Mode::Source), (&dst, Mode::Destination)] {
            self.tokens.insert(
                t.clone(),
                TokenRef {
                    tunnel: id.clone(),
                    mode,
                    revoked: false,
                },
            );
        }
        self.tunnels.insert(
            id.clone(),
            Tunnel {
                id: id.clone(),
                services: spec.services.clone().unwrap_or_default(),
                thing_name: spec.thing_name.clone(),
                spec,
                closed: false,
                created_at: now,
                last_updated_at: now,
                lifetime,
                slots: [slot(src.clone()), slot(dst.clone())],
                active_streams: HashMap::new(),
                events: Default::default(),
                pings: [0, 0],
                data: [0, 0],
            },
        );
        TunnelTokens {
            tunnel_id: id,
            source_access_token: src,
            destination_access_token: dst,
        }
    }

    /// Revokes the mode's token and issues a new, unused one.
    pub fn rotate(&mut self, tunnel_id: &str, mode: Mode) -> Option<String> {
        let tunnel = self.tunnels.get_mut(tunnel_id).filter(|t| !t.closed)?;
        let new = new_token();
        tunnel.last_updated_at = SystemTime::now();
        let slot = &mut tunnel.slots[idx(mode)];
        let old = std::mem::replace(&mut slot.token, new.clone());
        slot.used = false;
        slot.client_token = None;
        if let Some(r) = self.tokens.get_mut(&old) {
            r.revoked = true;
        }
        self.tokens.insert(
            new.clone(),
            TokenRef {
                tunnel: tunnel_id.to_owned(),
                mode,
                revoked: false,
            },
        );
        Some(new)
    }

    /// Marks the tunnel closed and hands back its peers, to be sent a close frame.
    pub fn close_tunnel(&mut self, tunnel_id: &str) -> Vec<PeerHandle> {
        let Some(t) = self.tunnels.get_mut(tunnel_id) else {
            return Vec::new();
        };
        t.closed = true;
        t.last_updated_at = SystemTime::now();
        t.active_streams.clear();
        t.slots.iter_mut().filter_map(|s| s.peer.take()).collect()
    }

    pub fn lookup_token(&self, token: &str) -> Option<(String, Mode, TokenUse)> {
        let r = self.tokens.get(token)?;
        let tunnel = self.tunnels.get(&r.tunnel)?;
        let slot = &tunnel.slots[idx(r.mode)];
        let usage = if r.revoked {
            TokenUse::Revoked
        } else if tunnel.closed {
            TokenUse::TunnelClosed
        } else if slot.used {
            TokenUse::Used {
                client_token: slot.client_token.clone(),
            }
        } else {
            TokenUse::Fresh
        };
        Some((r.tunnel.clone(), r.mode, usage))
    }

    pub fn mark_used(&mut self, tunnel_id: &str, mode: Mode, client_token: Option<String>) {
        if let Some(t) = self.tunnels.get_mut(tunnel_id) {
            let slot = &mut t.slots[idx(mode)];
            if !slot.used {
                slot.used = true;
                slot.client_token = client_token;
            }
        }
    }

    pub fn count_handshake(&mut self, token: &str) {
        let times = self.handshakes.entry(token.to_owned()).or_default();
        if times.len() < MAX_EVENTS {
            times.push(std::time::Instant::now());
        }
    }

    pub fn handshakes_for_token(&self, token: &str) -> u64 {
        self.handshakes.get(token).map_or(0, |t| t.len() as u64)
    }

    pub fn handshake_times(&self, token: &str) -> Vec<std::time::Instant> {
        self.handshakes.get(token).cloned().unwrap_or_default()
    }

    pub fn fail_next_handshakes(&mut self, n: u32, status: u16) {
        self.fail_next = (n > 0).then_some((n, status));
    }

    pub fn take_injected_failure(&mut self) -> Option<u16> {
        let (n, status) = self.fail_next?;
        self.fail_next = (n > 1).then_some((n - 1, status));
        Some(status)
    }

    pub fn tunnel(&self, id: &str) -> Option<&Tunnel> {
        self.tunnels.get(id)
    }

    pub fn tunnel_mut(&mut self, id: &str) -> Option<&mut Tunnel> {
        self.tunnels.get_mut(id)
    }

    pub fn tunnels(&self) -> impl Iterator<Item = &Tunnel> {
        self.tunnels.values()
    }

    /// CloseTunnel with `delete`: the tunnel's data goes at once.
    pub fn delete_tunnel(&mut self, tunnel_id: &str) {
        if let Some(t) = self.tunnels.remove(tunnel_id) {
            for slot in &t.slots {
                self.tokens.remove(&slot.token);
            }
        }
    }

    pub fn open_count(&self) -> usize {
        self.tunnels.values().filter(|t| !t.closed).count()
    }
}
