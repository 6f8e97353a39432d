//! One connected peer of the emulator: its reader validates and relays tunnel frames to the
//! other peer verbatim, its writer sends what it is told (optionally re-framed).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::Shared;
use super::state::{PeerCmd, PeerHandle};
use securetunnel_agent::protocol::RawFrameCodec;
use securetunnel_agent::protocol::{
    FrameReader, LENGTH_PREFIX, MAX_PAYLOAD, MAX_WS_FRAME, Message, MessageType, Mode,
};

pub type PeerIo = super::pong_filter::PongFilter<Box<dyn securetunnel_agent::bridge::Io>>;
pub type PeerWs = WebSocketStream<PeerIo>;

/// Rule (docs/protocol.md §3.1, service side): what a client may send. Returns the decoded message.
pub fn check_client_frame(mode: Mode, raw: &Bytes) -> Result<Message, &'static str> {
    let body = raw.slice(LENGTH_PREFIX..);
    let msg = Message::decode(body.clone()).map_err(|_| "malformed tunnel message")?;
    // Canonical proto3 encoding has exactly this length; anything longer carries fields
    // outside the schema, which the service does not accept.
    if msg.encoded_len() != body.len() {
        return Err("message carries fields outside the schema");
    }
    if msg.payload.len() > MAX_PAYLOAD {
        return Err("payload above 64512 bytes");
    }
    let kind = match msg.kind() {
        Some(MessageType::Unknown) | None if msg.ignorable => return Ok(msg),
        Some(MessageType::Unknown) | None => return Err("unknown message type"),
        Some(k) => k,
    };
    match kind {
        MessageType::SessionReset | MessageType::ServiceIds => {
            Err("clients may not send this message type")
        }
        MessageType::StreamStart | MessageType::ConnectionStart if mode == Mode::Destination => {
            Err("a destination may not open streams or connections")
        }
        _ if msg.stream_id == 0 => Err("stream-bound message with stream id 0"),
        _ => Ok(msg),
    }
}

/// Faults switched on for every accepted peer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Faults {
    /// Cut the connection (no close frame) this long after the upgrade.
    pub drop_after: Option<Duration>,
    /// Black-hole it this long after the upgrade.
    pub hole_after: Option<Duration>,
}

pub async fn run(
    shared: Arc<Shared>,
    tunnel_id: String,
    mode: Mode,
    peer: PeerHandle,
    ws: PeerWs,
    (tx, rx): (mpsc::Sender<PeerCmd>, mpsc::Receiver<PeerCmd>),
    faults: Faults,
) {
    let (kill, hole) = (peer.kill.clone(), peer.hole.clone());
    let drop_after = faults.drop_after;
    if let Some(after) = faults.hole_after {
        let hole = hole.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            hole.cancel();
        });
    }
    let (sink, stream) = ws.split();
    let writer = tokio::spawn(write_loop(
        sink,
        rx,
        kill.clone(),
        hole.clone(),
        shared.clone(),
    ));
    let dropped = async {
        match drop_after {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        _ = kill.cancelled() => "dropped by the emulator",
        _ = dropped => "dropped after the upgrade (fault switch)",
        _ = hole.cancelled() => {
            // Neither reads nor writes, and closes nothing, until it is dropped.
            kill.cancelled().await;
            "black-holed, then dropped"
        }
        why = read_loop(&shared, &tunnel_id, mode, stream, tx) => why,
    };
    debug!(tunnel = %tunnel_id, %mode, "peer gone: {why}");
    kill.cancel();
    let _ = writer.await;
    shared.peer_gone(&tunnel_id, mode, &peer, why);
}

async fn read_loop(
    shared: &Shared,
    tunnel_id: &str,
    mode: Mode,
    mut stream: SplitStream<PeerWs>,
    own: mpsc::Sender<PeerCmd>,
) -> &'static str {
    let mut frames = FrameReader::new(RawFrameCodec);
    let violation = |own: &mpsc::Sender<PeerCmd>, why: &'static str| {
        let _ = own.try_send(PeerCmd::Close(1008, why.to_owned()));
        why
    };
    while let Some(msg) = stream.next().await {
        let data = match msg {
            Ok(WsMessage::Binary(b)) => b,
            Ok(WsMessage::Text(_)) => return violation(&own, "text frames are not allowed"),
            Ok(WsMessage::Close(_)) => return "closed by the client",
            Ok(WsMessage::Ping(_)) => {
                shared.ping_seen(tunnel_id, mode);
                continue;
            }
            Ok(_) => continue,
            Err(_) => return "connection lost",
        };
        if shared.message_too_big(data.len()) {
            let _ = own.try_send(PeerCmd::Close(1009, "message too big".to_owned()));
            return "sent a message above the peer's size limit";
        }
        // tungstenite enforces the 131076-byte frame limit (ws_config). Copied: queued frames
        // must not pin tungstenite's read buffer (the agent copies only what it queues).
        frames.push(Bytes::copy_from_slice(&data));
        let mut batch = Vec::new();
        while let Ok(Some(raw)) = frames.next_frame() {
            match check_client_frame(mode, &raw) {
                Ok(msg) => shared.track(tunnel_id, mode, &msg),
                Err(why) => return violation(&own, why),
            }
            batch.push(raw);
        }
        // The peer on the other side right now; frames for a missing peer are dropped.
        let Some(other) = shared.peer_tx(tunnel_id, mode.peer()) else {
            debug!(tunnel = %tunnel_id, frames = batch.len(), "no {} connected: frames dropped", mode.peer());
            continue;
        };
        for raw in batch {
            if other.send(PeerCmd::Frame(raw)).await.is_err() {
                break;
            }
        }
    }
    "connection lost"
}

