//! The websocket to the tunneling service: endpoint, upgrade handshake, and the writer task
//! that batches tunnel frames into binary messages and keeps the link pinged.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use futures_util::SinkExt;
use futures_util::stream::SplitSink;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_util::codec::Encoder;
use tracing::error;

use super::Stats;
pub use super::endpoint::DataEndpoint;
use crate::protocol::{
    self, FrameCodec, LENGTH_PREFIX, MAX_HANDSHAKE_REQUEST, MAX_WS_FRAME, MAX_WS_MESSAGE, Message,
    Mode, SUBPROTOCOL_V3,
};
use crate::secret::Secret;

/// Any byte stream a websocket can run over (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The websocket over plain TCP or TLS.
pub type WsStream = WebSocketStream<Box<dyn Io>>;

/// Bytes read from the websocket's stream at a time: one TLS record's plaintext.
pub const READ_BUFFER: usize = 16 * 1024;

/// Websocket limits of the protocol, both directions (docs/protocol.md §1.4), and buffer sizes.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_FRAME))
        // tungstenite zero-fills this much before every read; TLS hands over one record
        // (at most 16 KiB of plaintext) per read, so more is only memset.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

/// Why a websocket handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// TCP connect failed.
    #[error("cannot reach {endpoint}: {source}")]
    Connect {
        /// The endpoint as `wss://host:port`.
        endpoint: String,
        /// The socket error.
        source: io::Error,
    },
    /// The HTTP proxy could not tunnel to the endpoint.
    #[error("cannot reach {endpoint}: {source}")]
    Proxy {
        /// The endpoint as `wss://host:port`.
        endpoint: String,
        /// What the proxy said.
        source: crate::proxy::ProxyError,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake with {endpoint} failed: {source}")]
    Tls {
        /// The endpoint as `wss://host:port`.
        endpoint: String,
        /// The TLS error (certificate, protocol).
        source: io::Error,
    },
    /// The service answered the upgrade with an HTTP error.
    #[error("the service rejected the websocket upgrade: HTTP {status}: {body:?}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// The service's plain-text reason, at most `MAX_REASON` bytes of it.
        body: String,
        /// The service's `channel-id`, when it sent one.
        channel_id: Option<String>,
    },
    /// The 101 response did not carry the offered subprotocol.
    #[error("the service did not echo subprotocol {SUBPROTOCOL_V3}: {0}")]
    Subprotocol(String),
    /// Any other websocket-level failure.
    #[error("websocket handshake failed: {0}")]
    Websocket(tungstenite::Error),
    /// The request would exceed the service's 4 KiB limit.
    #[error(
        "the handshake request would be {0} bytes; the service accepts at most {MAX_HANDSHAKE_REQUEST}: check the access token"
    )]
    RequestTooLarge(usize),
    /// The handshake took longer than allowed.
    #[error("the handshake did not finish within {0:?}")]
    Timeout(Duration),
}

impl HandshakeError {
    /// Rule lives in `protocol::handshake_status_is_retryable`; transport trouble is retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            HandshakeError::Rejected { status, .. } => {
                protocol::handshake_status_is_retryable(*status)
            }
            HandshakeError::RequestTooLarge(_) => false,
            _ => true,
        }
    }
}

/// Everything a handshake needs.
pub struct HandshakeParams<'a> {
    /// Where to connect.
    pub endpoint: &'a DataEndpoint,
    /// Destination or source (the `local-proxy-mode` query).
    pub mode: Mode,
    /// TLS configuration, required for `wss://`.
    pub tls: Option<&'a Arc<rustls::ClientConfig>>,
    /// Sent as the `access-token` header.
    pub access_token: &'a Secret,
    /// Sent as the `client-token` header.
    pub client_token: &'a Secret,
    /// Bound on the whole handshake.
    pub timeout: Duration,
}

/// A websocket that passed the handshake.
pub struct Connected {
    /// The stream, ready for tunnel frames.
    pub ws: WsStream,
    /// The service's `channel-id` header, if any.
    pub channel_id: Option<String>,
}

