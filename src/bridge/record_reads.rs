//! Reads under TLS that end just past the next record's header. rustls keeps the unprocessed
//! tail of its input at the front of its buffer: it moves that tail there after each record,
//! and copies it onto itself once more at the end of every `process_new_packets` (x86_64
//! musl's `memmove` does that a byte at a time). A read that ends 5 bytes into the next
//! record leaves only that header to move. Ending exactly at the record's end would leave
//! nothing, but rustls shrinks its buffer to 4 KiB whenever it empties and regrows it 4 KiB
//! per read (measured: 2x the CPU). Only the length field of each header is read here;
//! rustls checks everything.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// TLS record header: type (1), version (2), length (2) (RFC 8446 §5.1).
const HEADER: usize = 5;

/// Where the stream is in the record structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// `have` bytes of a record header read (`header` holds them).
    Header { have: usize },
    /// Inside a record's body, `left` bytes to its end.
    Body { left: usize },
}

/// Rule (reads end past the next header): inside a record's body, read at most its rest and
/// the next record's header, so rustls keeps only that header; inside a header the body's
/// length is unknown, so the read is not limited (the stream is back in step after it).
fn read_limit(pos: Position) -> Option<usize> {
    match pos {
        Position::Body { left } => Some(left + HEADER),
        Position::Header { .. } => None,
    }
}

/// A stream whose reads end where `read_limit` says; writes pass through.
#[derive(Debug)]
pub struct RecordReads<S> {
    inner: S,
    header: [u8; HEADER],
    pos: Position,
}

impl<S> RecordReads<S> {
    pub fn new(inner: S) -> Self {
        RecordReads {
            inner,
            header: [0; HEADER],
            pos: Position::Header { have: 0 },
        }
    }

    /// Follows the record structure over bytes just read.
    fn track(&mut self, mut read: &[u8]) {
        while !read.is_empty() {
            let n = match self.pos {
                Position::Body { left } => {
                    let n = left.min(read.len());
                    self.pos = match left - n {
                        0 => Position::Header { have: 0 },
                        left => Position::Body { left },
                    };
                    n
                }
                Position::Header { have } => {
                    let n = (HEADER - have).min(read.len());
                    self.header[have..have + n].copy_from_slice(&read[..n]);
                    self.pos = match have + n {
                        HEADER => match u16::from_be_bytes([self.header[3], self.header[4]]) {
                            0 => Position::Header { have: 0 },
                            len => Position::Body { left: len.into() },
                        },
                        have => Position::Header { have },
                    };
                    n
                }
            };
            read = &read[n..];
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RecordReads<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let limit = read_limit(self.pos).map_or(buf.remaining(), |l| l.min(buf.remaining()));
        let this = &mut *self;
        // rustls reads into initialized memory, so this zero-fills nothing there.
        let mut part = ReadBuf::new(buf.initialize_unfilled_to(limit));
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut part))?;
        let n = part.filled().len();
        this.track(part.filled());
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RecordReads<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn record(len: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(fill, len));
        r
    }

    #[test]
    fn reads_end_past_the_next_header() {
        assert_eq!(read_limit(Position::Body { left: 16401 }), Some(16406));
        assert_eq!(read_limit(Position::Body { left: 1 }), Some(6));
        assert_eq!(read_limit(Position::Header { have: 0 }), None);
        assert_eq!(read_limit(Position::Header { have: 3 }), None);
    }

    #[test]
    fn the_record_structure_is_followed_across_any_split() {
        let wire = [record(300, 1), record(0, 2), record(7, 3)].concat();
        for split in 1..wire.len() {
            let mut r = RecordReads::new(());
            r.track(&wire[..split]);
            r.track(&wire[split..]);
            assert_eq!(r.pos, Position::Header { have: 0 }, "split at {split}");
        }
        let mut r = RecordReads::new(());
        r.track(&wire[..HEADER + 300 + 3]);
        assert_eq!(r.pos, Position::Header { have: 3 });
        r.track(&wire[HEADER + 300..][3..HEADER]);
        assert_eq!(r.pos, Position::Header { have: 0 }, "the empty record");
        r.track(&wire[2 * HEADER + 300..][..HEADER]);
        assert_eq!(r.pos, Position::Body { left: 7 });
    }

    /// Once in step, every read of a stream with plenty queued ends 5 bytes into a record,
    /// and every byte arrives in order.
    #[tokio::test]
    async fn reads_deliver_every_byte_and_leave_only_the_next_header() {
        let records = [record(16401, 1), record(300, 2), record(1, 3), record(7, 4)];
        let stream = [&records[..], &records[..], &records[..]].concat();
        let wire: Vec<u8> = stream.concat();
        let starts: Vec<usize> = stream
            .iter()
            .scan(0, |at, r| {
                let s = *at;
                *at += r.len();
                Some(s)
            })
            .collect();
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&wire).await.unwrap();
        drop(tx);
        let mut reader = RecordReads::new(rx);
        // As much room as rustls gives a read at most (a record of 16 KiB + 2 KiB, header).
        let (mut got, mut buf) = (Vec::new(), vec![0u8; 18437]);
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() < wire.len() {
                // The first read is not limited (no header seen yet); every later one ends
                // just past a header.
                let tail = got.len() - HEADER;
                assert!(
                    starts.contains(&tail) || got.len() == n,
                    "a read ended at {} of {}, not past a header",
                    got.len(),
                    wire.len()
                );
            }
        }
        assert_eq!(got, wire);
    }
}
