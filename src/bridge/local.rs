//! One local connection (TCP or Unix socket) bridged to one tunnel connection: connect with
//! bounded retries, then pump bytes both ways until either side ends it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::ws::Outbound;
use super::{Limits, Stats};
use crate::protocol::{MAX_PAYLOAD, Message};
use crate::services::LocalEndpoint;

/// Smallest read buffer; it grows to `MAX_PAYLOAD` while reads fill it. Nothing is held
/// while a connection is idle.
const MIN_READ: usize = 4096;

pub enum LocalStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

enum ReadHalf {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

impl ReadHalf {
    async fn readable(&self) -> io::Result<()> {
        match self {
            ReadHalf::Tcp(r) => r.readable().await,
            ReadHalf::Unix(r) => r.readable().await,
        }
    }

    fn try_read_buf(&self, buf: &mut impl BufMut) -> io::Result<usize> {
        match self {
            ReadHalf::Tcp(r) => r.try_read_buf(buf),
            ReadHalf::Unix(r) => r.try_read_buf(buf),
        }
    }

    /// Makes the close that follows a TCP reset (RST): unsent data is discarded at once
    /// instead of lingering in kernel buffers for a consumer that does not read.
    fn reset_on_close(&self) {
        if let ReadHalf::Tcp(r) = self {
            let _ = r.as_ref().set_zero_linger();
        }
    }
}

type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

impl LocalStream {
    pub async fn connect(endpoint: &LocalEndpoint) -> io::Result<Self> {
        match endpoint {
            LocalEndpoint::Tcp { host, port } => {
                let s = TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                Ok(LocalStream::Tcp(s))
            }
            LocalEndpoint::Unix(path) => Ok(LocalStream::Unix(UnixStream::connect(path).await?)),
        }
    }

    fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            LocalStream::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), Box::new(w))
            }
            LocalStream::Unix(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Unix(r), Box::new(w))
            }
        }
    }
}

/// How the local side of a connection comes to be.
pub enum Open {
    /// Destination: connect to the mapped endpoint. A failure is answered with STREAM_RESET
    /// when the connection was asked for by STREAM_START, CONNECTION_RESET otherwise.
    Connect {
        endpoint: LocalEndpoint,
        by_stream_start: bool,
    },
    /// Source: a client connected to our listener. Its data waits for `started`: the
    /// session has queued its STREAM_START or CONNECTION_START.
    Accepted {
        local: LocalStream,
        started: tokio::sync::oneshot::Receiver<()>,
    },
}

#[derive(Debug)]
pub enum ExitCause {
    ConnectFailed {
        by_stream_start: bool,
    },
    /// The local side closed (EOF) or failed.
    LocalClosed,
    /// The tunnel side ended it (reset); queued bytes were flushed first.
    Flushed,
}

#[derive(Debug)]
pub struct ConnExit {
    pub id: u64,
    pub service: String,
    pub stream_id: i32,
    pub conn_id: u32,
    pub cause: ExitCause,
}

/// What the session keeps per connection. Dropping it asks the task to flush what is
/// queued toward the local socket and close it; `reset` drops the queue and resets it.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Bytes>,
    pub queued: Arc<AtomicUsize>,
    pub reset: CancellationToken,
    pub closing: CancellationToken,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

impl ConnHandle {
    /// Records `len` more queued bytes and the high-water mark in `stats`.
    pub fn note_queued(queued: &AtomicUsize, len: usize, stats: &Stats) {
        let now = queued.fetch_add(len, Ordering::Relaxed) + len;
        stats.max_queued_bytes.fetch_max(now, Ordering::Relaxed);
    }
}

/// Counts a connection as open for as long as its task exists (ends or is aborted).
#[derive(Debug)]
pub struct OpenGuard(Arc<Stats>);

