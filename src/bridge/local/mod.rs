//! One local connection (TCP or Unix socket) bridged to one tunnel connection: connect with
//! bounded retries, then pump bytes both ways until either side ends it.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::log_rate::Kind;
use super::ws::Outbound;
use super::{Limits, Stats};
use crate::audit::{End, EndCell, TunnelTrail};
use crate::lookup::Lookups;
use crate::protocol::{MAX_PAYLOAD, Message};
use crate::services::LocalEndpoint;

mod audit;
mod downward;
mod stream;

use audit::ConnAudit;
pub use downward::Downward;
pub use stream::LocalStream;

/// Smallest read buffer; it grows to `MAX_PAYLOAD` while reads fill it. Nothing is held
/// while a connection is idle.
const MIN_READ: usize = 4096;

/// Rule (short reads are copied): a read that fills less than half its buffer is copied out
/// of it, so what a chunk keeps alive is at most twice what it counts against the upward
/// budget (a grown 64 KiB buffer holding a keystroke would pin 64 KiB for one byte).
pub fn keep_read_buffer(read: usize, capacity: usize) -> bool {
    read.saturating_mul(2) >= capacity
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

/// Which connection a task serves, as the session and the wire know it.
#[derive(Debug, Clone)]
pub struct ConnIds {
    /// The session's task id: a successor under the same key has another.
    pub id: u64,
    pub service: String,
    pub stream_id: i32,
    /// The connection's key in the stream table (never 0).
    pub conn_id: u32,
    /// The connection id the peer uses on the wire (0 for V1/V2 streams).
    pub wire_conn: u32,
    /// The service's name, for the audit trail: a V1 stream's empty id resolved.
    pub named: String,
}

/// What every connection of a session shares.
#[derive(Clone)]
pub struct ConnShared {
    /// Toward the websocket writer.
    pub out: mpsc::Sender<Outbound>,
    /// Bytes read from local sockets and not yet framed: the tunnel's upward budget.
    pub upward: Arc<Semaphore>,
    pub limits: Limits,
    pub stats: Arc<Stats>,
    /// Host names resolve here; a lookup in flight keeps the connection counted.
    pub lookups: Lookups,
    /// The tunnel's trail, with the websocket's channel id.
    pub audit: TunnelTrail,
}

#[derive(Debug)]
pub struct ConnExit {
    pub ids: ConnIds,
    pub cause: ExitCause,
}

/// What the session keeps per connection. Dropping it asks the task to flush what is
/// queued toward the local socket and close it; `reset` drops the queue and resets it.
#[derive(Debug)]
pub struct ConnHandle {
    id: u64,
    down: Downward,
    reset: CancellationToken,
    closing: CancellationToken,
    /// `true` once the local socket is up: a consumer is only "stalled" after that.
    connected: watch::Receiver<bool>,
    /// Why it was closed, for the audit trail.
    end: Arc<EndCell>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

impl ConnHandle {
    /// The task's id: tells a connection from a successor under the same key.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The tunnel -> local direction: write-through, the queue and its counters.
    pub fn down(&self) -> &Downward {
        &self.down
    }

    /// The local socket is up.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Changes to `is_connected`, to wait on.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Resets the local connection: what is queued is dropped.
    pub fn reset(self, why: End) {
        self.end.set(why);
        self.reset.cancel();
    }

    /// Closes it after what is queued for it is delivered (as dropping it does), recording
    /// why.
    pub fn close(self, why: End) {
        self.end.set(why);
    }
}

/// Closes every connection of `handles` for the same reason.
pub fn close_all(handles: impl IntoIterator<Item = ConnHandle>, why: End) {
    handles.into_iter().for_each(|h| h.close(why));
}

/// Rule: the waits between local connect attempts: `connect_retry_delay`, doubling, at
/// most `connect_retry_max_delay`; one fewer than `connect_attempts`.
pub fn connect_retry_delays(limits: &Limits) -> impl Iterator<Item = std::time::Duration> {
    let (first, max) = (limits.connect_retry_delay, limits.connect_retry_max_delay);
    let waits = limits.connect_attempts.max(1) as usize - 1;
    std::iter::successors(Some(first.min(max)), move |d| Some((*d * 2).min(max))).take(waits)
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

/// A connection's task: connects (or takes an accepted socket), then pumps both ways.
pub struct ConnTask {
    ids: ConnIds,
    shared: ConnShared,
    down: downward::DownwardTask,
    closing: CancellationToken,
    reset: CancellationToken,
    connected: watch::Sender<bool>,
    open: Arc<OpenGuard>,
    audit: ConnAudit,
}

/// A new connection: the handle the session keeps and the task it spawns. The connection
/// counts as open (`Stats::open_connections`) for as long as the task exists.
pub fn connection(ids: ConnIds, shared: ConnShared) -> (ConnHandle, ConnTask) {
    let (down, down_task) = downward::channel(shared.limits.queue_depth);
    let (closing, reset) = (CancellationToken::new(), CancellationToken::new());
    let (connected_tx, connected) = watch::channel(false);
    let open = Arc::new(OpenGuard::new(shared.stats.clone(), &ids.service));
    let end = Arc::new(EndCell::default());
    let audit = ConnAudit::new(shared.audit.clone(), &ids, end.clone());
    let handle = ConnHandle {
        id: ids.id,
        down,
        reset: reset.clone(),
        closing: closing.clone(),
        connected,
        end,
    };
    let task = ConnTask {
        ids,
        shared,
        down: down_task,
        closing,
        reset,
        connected: connected_tx,
        open,
        audit,
    };
    (handle, task)
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
                self.audit.opened(None, self.down.progress());
                local
            }
            Open::Connect {
                endpoint,
                by_stream_start,
            } => match self.connect(&endpoint).await {
                Some(s) => {
                    self.audit
                        .opened(Some(endpoint.to_string()), self.down.progress());
                    s
                }
                None => {
                    self.audit.failed(endpoint.to_string());
                    return self.exit(ExitCause::ConnectFailed { by_stream_start });
                }
            },
        };
        self.connected.send_replace(true);
        let cause = self.pump(stream).await;
        self.exit(cause)
    }

    fn exit(self, cause: ExitCause) -> ConnExit {
        ConnExit {
            ids: self.ids,
            cause,
        }
    }

    /// Bounded retries with doubling delays; a reset or close of the connection cancels
    /// the attempt under way, so a refused or reset connection frees its slot at once.
    async fn connect(&self, endpoint: &LocalEndpoint) -> Option<LocalStream> {
        let mut delays = connect_retry_delays(&self.shared.limits);
        for attempt in 1..=self.shared.limits.connect_attempts.max(1) {
            self.shared
                .stats
                .local_connects
                .fetch_add(1, Ordering::Relaxed);
            let result = tokio::select! {
                _ = self.closing.cancelled() => return None,
                _ = self.reset.cancelled() => return None,
                r = tokio::time::timeout(
                    self.shared.limits.connect_timeout,
                    LocalStream::connect(endpoint, &self.shared.lookups, self.open.clone()),
                ) => r,
            };
            let err = match result {
                Ok(Ok(s)) => {
                    if let Some(suppressed) = self.shared.stats.logs.admit(Kind::LocalConnect) {
                        info!(%endpoint, conn = self.ids.conn_id, suppressed, "connected to local service");
                    }
                    return Some(s);
                }
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
            };
            if attempt == self.shared.limits.connect_attempts.max(1) {
                if let Some(suppressed) = self.shared.stats.logs.admit(Kind::LocalConnectFailed) {
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
        self.down.attach(&stream);
        let up = pump_up(
            &stream,
            &self.shared.out,
            &self.shared.upward,
            &self.ids.service,
            self.ids.stream_id,
            self.ids.wire_conn,
            &self.audit.up,
        );
        let down = self.down.pump(&stream);
        tokio::pin!(up, down);
        tokio::select! {
            biased;
            _ = self.reset.cancelled() => {
                stream.reset_on_close();
                ExitCause::Flushed
            }
            r = &mut up => {
                match r {
                    Ok(()) => self.audit.end.set(End::ServiceClosed),
                    Err(e) => {
                        debug!(conn = self.ids.conn_id, "local read ended: {e}");
                        // A send that failed because the websocket is gone ends with the tunnel.
                        self.audit.end.set(match self.shared.out.is_closed() {
                            true => End::TunnelEnded,
                            false => End::Reset,
                        });
                    }
                }
                ExitCause::LocalClosed
            }
            r = &mut down => match r {
                Ok(()) => ExitCause::Flushed,
                Err(e) => {
                    debug!(conn = self.ids.conn_id, "local write failed: {e}");
                    self.audit.end.set(End::Reset);
                    ExitCause::LocalClosed
                }
            },
            _ = self.closing.cancelled() => {
                // Reset by the tunnel: deliver what is queued, within a deadline.
                let _ = tokio::time::timeout(self.shared.limits.close_linger, &mut down).await;
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
    sent: &AtomicU64,
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
        sent.fetch_add(n as u64, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_short_local_read_is_copied_out_of_its_buffer() {
        assert!(!keep_read_buffer(1, MAX_PAYLOAD));
        assert!(!keep_read_buffer(2047, MIN_READ));
        assert!(keep_read_buffer(2048, MIN_READ));
        assert!(keep_read_buffer(MAX_PAYLOAD, MAX_PAYLOAD));
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