/// `securetunnel-agent/<version> (<arch>)`.
pub fn user_agent() -> String {
    format!(
        "securetunnel-agent/{} ({})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
}

/// Builds the upgrade request (docs/protocol.md §1.2): subprotocol V3 offered, `access-token` and
/// `client-token` headers, both marked sensitive.
pub fn handshake_request(p: &HandshakeParams<'_>) -> Result<Request, HandshakeError> {
    let mut req = p
        .endpoint
        .url(p.mode)
        .into_client_request()
        .map_err(HandshakeError::Websocket)?;
    let headers = req.headers_mut();
    headers.insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL_V3),
    );
    let secret_header = |s: &Secret| {
        let mut v = HeaderValue::from_str(s.expose()).map_err(|_| {
            HandshakeError::Websocket(tungstenite::Error::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "token contains characters not allowed in an HTTP header",
            )))
        })?;
        v.set_sensitive(true);
        Ok::<_, HandshakeError>(v)
    };
    headers.insert("access-token", secret_header(p.access_token)?);
    headers.insert("client-token", secret_header(p.client_token)?);
    if let Ok(ua) = HeaderValue::from_str(&user_agent()) {
        headers.insert("user-agent", ua);
    }
    let size = request_size(&req);
    if size > MAX_HANDSHAKE_REQUEST {
        return Err(HandshakeError::RequestTooLarge(size));
    }
    Ok(req)
}

/// Bytes of the HTTP/1.1 request as written on the wire.
pub fn request_size<B>(req: &tungstenite::http::Request<B>) -> usize {
    let target = req.uri().path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = "GET ".len() + target + " HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    // tungstenite adds Host, Connection, Upgrade, Sec-WebSocket-Version/Key itself.
    let added = if req.headers().contains_key("sec-websocket-key") {
        0
    } else {
        160
    };
    line + headers + added + 2
}

/// TCP, TLS (unless plain), then the websocket upgrade; bounded by `p.timeout`.
pub async fn connect(p: &HandshakeParams<'_>) -> Result<Connected, HandshakeError> {
    let req = handshake_request(p)?;
    tokio::time::timeout(p.timeout, connect_inner(p, req))
        .await
        .map_err(|_| HandshakeError::Timeout(p.timeout))?
}

async fn connect_inner(p: &HandshakeParams<'_>, req: Request) -> Result<Connected, HandshakeError> {
    let io = transport(p.endpoint, p.tls).await?;
    let (ws, response) = tokio_tungstenite::client_async_with_config(req, io, Some(ws_config()))
        .await
        .map_err(map_ws_error)?;
    let channel_id = check_upgrade_response(&response)?;
    Ok(Connected { ws, channel_id })
}

