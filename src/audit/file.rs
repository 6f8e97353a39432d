//! The trail's JSON Lines file in the state directory: a task takes the queued lines in
//! batches and appends each batch on tokio's blocking pool (the runtime never waits on the
//! disk, and an idle agent keeps no thread for it), rotating before the file passes its
//! bound, so the files never hold more than `files x size` bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::{FILE_QUEUE, FileBound};

/// The current file in the state directory; rotated ones are `audit.jsonl.1`, `.2`...
pub const FILE_NAME: &str = "audit.jsonl";
/// The most files `audit.files` may keep.
pub const MAX_FILES: u32 = 10;

enum Msg {
    Line(String),
    Flush(oneshot::Sender<()>),
}

/// Lines written per trip to the blocking pool at most.
const BATCH: usize = 64;

/// The file's writer, fed through a bounded queue.
pub struct FileSink {
    tx: mpsc::Sender<Msg>,
    dropped: Arc<AtomicU64>,
}

/// Rule (rotation): a line that would take a non-empty file past its bound goes to a new
/// file; so no file passes it (lines are far shorter than the smallest bound).
pub fn must_rotate(size: u64, line: u64, bound: u64) -> bool {
    size > 0 && size + line > bound
}

impl FileSink {
    /// Starts the writer of `dir/audit.jsonl` (on the runtime: a task); it appends to what
    /// a previous run left.
    pub fn start(dir: &Path, bound: FileBound) -> io::Result<FileSink> {
        let file = Appender::open(dir, bound)?;
        let (tx, rx) = mpsc::channel(FILE_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_batches(file, rx, dropped.clone()));
        Ok(FileSink { tx, dropped })
    }

    /// Queues a line; a full queue drops it and counts it.
    pub fn append(&self, line: String) {
        if self.tx.try_send(Msg::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once every line queued before is written.
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }

    /// Lines dropped: a full queue or a failed write.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }
}

/// Takes what is queued, up to `BATCH` at a time, and writes it off the runtime; a flush
/// is answered once what was queued before it is written. Ends with the queue.
async fn write_batches(file: Appender, mut rx: mpsc::Receiver<Msg>, dropped: Arc<AtomicU64>) {
    let mut file = Some(file);
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let (mut lines, mut flushed) = (Vec::new(), Vec::new());
        for msg in batch.drain(..) {
            match msg {
                Msg::Line(line) => lines.push(line),
                Msg::Flush(done) => flushed.push(done),
            }
        }
        let (Some(mut f), counted) = (file.take(), dropped.clone()) else {
            return;
        };
        let written = tokio::task::spawn_blocking(move || {
            lines.iter().for_each(|l| f.append(l, &counted));
            f
        });
        match written.await {
            Ok(f) => file = Some(f),
            Err(_) => return,
        }
        flushed.into_iter().for_each(|done| {
            let _ = done.send(());
        });
    }
}

struct Appender {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    bound: FileBound,
    /// A write failed and was said: the next failure is only counted.
    failing: bool,
    /// A failed write left part of a line: the next line starts on a new one.
    partial: bool,
}

impl Appender {
    fn open(dir: &Path, bound: FileBound) -> io::Result<Appender> {
        let path = dir.join(FILE_NAME);
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        Ok(Appender {
            path,
            file: Some(file),
            size,
            bound,
            failing: false,
            partial: false,
        })
    }

    fn append(&mut self, line: &str, dropped: &AtomicU64) {
        match self.write(line) {
            Ok(()) => self.failing = false,
            Err(e) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                // What reached the file (a full disk may take part of a line).
                if let Some(len) = self
                    .file
                    .as_ref()
                    .and_then(|f| f.metadata().ok())
                    .map(|m| m.len())
                {
                    self.partial |= len > self.size;
                    self.size = len;
                }
                if !std::mem::replace(&mut self.failing, true) {
                    warn!(path = %self.path.display(), "audit events not written: {e}; counted as dropped in the status until a write succeeds");
                }
            }
        }
    }

    fn write(&mut self, line: &str) -> io::Result<()> {
        if self.file.is_none() || must_rotate(self.size, line.len() as u64 + 1, self.bound.size) {
            self.rotate()?;
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("no file"))?;
        let mut buf = Vec::with_capacity(line.len() + 2);
        if self.partial {
            buf.push(b'\n');
        }
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        file.write_all(&buf)?;
        self.size += buf.len() as u64;
        self.partial = false;
        Ok(())
    }

    /// `audit.jsonl.N-1` -> `.N` ... `audit.jsonl` -> `.1`, then a new current file; the
    /// oldest beyond `files` is overwritten by the rename.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let name = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        for i in (1..self.bound.files.saturating_sub(1)).rev() {
            rename_if_there(&name(i), &name(i + 1))?;
        }
        if self.bound.files > 1 {
            rename_if_there(&self.path, &name(1))?;
        } else {
            std::fs::remove_file(&self.path).or_else(ignore_missing)?;
        }
        // Left by a run that kept more files; one that cannot go does not stop the trail.
        for i in self.bound.files..=MAX_FILES {
            let _ = std::fs::remove_file(name(i));
        }
        self.file = Some(open_append(&self.path)?);
        self.size = 0;
        self.partial = false;
        Ok(())
    }
}

fn rename_if_there(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to).or_else(ignore_missing)
}

fn ignore_missing(e: io::Error) -> io::Result<()> {
    match e.kind() {
        io::ErrorKind::NotFound => Ok(()),
        _ => Err(e),
    }
}

/// Appends, owner-only, never through a link.
fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}