impl OpenGuard {
    pub fn new(stats: Arc<Stats>) -> Self {
        stats.open_connections.fetch_add(1, Ordering::Relaxed);
        OpenGuard(stats)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct ConnTask {
    pub id: u64,
    pub service: String,
    pub stream_id: i32,
    pub conn_id: u32,
    pub rx: mpsc::Receiver<Bytes>,
    pub queued: Arc<AtomicUsize>,
    pub out: mpsc::Sender<Outbound>,
    pub closing: CancellationToken,
    pub reset: CancellationToken,
    pub limits: Limits,
    pub stats: Arc<Stats>,
    pub _open: OpenGuard,
}

impl ConnTask {
    pub async fn run(mut self, open: Open) -> ConnExit {
        let stream = match open {
            Open::Accepted { local, started } => {
                if started.await.is_err() {
                    // The session ended first: nothing was announced to the peer.
                    return self.exit(ExitCause::Flushed);
                }
                local
            }
            Open::Connect {
                endpoint,
                by_stream_start,
            } => match self.connect(&endpoint).await {
                Some(s) => s,
                None => return self.exit(ExitCause::ConnectFailed { by_stream_start }),
            },
        };
        let cause = self.pump(stream).await;
        self.exit(cause)
    }

    fn exit(self, cause: ExitCause) -> ConnExit {
        ConnExit {
            id: self.id,
            service: self.service,
            stream_id: self.stream_id,
            conn_id: self.conn_id,
            cause,
        }
    }

    /// Bounded retries with doubling delays; gives up early if the stream is reset meanwhile.
    async fn connect(&self, endpoint: &LocalEndpoint) -> Option<LocalStream> {
        let mut delay = self.limits.connect_retry_delay;
        for attempt in 1..=self.limits.connect_attempts.max(1) {
            self.stats.local_connects.fetch_add(1, Ordering::Relaxed);
            let result =
                tokio::time::timeout(self.limits.connect_timeout, LocalStream::connect(endpoint))
                    .await;
            let err = match result {
                Ok(Ok(s)) => {
                    info!(%endpoint, conn = self.conn_id, "connected to local service");
                    return Some(s);
                }
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            };
            if attempt == self.limits.connect_attempts.max(1) {
                warn!(%endpoint, attempts = attempt, "could not connect to local service: {err}");
                return None;
            }
            debug!(%endpoint, attempt, "local connect failed, retrying: {err}");
            tokio::select! {
                _ = self.closing.cancelled() => return None,
                _ = self.reset.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(self.limits.connect_retry_max_delay);
        }
        None
    }

    async fn pump(&mut self, stream: LocalStream) -> ExitCause {
        let (reader, mut writer) = stream.into_split();
        let up = pump_up(
            &reader,
            &self.out,
            &self.service,
            self.stream_id,
            self.conn_id,
        );
        let down = pump_down(&mut writer, &mut self.rx, &self.queued);
        tokio::pin!(up, down);
        tokio::select! {
            biased;
            _ = self.reset.cancelled() => {
                reader.reset_on_close();
                ExitCause::Flushed
            }
            r = &mut up => {
                if let Err(e) = r {
                    debug!(conn = self.conn_id, "local read ended: {e}");
                }
                ExitCause::LocalClosed
            }
            r = &mut down => match r {
                Ok(()) => ExitCause::Flushed,
                Err(e) => {
                    debug!(conn = self.conn_id, "local write failed: {e}");
                    ExitCause::LocalClosed
                }
            },
            _ = self.closing.cancelled() => {
                // Reset by the tunnel: deliver what is queued, within a deadline.
                let _ = tokio::time::timeout(self.limits.close_linger, &mut down).await;
                ExitCause::Flushed
            }
        }
    }
}

/// Local -> tunnel: every read becomes one DATA message of at most `MAX_PAYLOAD` bytes.
async fn pump_up(
    reader: &ReadHalf,
    out: &mpsc::Sender<Outbound>,
    service: &str,
    stream_id: i32,
    conn_id: u32,
) -> io::Result<()> {
    let mut size = MIN_READ;
    loop {
        reader.readable().await?;
        // Allocate only once data is waiting: idle connections hold no buffer.
        let mut buf = BytesMut::with_capacity(size);
        let n = match reader.try_read_buf(&mut (&mut buf).limit(size)) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        size = if n == size {
            (size * 2).min(MAX_PAYLOAD)
        } else {
            size.max(MIN_READ)
        };
        let msg = Message::data(stream_id, service, conn_id, buf.freeze());
        if out.send(Outbound::Frame(msg)).await.is_err() {
            return Err(io::Error::other("tunnel session ended"));
        }
    }
}

/// Tunnel -> local: until the session drops the sender, then half-close.
async fn pump_down(
    writer: &mut WriteHalf,
    rx: &mut mpsc::Receiver<Bytes>,
    queued: &AtomicUsize,
) -> io::Result<()> {
    while let Some(chunk) = rx.recv().await {
        writer.write_all(&chunk).await?;
        // Counted until written: the chunk in hand is memory held for this connection too.
        queued.fetch_sub(chunk.len(), Ordering::Relaxed);
    }
    writer.shutdown().await
}