async fn write_loop(
    mut sink: SplitSink<PeerWs, WsMessage>,
    mut rx: mpsc::Receiver<PeerCmd>,
    kill: CancellationToken,
    hole: CancellationToken,
    shared: Arc<Shared>,
) {
    let mut pending = BytesMut::new();
    loop {
        let cmd = tokio::select! {
            _ = kill.cancelled() => return,
            _ = hole.cancelled() => {
                kill.cancelled().await;
                return;
            }
            c = rx.recv() => c,
        };
        let result = match cmd {
            None => return,
            Some(PeerCmd::Frame(raw)) if shared.reframe.load(Ordering::Relaxed) => {
                pending.extend_from_slice(&raw);
                let mut close = None;
                // Merge whatever else is waiting, then cut at random points.
                while pending.len() < 2 * MAX_WS_FRAME {
                    match rx.try_recv() {
                        Ok(PeerCmd::Frame(more)) => pending.extend_from_slice(&more),
                        Ok(other) => {
                            close = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let mut r = Ok(());
                while !pending.is_empty() && r.is_ok() {
                    let n = fastrand::usize(1..=pending.len().min(MAX_WS_FRAME));
                    r = sink
                        .send(WsMessage::Binary(pending.split_to(n).freeze()))
                        .await;
                }
                match close {
                    Some(cmd) => send_other(&mut sink, cmd).await,
                    None => r.map(|_| true),
                }
            }
            Some(cmd) => send_other(&mut sink, cmd).await,
        };
        match result {
            Ok(true) => {}
            Ok(false) | Err(_) => return,
        }
    }
}

/// Sends one command; `Ok(false)` when the peer is done (a close was sent).
async fn send_other(
    sink: &mut SplitSink<PeerWs, WsMessage>,
    cmd: PeerCmd,
) -> Result<bool, tokio_tungstenite::tungstenite::Error> {
    match cmd {
        PeerCmd::Frame(raw) => sink.send(WsMessage::Binary(raw)).await.map(|_| true),
        PeerCmd::Ws(m) => sink.send(m).await.map(|_| true),
        PeerCmd::Close(code, reason) => {
            let frame = CloseFrame {
                code: code.into(),
                reason: reason.into(),
            };
            sink.send(WsMessage::Close(Some(frame)))
                .await
                .map(|_| false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;
    use tokio_util::codec::Encoder;

    fn frame(msg: &Message) -> Bytes {
        let mut b = BytesMut::new();
        securetunnel_agent::protocol::FrameCodec
            .encode(msg, &mut b)
            .unwrap();
        b.freeze()
    }

    #[test]
    fn service_refuses_what_clients_may_not_send() {
        let start = frame(&Message::stream_start(1, "SSH", 1));
        assert!(check_client_frame(Mode::Source, &start).is_ok());
        assert!(check_client_frame(Mode::Destination, &start).is_err());
        assert!(check_client_frame(Mode::Source, &frame(&Message::session_reset())).is_err());
        assert!(
            check_client_frame(Mode::Source, &frame(&Message::service_ids(&["A".into()]))).is_err()
        );
        let zero = frame(&Message::data(0, "SSH", 1, Bytes::from_static(b"x")));
        assert!(check_client_frame(Mode::Source, &zero).is_err());
    }

    #[test]
    fn service_refuses_fields_outside_the_schema() {
        let mut body = Message::stream_start(1, "SSH", 1).encode_to_vec();
        body.extend_from_slice(&[0x40, 0x01]); // field 8, varint
        let mut raw = BytesMut::new();
        raw.put_u16(body.len() as u16);
        raw.extend_from_slice(&body);
        assert_eq!(
            check_client_frame(Mode::Source, &raw.freeze()),
            Err("message carries fields outside the schema")
        );
    }
}