/// TCP, then TLS unless the endpoint is plain.
async fn transport(
    endpoint: &DataEndpoint,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Box<dyn Io>, HandshakeError> {
    let name = endpoint.to_string();
    let tcp = connect_tcp(endpoint, &name).await?;
    match (endpoint.tls, tls) {
        (true, Some(config)) => {
            let server =
                ServerName::try_from(endpoint.host.clone()).map_err(|e| HandshakeError::Tls {
                    endpoint: name.clone(),
                    source: io::Error::new(io::ErrorKind::InvalidInput, e),
                })?;
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(server, tcp)
                .await
                .map_err(|source| HandshakeError::Tls {
                    endpoint: name,
                    source,
                })?;
            Ok(Box::new(tls))
        }
        (true, None) => Err(HandshakeError::Tls {
            endpoint: name,
            source: io::Error::other("no TLS configuration given for a wss endpoint"),
        }),
        (false, _) => Ok(Box::new(tcp)),
    }
}

/// The service's answer to an upgrade that carries no token (`doctor`'s path check).
#[derive(Debug)]
pub struct Probe {
    /// 101 if it upgraded anyway; the refusal's status otherwise.
    pub status: u16,
    /// The refusal's reason, at most `MAX_REASON` bytes of it.
    pub body: String,
    /// The answer's `Date` header: the service's clock.
    pub date: Option<String>,
}

/// An upgrade without a token through the same TCP, proxy and TLS as a bridge: any HTTP
/// answer proves the path to the service is open.
pub async fn probe(
    endpoint: &DataEndpoint,
    tls: &Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Probe, HandshakeError> {
    let mut req = endpoint
        .url(Mode::Destination)
        .into_client_request()
        .map_err(HandshakeError::Websocket)?;
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(SUBPROTOCOL_V3),
    );
    let exchange = async {
        let io = transport(endpoint, Some(tls)).await?;
        let date = |h: &tungstenite::http::HeaderMap| {
            h.get("date")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        match tokio_tungstenite::client_async_with_config(req, io, Some(ws_config())).await {
            Ok((_, resp)) => Ok(Probe {
                status: resp.status().as_u16(),
                body: String::new(),
                date: date(resp.headers()),
            }),
            Err(tungstenite::Error::Http(resp)) => Ok(Probe {
                status: resp.status().as_u16(),
                body: resp.body().as_deref().map(reason_text).unwrap_or_default(),
                date: date(resp.headers()),
            }),
            Err(e) => Err(map_ws_error(e)),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

/// Rule (docs/protocol.md §1.2): a 101 counts only with the offered subprotocol echoed; the
/// service's `channel-id` is kept for support cases. Returns the channel id.
pub fn check_upgrade_response<B>(
    response: &tungstenite::http::Response<B>,
) -> Result<Option<String>, HandshakeError> {
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    match header("sec-websocket-protocol") {
        Some(sp) if sp == SUBPROTOCOL_V3 => Ok(header("channel-id")),
        other => Err(HandshakeError::Subprotocol(format!("got {other:?}"))),
    }
}

/// The whole client side of an upgrade against `response` (raw bytes from a server), as a
/// synchronous exchange in memory: what the fuzz target drives.
#[cfg(fuzzing)]
pub fn handshake_against(response: &[u8]) -> Result<Option<String>, HandshakeError> {
    struct Exchange<'a>(std::io::Cursor<&'a [u8]>);
    impl io::Read for Exchange<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }
    impl io::Write for Exchange<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let (endpoint, token, client) = (
        DataEndpoint::for_region("us-east-1"),
        Secret::new("AQGA-fuzz"),
        Secret::new("00000000-0000-4000-8000-000000000000"),
    );
    let req = handshake_request(&HandshakeParams {
        endpoint: &endpoint,
        mode: Mode::Destination,
        tls: None,
        access_token: &token,
        client_token: &client,
        timeout: Duration::from_secs(1),
    })?;
    // RFC 6455's example key, so a fuzzed response can carry the matching accept value
    // (s3pPLMBiTxaQ9kYGzzhZRbK+xOo=) and reach the checks after it.
    let mut req = req;
    req.headers_mut().insert(
        "sec-websocket-key",
        HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
    );
    let stream = Exchange(std::io::Cursor::new(response));
    match tungstenite::client::client_with_config(req, stream, Some(ws_config())) {
        Ok((_ws, resp)) => check_upgrade_response(&resp),
        Err(tungstenite::HandshakeError::Failure(e)) => Err(map_ws_error(e)),
        Err(tungstenite::HandshakeError::Interrupted(_)) => {
            Err(HandshakeError::Timeout(Duration::ZERO))
        }
    }
}

/// The websocket's TCP connection, direct or through the proxy: no Nagle delay, and
/// dead-link detection (`net::harden`) from the start.
async fn connect_tcp(endpoint: &DataEndpoint, name: &str) -> Result<TcpStream, HandshakeError> {
    let connect_err = |source| HandshakeError::Connect {
        endpoint: name.to_owned(),
        source,
    };
    let tcp = match (&endpoint.proxy, endpoint.connect_to) {
        (Some(proxy), to) => {
            let (host, port) = match to {
                Some(addr) => (addr.ip().to_string(), addr.port()),
                None => (endpoint.host.clone(), endpoint.port),
            };
            crate::proxy::connect(proxy, &host, port)
                .await
                .map_err(|source| HandshakeError::Proxy {
                    endpoint: name.to_owned(),
                    source,
                })?
        }
        (None, Some(addr)) => TcpStream::connect(addr).await.map_err(connect_err)?,
        (None, None) => TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(connect_err)?,
    };
    tcp.set_nodelay(true).map_err(connect_err)?;
    crate::net::harden(socket2::SockRef::from(&tcp)).map_err(connect_err)?;
    Ok(tcp)
}

/// Bytes of a rejection's body kept for the error: enough for the service's reason.
pub const MAX_REASON: usize = 256;

/// A rejection body as text: lossy UTF-8, trimmed, cut at `MAX_REASON` bytes.
fn reason_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_REASON)]);
    text.trim().to_owned()
}

