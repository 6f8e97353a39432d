//! One local connection (TCP or Unix socket) bridged to one tunnel connection: connect with
//! bounded retries, then pump bytes both ways until either side ends it.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::log_rate::Kind;
use super::ws::Outbound;
use super::{Limits, Stats};
use crate::lookup::Lookups;
use crate::protocol::{MAX_PAYLOAD, Message};
use crate::services::LocalEndpoint;

/// Smallest read buffer; it grows to `MAX_PAYLOAD` while reads fill it. Nothing is held
/// while a connection is idle.
const MIN_READ: usize = 4096;

/// Rule (short reads are copied): a read that fills less than half its buffer is copied out
/// of it, so what a chunk keeps alive is at most twice what it counts against the upward
/// budget (a grown 64 KiB buffer holding a keystroke would pin 64 KiB for one byte).
pub fn keep_read_buffer(read: usize, capacity: usize) -> bool {
    read.saturating_mul(2) >= capacity
}

/// A local socket. Both directions work through `&self`: the connection's task reads and
/// writes it, and the session writes to it directly while nothing is queued (`Sink`).
#[derive(Debug)]
pub enum LocalStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl LocalStream {
    async fn readable(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => s.readable().await,
            LocalStream::Unix(s) => s.readable().await,
        }
    }

    fn try_read_buf(&self, buf: &mut impl BufMut) -> io::Result<usize> {
        match self {
            LocalStream::Tcp(s) => s.try_read_buf(buf),
            LocalStream::Unix(s) => s.try_read_buf(buf),
        }
    }

    async fn writable(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => s.writable().await,
            LocalStream::Unix(s) => s.writable().await,
        }
    }

    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            LocalStream::Tcp(s) => s.try_write(buf),
            LocalStream::Unix(s) => s.try_write(buf),
        }
    }

    /// Half-close: the consumer reads EOF after what was written.
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            LocalStream::Tcp(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
            LocalStream::Unix(s) => socket2::SockRef::from(s).shutdown(Shutdown::Write),
        }
    }

    /// Makes the close that follows a TCP reset (RST): unsent data is discarded at once
    /// instead of lingering in kernel buffers for a consumer that does not read.
    fn reset_on_close(&self) {
        if let LocalStream::Tcp(s) = self {
            let _ = s.set_zero_linger();
        }
    }

    /// Connects to `endpoint`; a host name is resolved through `lookups`, which keep
    /// `hold` until the resolver answers.
    pub async fn connect<H: Send + 'static>(
        endpoint: &LocalEndpoint,
        lookups: &Lookups,
        hold: H,
    ) -> io::Result<Self> {
        match endpoint {
            LocalEndpoint::Tcp { host, port } => {
                let mut last = None;
                for addr in lookups.resolve(host, *port, hold).await? {
                    match TcpStream::connect(addr).await {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(LocalStream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
                }))
            }
            LocalEndpoint::Unix(path) => Ok(LocalStream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

/// The session's way to a connection's local socket, once its task has one. The link is
/// weak: the socket still closes when the task ends (on a multi-thread runtime, at the latest
/// when a write-through under way at that moment returns).
#[derive(Debug, Default, Clone)]
pub struct Sink(Arc<OnceLock<Weak<LocalStream>>>);

impl Sink {
    fn set(&self, stream: &Arc<LocalStream>) {
        let _ = self.0.set(Arc::downgrade(stream));
    }

    fn get(&self) -> Option<Arc<LocalStream>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

/// Rule (write-through keeps order): tunnel bytes go straight to the local socket only while
/// none are queued for it (nor in its task's hands); otherwise they queue behind the rest.
pub fn may_write_through(queued: usize) -> bool {
    queued == 0
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
        /// Its start message was STREAM_START (it opened the stream).
        by_stream_start: bool,
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
    /// The connection's key in the stream table (never 0).
    pub conn_id: u32,
    /// The connection id the peer uses on the wire (0 for V1/V2 streams).
    pub wire_conn: u32,
    pub cause: ExitCause,
}

/// Payload bytes on their way to a local socket, with their share of the byte budget.
pub type Chunk = (Bytes, super::BudgetPermit);

/// What the session keeps per connection. Dropping it asks the task to flush what is
/// queued toward the local socket and close it; `reset` drops the queue and resets it.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Chunk>,
    pub queued: Arc<AtomicUsize>,
    /// Bytes written to the local socket so far: a consumer making progress moves it.
    pub written: Arc<AtomicU64>,
    pub reset: CancellationToken,
    pub closing: CancellationToken,
    /// `true` once the local socket is up: a consumer is only "stalled" after that.
    pub connected: watch::Receiver<bool>,
    /// The local socket, for `write_through`.
    pub sink: Sink,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// Rule: the waits between local connect attempts: `connect_retry_delay`, doubling, at
/// most `connect_retry_max_delay`; one fewer than `connect_attempts`.
pub fn connect_retry_delays(limits: &Limits) -> impl Iterator<Item = std::time::Duration> {
    let (first, max) = (limits.connect_retry_delay, limits.connect_retry_max_delay);
    let waits = limits.connect_attempts.max(1) as usize - 1;
    std::iter::successors(Some(first.min(max)), move |d| Some((*d * 2).min(max))).take(waits)
}

impl ConnHandle {
    /// Records `len` more queued bytes and the high-water mark in `stats`.
    pub fn note_queued(queued: &AtomicUsize, len: usize, stats: &Stats) {
        let now = queued.fetch_add(len, Ordering::AcqRel) + len;
        stats.max_queued_bytes.fetch_max(now, Ordering::Relaxed);
    }

    /// Writes what the local socket takes of `data` at once, without waiting, when
    /// `may_write_through`: the bytes then need neither a copy nor a trip through the
    /// queue. Returns how many were written; the rest is for the queue. On an error the
    /// socket is left to the task, which meets the failure on its next read or write.
    pub fn write_through(&self, data: &[u8]) -> usize {
        if data.is_empty() || !may_write_through(self.queued.load(Ordering::Acquire)) {
            return 0;
        }
        let Some(stream) = self.sink.get() else {
            return 0;
        };
        match stream.try_write(data) {
            Ok(n) => {
                self.written.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(_) => 0,
        }
    }
}

/// Counts a connection of a service as open for as long as its task exists (ends or is
/// aborted).
#[derive(Debug)]
pub struct OpenGuard(Arc<Stats>, String);

impl OpenGuard {
    pub fn new(stats: Arc<Stats>, service: &str) -> Self {
        stats.count_open(service, true);
        OpenGuard(stats, service.to_owned())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.count_open(&self.1, false);
    }
}

pub struct ConnTask {
    pub id: u64,
    pub service: String,
    pub stream_id: i32,
    pub conn_id: u32,
    pub wire_conn: u32,
    pub rx: mpsc::Receiver<Chunk>,
    pub queued: Arc<AtomicUsize>,
    pub written: Arc<AtomicU64>,
    pub out: mpsc::Sender<Outbound>,
    pub closing: CancellationToken,
    pub reset: CancellationToken,
    pub connected: watch::Sender<bool>,
    /// Where the session finds the local socket once it is up.
    pub sink: Sink,
    /// Bytes read from local sockets and not yet framed: the tunnel's upward budget.
    pub upward: Arc<Semaphore>,
    pub limits: Limits,
    pub stats: Arc<Stats>,
    /// Host names resolve here; a lookup in flight keeps the connection counted.
    pub lookups: Lookups,
    pub open: Arc<OpenGuard>,
}

impl ConnTask {
    pub async fn run(mut self, open: Open) -> ConnExit {
        let stream = match open {
            Open::Accepted { local, started, .. } => {
                // The local socket is up already: a full queue is a consumer's matter.
                self.connected.send_replace(true);
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
        self.connected.send_replace(true);
        let cause = self.pump(stream).await;
        self.exit(cause)
    }

    fn exit(self, cause: ExitCause) -> ConnExit {
        ConnExit {
            id: self.id,
            service: self.service,
            stream_id: self.stream_id,
            conn_id: self.conn_id,
            wire_conn: self.wire_conn,
            cause,
        }
    }

    /// Bounded retries with doubling delays; a reset or close of the connection cancels
    /// the attempt under way, so a refused or reset connection frees its slot at once.
    async fn connect(&self, endpoint: &LocalEndpoint) -> Option<LocalStream> {
        let mut delays = connect_retry_delays(&self.limits);
        for attempt in 1..=self.limits.connect_attempts.max(1) {
            self.stats.local_connects.fetch_add(1, Ordering::Relaxed);
            let result = tokio::select! {
                _ = self.closing.cancelled() => return None,
                _ = self.reset.cancelled() => return None,
                r = tokio::time::timeout(
                    self.limits.connect_timeout,
                    LocalStream::connect(endpoint, &self.lookups, self.open.clone()),
                ) => r,
            };
            let err = match result {
                Ok(Ok(s)) => {
                    if let Some(suppressed) = self.stats.logs.admit(Kind::LocalConnect) {
                        info!(%endpoint, conn = self.conn_id, suppressed, "connected to local service");
                    }
                    return Some(s);
                }
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            };
            if attempt == self.limits.connect_attempts.max(1) {
                if let Some(suppressed) = self.stats.logs.admit(Kind::LocalConnectFailed) {
                    warn!(%endpoint, attempts = attempt, suppressed, "could not connect to local service: {err}");
                }
                return None;
            }
            debug!(%endpoint, attempt, "local connect failed, retrying: {err}");
            tokio::select! {
                _ = self.closing.cancelled() => return None,
                _ = self.reset.cancelled() => return None,
                _ = tokio::time::sleep(delays.next().unwrap_or_default()) => {}
            }
        }
        None
    }

    async fn pump(&mut self, stream: LocalStream) -> ExitCause {
        let stream = Arc::new(stream);
        self.sink.set(&stream);
        let up = pump_up(
            &stream,
            &self.out,
            &self.upward,
            &self.service,
            self.stream_id,
            self.wire_conn,
        );
        let down = pump_down(&stream, &mut self.rx, &self.queued, &self.written);
        tokio::pin!(up, down);
        tokio::select! {
            biased;
            _ = self.reset.cancelled() => {
                stream.reset_on_close();
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

/// Local -> tunnel: every read becomes one DATA message of at most `MAX_PAYLOAD` bytes. The
/// bytes count against the tunnel's upward budget until the websocket writer has framed
/// them, so reading waits while it is spent; one tunnel cannot take another's.
async fn pump_up(
    reader: &LocalStream,
    out: &mpsc::Sender<Outbound>,
    budget: &Arc<Semaphore>,
    service: &str,
    stream_id: i32,
    wire_conn: u32,
) -> io::Result<()> {
    let mut size = MIN_READ;
    loop {
        reader.readable().await?;
        let mut permit = budget
            .clone()
            .acquire_many_owned(size as u32)
            .await
            .map_err(|_| io::Error::other("byte budget closed"))?;
        // Allocate only once data is waiting: idle connections hold no buffer.
        let mut buf = BytesMut::with_capacity(size);
        let n = match reader.try_read_buf(&mut (&mut buf).limit(size)) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // Keep the share of the budget this chunk holds.
        drop(permit.split(size - n));
        let data = if keep_read_buffer(n, buf.capacity()) {
            buf.freeze()
        } else {
            Bytes::copy_from_slice(&buf)
        };
        size = if n == size {
            (size * 2).min(MAX_PAYLOAD)
        } else {
            size.max(MIN_READ)
        };
        let msg = Message::data(stream_id, service, wire_conn, data);
        let data = Outbound::Data {
            msg,
            _budget: permit,
        };
        if out.send(data).await.is_err() {
            return Err(io::Error::other("tunnel session ended"));
        }
    }
}

/// Tunnel -> local: until the session drops the sender, then half-close.
async fn pump_down(
    writer: &LocalStream,
    rx: &mut mpsc::Receiver<Chunk>,
    queued: &AtomicUsize,
    written: &AtomicU64,
) -> io::Result<()> {
    while let Some((chunk, _budget)) = rx.recv().await {
        // Progress is counted per write, so a slow consumer is not taken for a stalled one.
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            writer.writable().await?;
            let n = match writer.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            written.fetch_add(n as u64, Ordering::Relaxed);
            rest = &rest[n..];
        }
        // Counted until written: the chunk in hand is memory held for this connection too.
        // Until then the session does not write through (`may_write_through`).
        queued.fetch_sub(chunk.len(), Ordering::AcqRel);
    }
    writer.shutdown_write()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    #[test]
    fn a_short_local_read_is_copied_out_of_its_buffer() {
        assert!(!keep_read_buffer(1, MAX_PAYLOAD));
        assert!(!keep_read_buffer(2047, MIN_READ));
        assert!(keep_read_buffer(2048, MIN_READ));
        assert!(keep_read_buffer(MAX_PAYLOAD, MAX_PAYLOAD));
    }

    #[tokio::test]
    async fn tunnel_bytes_are_written_through_only_while_none_are_queued() {
        assert!(may_write_through(0));
        assert!(!may_write_through(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut consumer, _) = listener.accept().await.unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let (_up, connected) = watch::channel(true);
        let handle = ConnHandle {
            id: 1,
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            written: Arc::new(AtomicU64::new(0)),
            reset: CancellationToken::new(),
            closing: CancellationToken::new(),
            connected,
            sink: Sink::default(),
        };
        // No local socket yet: everything queues.
        assert_eq!(handle.write_through(b"early"), 0);
        let stream = Arc::new(LocalStream::Tcp(client));
        handle.sink.set(&stream);
        // Bytes queued ahead: these wait behind them.
        handle.queued.store(5, Ordering::Relaxed);
        assert_eq!(handle.write_through(b"later"), 0);
        handle.queued.store(0, Ordering::Relaxed);
        assert_eq!(handle.write_through(b"now"), 3);
        assert_eq!(handle.written.load(Ordering::Relaxed), 3);
        // The socket closes with its task: the session's link does not keep it open.
        drop(stream);
        assert_eq!(handle.write_through(b"gone"), 0);
        let mut got = Vec::new();
        consumer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"now");
    }

    #[test]
    fn local_connects_retry_5_times_with_doubling_delays_from_200_ms_to_2_s() {
        let defaults = Limits::default();
        assert_eq!(defaults.connect_attempts, 5);
        let waits: Vec<_> = connect_retry_delays(&defaults).collect();
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(waits, ms(&[200, 400, 800, 1600]));
        let many = Limits {
            connect_attempts: 7,
            ..defaults
        };
        let waits: Vec<_> = connect_retry_delays(&many).collect();
        assert_eq!(waits, ms(&[200, 400, 800, 1600, 2000, 2000]));
        let once = Limits {
            connect_attempts: 1,
            ..defaults
        };
        assert_eq!(connect_retry_delays(&once).count(), 0);
    }
}
