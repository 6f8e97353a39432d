//! A tunnel source written by hand, not this project's engine: a V3 websocket that sends
//! exactly the frames a test gives it, as a hostile or home-made source would.

use futures_util::{SinkExt, StreamExt};
use securetunnel_agent::protocol::{FrameCodec, FrameReader, Message, MessageType, SUBPROTOCOL_V3};
use securetunnel_emulator::Emulator;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::codec::Encoder;

use super::{client_tls, within};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct RawSource {
    ws: WebSocketStream<Box<dyn Io>>,
    reader: FrameReader<FrameCodec>,
}

impl RawSource {
    /// Connects to the emulator's data plane as the tunnel's source (TLS when it has it).
    pub async fn connect(emu: &Emulator, source_token: &str) -> RawSource {
        let addr = emu.addr();
        let mut req = format!("ws://{addr}/tunnel?local-proxy-mode=source")
            .into_client_request()
            .unwrap();
        let headers = req.headers_mut();
        headers.insert("sec-websocket-protocol", SUBPROTOCOL_V3.parse().unwrap());
        headers.insert("access-token", source_token.parse().unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io: Box<dyn Io> = match client_tls(emu) {
            Some(tls) => {
                let name = rustls::pki_types::ServerName::from(addr.ip());
                let tls = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .unwrap();
                Box::new(tls)
            }
            None => Box::new(tcp),
        };
        let (ws, _) = tokio_tungstenite::client_async(req, io).await.unwrap();
        RawSource {
            ws,
            reader: FrameReader::new(FrameCodec),
        }
    }

    /// Sends `msgs` as one websocket message.
    pub async fn send(&mut self, msgs: &[Message]) {
        let mut b = bytes::BytesMut::new();
        for m in msgs {
            FrameCodec.encode(m, &mut b).unwrap();
        }
        self.ws.send(Ws::binary(b.freeze())).await.unwrap();
    }

    /// The next tunnel message from the destination (through the service).
    pub async fn next(&mut self) -> Message {
        loop {
            if let Some(m) = self.reader.next_frame().unwrap() {
                return m;
            }
            match within("a message for the raw source", self.ws.next()).await {
                Some(Ok(Ws::Binary(b))) => self.reader.push(b),
                Some(Ok(Ws::Ping(_) | Ws::Pong(_))) => {}
                other => panic!("raw source: unexpected {other:?}"),
            }
        }
    }

    /// The next message that is not SERVICE_IDS.
    pub async fn next_not_service_ids(&mut self) -> Message {
        loop {
            let m = self.next().await;
            if m.kind() != Some(MessageType::ServiceIds) {
                return m;
            }
        }
    }
}
