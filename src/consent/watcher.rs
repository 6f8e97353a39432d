//! Follows the consent file with inotify: a watch on the nearest existing directory on the
//! way to it, re-armed as directories come and go. Nothing runs while nothing changes there.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::{Gate, Reading, grants, nearest_existing};

/// After a watch could not be set for another reason than a vanished directory, the next
/// try waits this long (consent stays withheld meanwhile).
const REARM_DELAY: Duration = Duration::from_secs(5);

/// What is at `path` now; a link is never followed.
pub fn reading_of(path: &Path) -> Reading {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Reading::Symlink,
        Ok(m) if m.is_file() => Reading::Present,
        Ok(_) => Reading::NotAFile,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            match path.parent() {
                Some(dir) if dir.as_os_str().is_empty() || dir.is_dir() => Reading::Absent,
                _ => Reading::NoDirectory,
            }
        }
        Err(e) => Reading::Unreadable(e.to_string()),
    }
}

/// The running watch; dropping it stops it (the gates it gave then keep the last value).
pub struct Watcher {
    granted: watch::Receiver<bool>,
    _task: AbortOnDropHandle<()>,
}

impl Watcher {
    /// Starts following `path`; consent is as the file is now before this returns.
    pub fn start(path: PathBuf) -> io::Result<Watcher> {
        let events = Inotify::init()?.into_event_stream([0u8; 1024])?;
        let (tx, granted) = watch::channel(false);
        let mut follow = Follow {
            watches: events.watches(),
            path,
            armed: None,
            last: None,
            tx,
        };
        follow.arm(false)?;
        follow.read();
        let task = tokio::spawn(follow.run(events));
        Ok(Watcher {
            granted,
            _task: AbortOnDropHandle::new(task),
        })
    }

    /// A gate on this consent for `services` (empty: all).
    pub fn gate(&self, services: &[String]) -> Gate {
        Gate::new(self.granted.clone(), services)
    }
}

struct Follow {
    watches: Watches,
    path: PathBuf,
    /// The watched directory, the name in it that leads to the file, the watch.
    armed: Option<(PathBuf, OsString, WatchDescriptor)>,
    last: Option<Reading>,
    tx: watch::Sender<bool>,
}

/// What a watched directory reports that can change the consent.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

impl Follow {
    async fn run(mut self, mut events: EventStream<[u8; 1024]>) {
        loop {
            let Some(event) = events.next().await else {
                return;
            };
            let moved = match event {
                Ok(e) => match self.relevant(&e.wd, e.mask, e.name.as_deref()) {
                    Some(moved) => moved,
                    None => continue,
                },
                Err(e) => {
                    warn!(path = %self.path.display(), "site consent: reading inotify events failed: {e}; consent withheld until the agent restarts");
                    publish(&self.tx, false);
                    return;
                }
            };
            while let Err(e) = self.arm(moved) {
                warn!(path = %self.path.display(), "site consent: cannot watch the path: {e}; consent withheld, retrying in {REARM_DELAY:?}");
                publish(&self.tx, false);
                self.last = None;
                tokio::time::sleep(REARM_DELAY).await;
            }
            self.read();
        }
    }

    /// `Some(true)` when the watched directory itself went away or moved, `Some(false)` for
    /// a change of the name that leads to the file, `None` for anything else.
    fn relevant(
        &self,
        wd: &WatchDescriptor,
        mask: EventMask,
        name: Option<&std::ffi::OsStr>,
    ) -> Option<bool> {
        if mask.contains(EventMask::Q_OVERFLOW) {
            return Some(true);
        }
        let (_, leads_to, armed) = self.armed.as_ref()?;
        if wd != armed {
            return None;
        }
        if mask.intersects(EventMask::DELETE_SELF | EventMask::MOVE_SELF | EventMask::IGNORED) {
            return Some(true);
        }
        (name == Some(leads_to.as_os_str())).then_some(false)
    }

    /// Watches the nearest existing directory on the way to the file, unless it already
    /// is (`again`: the watched one moved or went away, watch afresh). The new watch is set
    /// before the old one goes and the way is looked at again after, so a directory created
    /// meanwhile is seen: the loop ends once the nearest directory is the watched one.
    fn arm(&mut self, mut again: bool) -> io::Result<()> {
        loop {
            let (dir, name) = nearest_existing(&self.path).ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no directory on the way exists")
            })?;
            if let Some((d, n, _)) = &mut self.armed
                && !again
                && *d == dir
            {
                *n = name;
                return Ok(());
            }
            let wd = match self.watches.add(&dir, MASK) {
                Ok(wd) => wd,
                // Removed between the look and the watch: look again.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if let Some((_, _, old)) = self.armed.replace((dir, name, wd.clone()))
                && old != wd
            {
                let _ = self.watches.remove(old);
            }
            again = false;
        }
    }

    /// Reads the path, publishes whether it grants, and says so once per change.
    fn read(&mut self) {
        let reading = reading_of(&self.path);
        if self.last.as_ref() == Some(&reading) {
            return;
        }
        let path = self.path.display();
        let was = self.last.as_ref().is_some_and(grants);
        match &reading {
            Reading::Present => {
                info!(path = %path, "site consent granted: remote access is served")
            }
            Reading::Absent if was => {
                info!(path = %path, "site consent withdrawn: remote access refused until the file exists again")
            }
            Reading::Absent => {
                info!(path = %path, "site consent withheld: remote access waits until the file exists (touch it to grant)")
            }
            Reading::NoDirectory => {
                warn!(path = %path, "site consent withheld: the file's directory does not exist; remote access waits until it is created and the file with it")
            }
            Reading::Symlink => {
                warn!(path = %path, "site consent withheld: the path is a symbolic link, which is never followed; create a regular file there instead (touch)")
            }
            Reading::NotAFile => {
                warn!(path = %path, "site consent withheld: the path is not a regular file; remove it and create a regular file (touch)")
            }
            Reading::Unreadable(e) => {
                warn!(path = %path, "site consent withheld: cannot look at the path: {e}")
            }
        }
        publish(&self.tx, grants(&reading));
        self.last = Some(reading);
    }
}

/// Wakes the gates only when consent changes.
fn publish(tx: &watch::Sender<bool>, granted: bool) {
    tx.send_if_modified(|g| std::mem::replace(g, granted) != granted);
}