fn map_ws_error(e: tungstenite::Error) -> HandshakeError {
    match e {
        tungstenite::Error::Http(resp) => HandshakeError::Rejected {
            status: resp.status().as_u16(),
            body: resp.body().as_deref().map(reason_text).unwrap_or_default(),
            channel_id: resp
                .headers()
                .get("channel-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        },
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::SecWebSocketSubProtocolError(e),
        ) => HandshakeError::Subprotocol(e.to_string()),
        other => HandshakeError::Websocket(other),
    }
}

/// What the session hands to the writer.
#[derive(Debug)]
pub enum Outbound {
    /// A control message to frame and send.
    Frame(Message),
    /// DATA read from a local socket, holding its share of the byte budget until framed.
    Data {
        msg: Message,
        _budget: OwnedSemaphorePermit,
    },
    /// Send a close frame and stop.
    Close(u16, &'static str),
}

impl Outbound {
    /// Bytes it takes in a websocket message (a close request takes none).
    fn framed_len(&self) -> usize {
        match self {
            Outbound::Frame(msg) | Outbound::Data { msg, .. } => {
                LENGTH_PREFIX + prost::Message::encoded_len(msg)
            }
            Outbound::Close(..) => 0,
        }
    }

    /// Frames the message into `buf`; a DATA message's budget share is released here, once
    /// its bytes are in `buf` (bounded by `MAX_WS_FRAME`), not after the send. A close
    /// request is returned instead.
    fn frame_into(self, buf: &mut BytesMut, stats: &Stats) -> Option<(u16, &'static str)> {
        match self {
            Outbound::Frame(msg) => encode(&msg, buf),
            Outbound::Data { msg, _budget } => {
                encode(&msg, buf);
                let n = msg.payload.len() as u64;
                stats.bytes_to_tunnel.fetch_add(n, Ordering::Relaxed);
                drop(_budget);
            }
            Outbound::Close(code, reason) => return Some((code, reason)),
        }
        None
    }
}

/// A new batch: the buffer takes back its whole allocation once the previous batch was
/// sent and dropped, so steady traffic reuses one buffer.
fn start_batch(buf: &mut BytesMut) {
    debug_assert!(buf.is_empty());
    buf.reserve(protocol::MAX_SENT_MESSAGE);
}

/// Writes queued frames, several to a websocket message when they are already waiting
/// (`protocol::joins_message`: never above `MAX_SENT_MESSAGE`), and pings every
/// `ping_every`. Ends when the session drops its sender or asks for a close.
pub async fn write_loop(
    mut sink: SplitSink<WsStream, WsMessage>,
    mut rx: mpsc::Receiver<Outbound>,
    ping_every: Duration,
    stats: Arc<Stats>,
) -> Result<(), tungstenite::Error> {
    let mut buf = BytesMut::new();
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A frame that did not fit the last message: it starts the next one.
    let mut carried: Option<Outbound> = None;
    loop {
        let first = if let Some(out) = carried.take() {
            Some(out)
        } else {
            tokio::select! {
                m = rx.recv() => m,
                _ = ping.tick() => {
                    sink.send(WsMessage::Ping(epoch_millis().into_bytes().into())).await?;
                    stats.pings_sent.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            }
        };
        let close = match first {
            None => {
                let _ = sink.close().await;
                return Ok(());
            }
            Some(out) => {
                start_batch(&mut buf);
                let mut close = out.frame_into(&mut buf, &stats);
                // Batch frames that are already waiting, while they fit.
                while close.is_none() {
                    let Ok(next) = rx.try_recv() else { break };
                    if !protocol::joins_message(buf.len(), next.framed_len()) {
                        carried = Some(next);
                        break;
                    }
                    close = next.frame_into(&mut buf, &stats);
                }
                if !buf.is_empty() {
                    sink.send(WsMessage::Binary(buf.split().freeze())).await?;
                }
                close
            }
        };
        if let Some((code, reason)) = close {
            let frame = CloseFrame {
                code: code.into(),
                reason: reason.into(),
            };
            let _ = sink.send(WsMessage::Close(Some(frame))).await;
            return Ok(());
        }
    }
}

fn encode(msg: &Message, buf: &mut BytesMut) {
    if let Err(e) = FrameCodec.encode(msg, buf) {
        // Only reachable by a bug: outgoing payloads are read in chunks of MAX_PAYLOAD.
        error!("dropping an outgoing message that cannot be framed: {e}");
    }
}

fn epoch_millis() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_override_accepts_host_port_and_defaults_to_443_over_tls() {
        let e = DataEndpoint::parse_override("Data.Example.com").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.tls),
            ("data.example.com", 443, true)
        );
        let e = DataEndpoint::parse_override("127.0.0.1:8443").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 8443));
        let e = DataEndpoint::parse_override("[::1]:9000").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 9000));
        assert_eq!(
            e.url(Mode::Source),
            "wss://[::1]:9000/tunnel?local-proxy-mode=source"
        );
        let e = DataEndpoint::parse_override("ws://127.0.0.1:80").unwrap();
        assert!(!e.tls);
        assert!(DataEndpoint::parse_override("ws://example.com:80").is_err());
        assert!(DataEndpoint::parse_override("host:0").is_err());
        assert!(DataEndpoint::parse_override("http://host").is_err());
    }

    #[test]
    fn a_sent_batch_gives_its_buffer_back_to_the_next() {
        use bytes::BufMut;
        let mut buf = BytesMut::new();
        start_batch(&mut buf);
        let first = buf.as_ptr();
        assert!(buf.capacity() >= protocol::MAX_SENT_MESSAGE);
        for n in [protocol::MAX_SENT_MESSAGE, 100, 60_000] {
            buf.put_bytes(1, n);
            let batch = buf.split().freeze();
            assert_eq!((batch.as_ptr(), batch.len()), (first, n));
            drop(batch);
            start_batch(&mut buf);
            assert_eq!(buf.as_ptr(), first, "a new allocation");
        }
    }

    #[test]
    fn region_url_is_the_destination_tunnel_path() {
        assert_eq!(
            DataEndpoint::for_region("eu-west-1").url(Mode::Destination),
            "wss://data.tunneling.iot.eu-west-1.amazonaws.com/tunnel?local-proxy-mode=destination"
        );
    }

    #[test]
    fn host_header_omits_the_default_port() {
        let e = DataEndpoint::for_region("us-east-1");
        assert_eq!(
            e.host_header(),
            "data.tunneling.iot.us-east-1.amazonaws.com"
        );
        let req = handshake_request(&params(&e, &Secret::new("t"), &Secret::new("c"))).unwrap();
        assert_eq!(req.uri().port_u16(), None, "{}", req.uri());
        let e = DataEndpoint::parse_override("127.0.0.1:8443").unwrap();
        assert_eq!(e.host_header(), "127.0.0.1:8443");
        let e = DataEndpoint::parse_override("[::1]").unwrap();
        assert_eq!(e.host_header(), "[::1]");
        let e = DataEndpoint::parse_override("ws://127.0.0.1:80").unwrap();
        assert_eq!(e.host_header(), "127.0.0.1");
    }

    fn params<'a>(e: &'a DataEndpoint, t: &'a Secret, c: &'a Secret) -> HandshakeParams<'a> {
        HandshakeParams {
            endpoint: e,
            mode: Mode::Destination,
            tls: None,
            access_token: t,
            client_token: c,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn handshake_request_carries_tokens_as_sensitive_headers_and_offers_v3() {
        let e = DataEndpoint::for_region("us-east-1");
        let (t, c) = (
            Secret::new("AQGA".repeat(200)),
            Secret::new(uuid::Uuid::new_v4().to_string()),
        );
        let req = handshake_request(&params(&e, &t, &c)).unwrap();
        let h = req.headers();
        assert_eq!(h["sec-websocket-protocol"], SUBPROTOCOL_V3);
        assert!(h["access-token"].is_sensitive());
        assert!(h["client-token"].is_sensitive());
        assert!(request_size(&req) < MAX_HANDSHAKE_REQUEST);
        assert!(
            !format!("{req:?}").contains("AQGA"),
            "tokens leak through Debug"
        );
    }

    #[test]
    fn handshake_request_above_4_kib_is_refused_before_sending() {
        let e = DataEndpoint::for_region("us-east-1");
        let (t, c) = (
            Secret::new("A".repeat(4096)),
            Secret::new(uuid::Uuid::new_v4().to_string()),
        );
        assert!(matches!(
            handshake_request(&params(&e, &t, &c)),
            Err(HandshakeError::RequestTooLarge(n)) if n > MAX_HANDSHAKE_REQUEST
        ));
    }

    #[tokio::test]
    async fn the_websocket_socket_has_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = DataEndpoint::parse_override(&format!("ws://{}", listener.local_addr().unwrap()))
            .unwrap();
        let tcp = connect_tcp(&e, "test").await.unwrap();
        let sock = socket2::SockRef::from(&tcp);
        assert!(sock.keepalive().unwrap());
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(crate::net::USER_TIMEOUT)
        );
        assert!(tcp.nodelay().unwrap());
    }
}
