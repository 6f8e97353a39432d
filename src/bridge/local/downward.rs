//! The tunnel -> local direction of one connection: its queue, the counters the
//! backpressure rules read, and write-through. They live together because one invariant
//! spans them: bytes reach the local socket in the order the tunnel sent them, and every
//! byte held for the socket is counted from before the task can see it until it is written.
//!
//! - The session writes straight to the socket (`Downward::deliver`) only while nothing is
//!   counted as queued; what the socket does not take is queued as a copy
//!   (`Downward::try_queue`, `Slot::send`), counted first.
//! - The connection's task (`DownwardTask::pump`) writes each chunk, then uncounts it.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::stream::LocalStream;
use crate::bridge::{BudgetPermit, Stats};

/// Payload bytes on their way to a local socket, with their share of the byte budget.
pub type Chunk = (Bytes, BudgetPermit);

#[derive(Debug, Default)]
struct Counters {
    /// Bytes queued or in the task's hands and not yet written.
    queued: AtomicUsize,
    /// Bytes written to the local socket so far: a consumer making progress moves it.
    written: AtomicU64,
}

/// The session's way to a connection's local socket, once its task has one. The link is
/// weak: the socket still closes when the task ends (on a multi-thread runtime, at the latest
/// when a write-through under way at that moment returns).
#[derive(Debug, Default, Clone)]
struct Sink(Arc<OnceLock<Weak<LocalStream>>>);

impl Sink {
    fn set(&self, stream: &Arc<LocalStream>) {
        let _ = self.0.set(Arc::downgrade(stream));
    }

    fn get(&self) -> Option<Arc<LocalStream>> {
        self.0.get().and_then(Weak::upgrade)
    }
}

/// The session's half: write-through and the queue's sending end. Clones share both.
#[derive(Debug, Clone)]
pub struct Downward {
    tx: mpsc::Sender<Chunk>,
    counters: Arc<Counters>,
    sink: Sink,
}

/// The connection task's half: the queue's receiving end.
#[derive(Debug)]
pub struct DownwardTask {
    rx: mpsc::Receiver<Chunk>,
    counters: Arc<Counters>,
    sink: Sink,
}

/// A queue of `depth` chunks toward one local socket: its session and task halves.
pub fn channel(depth: usize) -> (Downward, DownwardTask) {
    let (tx, rx) = mpsc::channel(depth.max(1));
    let (counters, sink) = (Arc::new(Counters::default()), Sink::default());
    let task = DownwardTask {
        rx,
        counters: counters.clone(),
        sink: sink.clone(),
    };
    (Downward { tx, counters, sink }, task)
}

/// Rule (write-through keeps order): tunnel bytes go straight to the local socket only while
/// none are queued for it (nor in its task's hands); otherwise they queue behind the rest.
pub fn may_write_through(queued: usize) -> bool {
    queued == 0
}

/// Rule (bounded memory): what is queued toward a local socket is a copy of the bytes that
/// the socket did not take at once. A payload is a slice of its websocket message, which may
/// be tungstenite's read buffer or a reassembled message twice its size: queued as a slice,
/// a small payload would keep all of that alive.
pub fn remainder_to_queue(payload: &Bytes, written: usize) -> Bytes {
    Bytes::copy_from_slice(&payload[written..])
}

/// Room for one chunk in a connection's queue.
pub struct Slot<'a> {
    permit: mpsc::Permit<'a, Chunk>,
    counters: &'a Counters,
}

impl Slot<'_> {
    /// Counts the chunk, then hands it to the task (which uncounts it once written).
    pub fn send(self, chunk: Chunk, stats: &Stats) {
        count_queued(self.counters, chunk.0.len(), stats);
        self.permit.send(chunk);
    }
}

/// Records `len` more queued bytes and the high-water mark in `stats`.
fn count_queued(counters: &Counters, len: usize, stats: &Stats) {
    let now = counters.queued.fetch_add(len, Ordering::AcqRel) + len;
    stats.max_queued_bytes.fetch_max(now, Ordering::Relaxed);
}

impl Downward {
    /// Writes what the local socket takes of `payload` at once, when `may_write_through`,
    /// and returns a copy of the rest for the queue (`None`: all of it was written). The
    /// payload (a slice of its websocket message) is dropped here. On a write error the
    /// socket is left to the task, which meets the failure on its next read or write.
    pub fn deliver(&self, payload: Bytes) -> Option<Bytes> {
        let through = self.write_through(&payload);
        (through < payload.len()).then(|| remainder_to_queue(&payload, through))
    }

    fn write_through(&self, data: &[u8]) -> usize {
        if data.is_empty() || !may_write_through(self.queued()) {
            return 0;
        }
        let Some(stream) = self.sink.get() else {
            return 0;
        };
        match stream.try_write(data) {
            Ok(n) => {
                self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
                n
            }
            Err(_) => 0,
        }
    }

    /// Queues `chunk` if there is a slot now; gives it back otherwise.
    pub fn try_queue(&self, chunk: Chunk, stats: &Stats) -> Result<(), TrySendError<Chunk>> {
        match self.tx.try_reserve() {
            Ok(permit) => {
                let counters = &self.counters;
                Slot { permit, counters }.send(chunk, stats);
                Ok(())
            }
            Err(TrySendError::Full(())) => Err(TrySendError::Full(chunk)),
            Err(TrySendError::Closed(())) => Err(TrySendError::Closed(chunk)),
        }
    }

