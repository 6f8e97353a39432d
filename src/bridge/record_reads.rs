//! Reads under TLS that end just past the next record's header, around large records. rustls
//! keeps the unprocessed
//! tail of its input at the front of its buffer: it moves that tail there after each
//! record, and copies it onto itself once more at the end of every `process_new_packets`
//! (x86_64 musl's `memmove` does that a byte at a time). A read that ends 5 bytes into the next
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

/// Half the largest record: rustls's buffer (~18 KiB) holds at most two records this large,
/// so reading one at a time costs at most one read more than reading what fits, and saves
/// moving the partial record behind it. Smaller records would cost several reads each.
const SMALL: usize = 8192;

/// Where the stream is in the record structure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    /// `have` bytes of a record header read (`header` holds them).
    Header { have: usize },
    /// Inside a record's body, `left` bytes to its end.
    Body { left: usize },
}

/// Rule (reads end past the next header, around large records): inside the body of a large
/// record, or of the record right after one, read at most the rest of it and the next
/// record's header, so rustls keeps only that header to move. Inside a run of small records
/// (messages of an interactive session) the read is not limited, so a burst of them still
/// costs one read, not one each; inside a header the body's length is unknown. Either way
/// the next large record puts the reads back in step.
fn read_limit(pos: Position, len: usize, previous_len: usize) -> Option<usize> {
    match pos {
        Position::Body { left } if len.max(previous_len) >= SMALL => Some(left + HEADER),
        _ => None,
    }
}

/// A stream whose reads end where `read_limit` says; writes pass through.
#[derive(Debug)]
pub struct RecordReads<S> {
    inner: S,
    header: [u8; HEADER],
    pos: Position,
    /// Body length of the current record, and of the one before it.
    len: usize,
    previous_len: usize,
}

impl<S> RecordReads<S> {
    pub fn new(inner: S) -> Self {
        RecordReads {
            inner,
            header: [0; HEADER],
            pos: Position::Header { have: 0 },
            len: 0,
            previous_len: 0,
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
                        HEADER => {
                            let len = u16::from_be_bytes([self.header[3], self.header[4]]).into();
                            self.previous_len = std::mem::replace(&mut self.len, len);
                            match len {
                                0 => Position::Header { have: 0 },
                                left => Position::Body { left },
                            }
                        }
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
        let limit = read_limit(self.pos, self.len, self.previous_len)
            .map_or(buf.remaining(), |l| l.min(buf.remaining()));
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
    use std::collections::VecDeque;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// As much room as rustls gives a read at most (a record of 16 KiB + 2 KiB, and a header).
    const RUSTLS_ROOM: usize = 18437;

    fn record(len: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(fill, len));
        r
    }

    /// Where each record starts in `records` laid end to end.
    fn starts(records: &[Vec<u8>]) -> Vec<usize> {
        records
            .iter()
            .scan(0, |at, r| {
                let s = *at;
                *at += r.len();
                Some(s)
            })
            .collect()
    }

    /// Reads `r` to its end through a buffer of `RUSTLS_ROOM`; returns the bytes and where
    /// each read ended.
    async fn read_all(mut r: impl AsyncRead + Unpin) -> (Vec<u8>, Vec<usize>) {
        let (mut got, mut ends, mut buf) = (Vec::new(), Vec::new(), vec![0u8; RUSTLS_ROOM]);
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return (got, ends);
            }
            got.extend_from_slice(&buf[..n]);
            ends.push(got.len());
        }
    }

    /// Reads `wire`, queued whole as on a socket with plenty arrived, through `RecordReads`;
    /// checks every byte arrived in order and returns where each read ended.
    async fn read_queued(wire: &[u8]) -> Vec<usize> {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(wire).await.unwrap();
        drop(tx);
        let (got, ends) = read_all(RecordReads::new(rx)).await;
        assert_eq!(got, wire);
        ends
    }

    /// Hands out its pieces one read at a time, as a socket does with what has arrived.
    struct Pieces(VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if let Some(mut piece) = self.0.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn reads_end_past_the_next_header_around_large_records() {
        let large = Position::Body { left: 16401 };
        assert_eq!(read_limit(large, 16401, 300), Some(16406));
        assert_eq!(read_limit(Position::Body { left: 1 }, 8192, 0), Some(6));
        // The small record that ends a large message: its reads stay in step too.
        assert_eq!(
            read_limit(Position::Body { left: 50 }, 100, 16384),
            Some(55)
        );
        // A run of small or mid-sized records is read in bulk.
        assert_eq!(read_limit(Position::Body { left: 50 }, 100, 100), None);
        assert_eq!(read_limit(Position::Body { left: 50 }, 5000, 100), None);
        assert_eq!(read_limit(Position::Body { left: 50 }, 100, 5000), None);
        assert_eq!(read_limit(Position::Header { have: 0 }, 16384, 16384), None);
        assert_eq!(read_limit(Position::Header { have: 3 }, 16384, 16384), None);
    }

    #[test]
    fn the_record_structure_is_followed_across_any_split() {
        let wire = [record(300, 1), record(0, 2), record(7, 3)].concat();
        for split in 1..wire.len() {
            let mut r = RecordReads::new(());
            r.track(&wire[..split]);
            r.track(&wire[split..]);
            assert_eq!(r.pos, Position::Header { have: 0 }, "split at {split}");
            assert_eq!((r.len, r.previous_len), (7, 0), "split at {split}");
        }
        let mut r = RecordReads::new(());
        r.track(&wire[..HEADER + 300 + 3]);
        assert_eq!(r.pos, Position::Header { have: 3 });
        assert_eq!((r.len, r.previous_len), (300, 0));
        r.track(&wire[HEADER + 300..][3..HEADER]);
        assert_eq!(r.pos, Position::Header { have: 0 }, "the empty record");
        assert_eq!((r.len, r.previous_len), (0, 300));
        r.track(&wire[2 * HEADER + 300..][..HEADER]);
        assert_eq!(r.pos, Position::Body { left: 7 });
        assert_eq!((r.len, r.previous_len), (7, 0));
    }

    /// Once in step, every read of a stream with plenty queued ends 5 bytes into a record,
    /// and every byte arrives in order.
    #[tokio::test]
    async fn reads_deliver_every_byte_and_leave_only_the_next_header() {
        let message = [
            record(16401, 1),
            record(300, 2),
            record(16000, 3),
            record(7, 4),
        ];
        let stream = [&message[..], &message[..], &message[..]].concat();
        let wire: Vec<u8> = stream.concat();
        let ends = read_queued(&wire).await;
        // The first read is not limited (no header seen yet); every later one ends just
        // past a header, the last at the end of the stream.
        let starts = starts(&stream);
        for end in &ends[1..ends.len() - 1] {
            assert!(
                starts.contains(&(end - HEADER)),
                "a read ended at {end} of {}, not past a header",
                wire.len()
            );
        }
    }

    /// Interactive traffic: a burst of small records queued behind large ones is read in
    /// step up to the second small record, then all at once, not one read per record.
    #[tokio::test]
    async fn a_burst_of_small_records_is_read_in_bulk() {
        let mut stream = vec![record(16401, 1), record(16401, 2)];
        stream.extend((0..60).map(|i| record(100, i)));
        let wire: Vec<u8> = stream.concat();
        let ends = read_queued(&wire).await;
        let s = starts(&stream);
        assert_eq!(
            ends,
            [RUSTLS_ROOM, s[2] + HEADER, s[3] + HEADER, wire.len()]
        );
    }

    /// A short read (the socket had less) leaves the stream mid-record; the reads after it
    /// are back in step.
    #[tokio::test]
    async fn after_short_reads_the_reads_are_back_in_step() {
        let stream = [
            record(16401, 1),
            record(9000, 2),
            record(16000, 3),
            record(12000, 4),
        ];
        let wire: Vec<u8> = stream.concat();
        let pieces = [&wire[..3], &wire[3..5], &wire[5..10_005], &wire[10_005..]];
        let reader = RecordReads::new(Pieces(pieces.iter().map(|p| p.to_vec()).collect()));
        let (got, ends) = read_all(reader).await;
        assert_eq!(got, wire);
        let s = starts(&stream);
        assert_eq!(
            ends,
            [
                3,
                5,
                10_005,
                s[1] + HEADER,
                s[2] + HEADER,
                s[3] + HEADER,
                wire.len()
            ]
        );
    }
}