    /// Waits for a slot; `None` once the task has ended.
    pub async fn reserve(&self) -> Option<Slot<'_>> {
        let permit = self.tx.reserve().await.ok()?;
        let counters = &self.counters;
        Some(Slot { permit, counters })
    }

    /// Resolves once the task has ended (its queue is gone).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Bytes queued or in the task's hands, not yet written.
    pub fn queued(&self) -> usize {
        self.counters.queued.load(Ordering::Acquire)
    }

    /// Bytes written to the local socket so far.
    pub fn written(&self) -> u64 {
        self.counters.written.load(Ordering::Relaxed)
    }
}

/// Reads how many bytes a connection's socket took, after its task is gone too.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Counters>);

impl Progress {
    /// Bytes written to the local socket so far.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
}

impl DownwardTask {
    /// The written-bytes counter, to read later.
    pub fn progress(&self) -> Progress {
        Progress(self.counters.clone())
    }

    /// The socket is up: from now on the session may write through to it.
    pub fn attach(&self, stream: &Arc<LocalStream>) {
        self.sink.set(stream);
    }

    /// Tunnel -> local: writes the queue in order until the session drops its half, then
    /// half-closes.
    pub async fn pump(&mut self, writer: &LocalStream) -> io::Result<()> {
        while let Some(chunk) = self.rx.recv().await {
            self.write(writer, chunk).await?;
        }
        writer.shutdown_write()
    }

    /// Writes one chunk, counting progress per write (a slow consumer is not a stalled
    /// one), then uncounts it: the chunk in hand is memory held for this connection too, and
    /// until it is written the session does not write through (`may_write_through`).
    async fn write(&self, writer: &LocalStream, (chunk, _budget): Chunk) -> io::Result<()> {
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            writer.writable().await?;
            let n = match writer.try_write(rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            self.counters.written.fetch_add(n as u64, Ordering::Relaxed);
            rest = &rest[n..];
        }
        self.counters
            .queued
            .fetch_sub(chunk.len(), Ordering::AcqRel);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{Budget, TunnelBudget};
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair: our end as a `LocalStream`, and the consumer's end.
    async fn pair() -> (Arc<LocalStream>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap());
        let (ours, accepted) = tokio::join!(ours, listener.accept());
        (
            Arc::new(LocalStream::Tcp(ours.unwrap())),
            accepted.unwrap().0,
        )
    }

    fn chunk(data: &'static [u8]) -> Chunk {
        let budget = TunnelBudget::new(Budget::new(1 << 20), false);
        let permit = budget.try_acquire(data.len() as u32);
        (Bytes::from_static(data), permit.unwrap())
    }

    #[tokio::test]
    async fn tunnel_bytes_are_written_through_only_while_none_are_queued() {
        assert!(may_write_through(0));
        assert!(!may_write_through(1));
        let stats = Stats::default();
        let (down, mut task) = channel(4);
        let (stream, mut consumer) = pair().await;
        let bytes = Bytes::from_static;
        // No local socket yet: everything is for the queue.
        assert_eq!(down.deliver(bytes(b"early")), Some(bytes(b"early")));
        task.attach(&stream);
        // A chunk queued ahead: what follows waits behind it.
        down.try_queue(chunk(b"queued,"), &stats).unwrap();
        assert_eq!(down.queued(), 7);
        assert_eq!(down.deliver(bytes(b"later")), Some(bytes(b"later")));
        assert_eq!(down.written(), 0);
        // The task writes it: the queue is empty, so bytes go straight through again.
        let queued = task.rx.recv().await.unwrap();
        task.write(&stream, queued).await.unwrap();
        assert_eq!(down.queued(), 0);
        assert_eq!(down.deliver(bytes(b"now")), None);
        assert_eq!(down.written(), 10);
        assert_eq!(stats.max_queued_bytes.load(Ordering::Relaxed), 7);
        // The socket closes with its task: the session's link does not keep it open.
        drop((task, stream));
        assert_eq!(down.deliver(bytes(b"gone")), Some(bytes(b"gone")));
        let mut got = Vec::new();
        consumer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"queued,now");
    }

    #[tokio::test]
    async fn queued_bytes_are_counted_until_written_and_the_queue_is_bounded() {
        let stats = Stats::default();
        let (down, mut task) = channel(1);
        let (stream, mut consumer) = pair().await;
        task.attach(&stream);
        down.try_queue(chunk(b"one"), &stats).unwrap();
        assert!(matches!(
            down.try_queue(chunk(b"two"), &stats),
            Err(TrySendError::Full(_))
        ));
        assert_eq!(down.queued(), 3, "a chunk given back is not counted");
        drop(down);
        task.pump(&stream).await.unwrap();
        drop((task, stream));
        let mut got = Vec::new();
        consumer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"one", "the queue is written, then half-closed");
    }

    #[test]
    fn what_is_queued_is_a_copy_of_the_unwritten_rest_of_its_message() {
        let message = Bytes::from(vec![7u8; 4000]);
        let inside = message.as_ptr_range();
        let payload = message.slice(1000..3000);
        let rest = remainder_to_queue(&payload, 500);
        assert_eq!(rest, payload.slice(500..));
        assert!(
            !inside.contains(&rest.as_ptr()),
            "a queued slice pins the message"
        );
        // Even a rest that is nearly all of its message: the message may be twice its size.
        let rest = remainder_to_queue(&message, 1);
        assert!(!inside.contains(&rest.as_ptr()));
    }
}
