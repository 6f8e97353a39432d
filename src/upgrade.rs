//! Upgrades that never cut a live connection: the package scripts leave the running agent
//! alone, the agent notices that its binary was replaced and re-executes it (same PID, so
//! systemd and procd keep tracking it) at the first moment no local connection is open.
//! Persisted sessions rejoin with their tokens in the new process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{error, info, warn};

/// The identity of a file's contents: a new file (new inode) or a rewrite (new mtime/size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
}

fn file_id(path: &Path) -> Option<FileId> {
    let m = std::fs::metadata(path).ok()?;
    m.is_file().then(|| FileId {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: m.mtime(),
    })
}

/// The file this process refused after its trial run (`refuse_for_process`).
static REFUSED: std::sync::Mutex<Option<FileId>> = std::sync::Mutex::new(None);

/// Rule (no retry of a refused file): the candidate is not taken again by this process
/// until another file is installed.
pub fn refuse_for_process(candidate: &Candidate) {
    *REFUSED.lock().unwrap_or_else(|e| e.into_inner()) = Some(candidate.identity.id);
}

/// Watches the path this process was started from.
pub struct BinaryWatch {
    path: PathBuf,
    running: FileId,
    /// A new file seen on the last check; it must look the same on the next one (the
    /// package manager finished writing it) before it counts.
    candidate: Option<FileId>,
    announced: bool,
    waiting_logged: bool,
}

impl BinaryWatch {
    /// The running binary, or `None` if its path cannot be known (then upgrades need a
    /// restart). After a rollback, the refused file at the path counts as the running one:
    /// it is not tried again, but the next file installed is.
    pub fn current() -> Option<Self> {
        // After a package replaced the file, the kernel names the running image's path
        // "<path> (deleted)": the path to watch is still <path>.
        let exe = std::env::current_exe().ok()?;
        let shown = exe.to_string_lossy();
        let path = PathBuf::from(shown.strip_suffix(" (deleted)").unwrap_or(&shown));
        // /proc/self/exe is the running image even if the path was replaced meanwhile.
        let running = file_id(Path::new("/proc/self/exe"))?;
        let refused = *REFUSED.lock().unwrap_or_else(|e| e.into_inner());
        match refused.filter(|r| file_id(&path) == Some(*r)) {
            Some(r) => Self::watching(path, r),
            None => Self::watching(path, running),
        }
    }

    fn watching(path: PathBuf, running: FileId) -> Option<Self> {
        // Already different at start (a filesystem that reports other identities through
        // /proc): watching would re-execute in a loop. Upgrades then need a restart.
        if file_id(&path) != Some(running) {
            info!(path = %path.display(), "the running binary cannot be matched to its path: upgrades take effect at the next restart");
            return None;
        }
        Some(BinaryWatch {
            path,
            running,
            candidate: None,
            announced: false,
            waiting_logged: false,
        })
    }

    /// The path to re-execute.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file with identity `id` was refused: it is not taken again, but a newer file
    /// installed since is.
    fn reject_file(&mut self, id: FileId) {
        self.running = id;
        if self.candidate == Some(id) {
            self.candidate = None;
        }
        self.announced = false;
        self.waiting_logged = false;
    }

    /// Rule: the binary counts as replaced once the file at its path differs from the
    /// running one and stayed the same across two checks.
    pub fn replaced(&mut self) -> bool {
        let now = file_id(&self.path);
        match now {
            Some(id) if id != self.running => {
                let stable = self.candidate == Some(id);
                self.candidate = Some(id);
                if stable && !self.announced {
                    self.announced = true;
                    info!(path = %self.path.display(), "a new agent binary was installed");
                }
                stable
            }
            _ => {
                self.candidate = None;
                false
            }
        }
    }

    /// Logged once per upgrade: the re-exec waits for local connections to end.
    pub fn waiting_for(&mut self, open: usize) {
        if !self.waiting_logged {
            self.waiting_logged = true;
            info!(
                open,
                "re-executing the new binary once no local connection is open (open ones keep running)"
            );
        }
    }
}

/// An upgrade's progress: the watch on the binary's path, the check of a new file, and the
/// moment it became due. One owner (the agent loop) drives it: `tick` on its timer, `done`
/// when a check ends.
pub struct Upgrader {
    watch: BinaryWatch,
    config: PathBuf,
    /// The running check of a candidate.
    check: Option<tokio::task::JoinHandle<CheckDone>>,
    /// A candidate that passed its check, waiting for local connections to end.
    ready: Option<Candidate>,
    /// Since when an upgrade waits for local connections (for `status`).
    pending_since: Option<std::time::SystemTime>,
    waiting_since: Option<tokio::time::Instant>,
    deadline: Duration,
    /// A file whose check could not finish is tried again from then on (another file at
    /// once).
    retry: Option<(tokio::time::Instant, Option<FileId>)>,
}

/// A check's end: the candidate and what its check said, or why it could not start.
pub type CheckDone = Result<(Candidate, Result<(), CheckError>), String>;

/// Why a candidate did not pass its check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// It said the configuration is not usable (or could not run at all).
    #[error("{0}")]
    Refused(String),
    /// It did not finish in time: tried again later.
    #[error("{0}")]
    Unfinished(String),
}

/// A check that did not finish is tried again this much later.
pub const CHECK_RETRY: Duration = Duration::from_secs(60);

/// What a tick decides.
pub enum Step {
    /// Nothing to do now.
    Wait,
    /// Execute this candidate.
    Exec(Candidate),
}

impl Upgrader {
    /// Watches the running binary's path; `None` when it cannot be known.
    pub fn new(config: &Path, deadline: Duration) -> Option<Self> {
        Some(Upgrader {
            watch: BinaryWatch::current()?,
            config: config.to_owned(),
            check: None,
            ready: None,
            pending_since: None,
            waiting_since: None,
            deadline,
            retry: None,
        })
    }

    /// Says once that the upgrade waits for `open` local connections (after status.json
    /// shows it: whoever follows the log may read the state at once).
    pub fn announce_waiting(&mut self, open: usize) {
        if self.pending_since.is_some() {
            self.watch.waiting_for(open);
        }
    }

    /// Since when a checked upgrade waits for local connections to end.
    pub fn pending_since(&self) -> Option<std::time::SystemTime> {
        self.pending_since
    }

    /// Rule (upgrade timing): a new binary is checked as soon as it is installed; it is
    /// executed once no local connection is open, or once it has waited `deadline` (an
    /// idle session left open must not hold a fix back for ever).
    pub fn tick(&mut self, open: usize) -> Step {
        if !self.watch.replaced() {
            self.forget_ready();
            return Step::Wait;
        }
        let retry_due = self.retry.is_none_or(|(at, file)| {
            tokio::time::Instant::now() >= at || self.watch.candidate != file
        });
        if self.check.is_none() && self.ready.is_none() && retry_due {
            self.start_check();
            return Step::Wait;
        }
        if self.ready.is_none() {
            return Step::Wait;
        }
        let waited = self
            .waiting_since
            .get_or_insert_with(tokio::time::Instant::now);
        let overdue = waited.elapsed() >= self.deadline;
        if open > 0 && !overdue {
            self.pending_since
                .get_or_insert_with(std::time::SystemTime::now);
            return Step::Wait;
        }
        if open > 0 {
            warn!(open, deadline = ?self.deadline, "the upgrade waited its deadline (upgrade_deadline_minutes): re-executing now; open local connections are cut");
        }
        let ready = self.ready.take();
        self.forget_ready();
        ready.map_or(Step::Wait, Step::Exec)
    }

    fn retry_later(&mut self, file: Option<FileId>) {
        self.retry = Some((tokio::time::Instant::now() + CHECK_RETRY, file));
    }

    /// No candidate waits any more: its wait and deadline go with it.
    fn forget_ready(&mut self) {
        self.ready = None;
        self.pending_since = None;
        self.waiting_since = None;
    }

    fn start_check(&mut self) {
        let path = self.watch.path().to_owned();
        let config = self.config.clone();
        self.retry = None;
        self.check = Some(tokio::spawn(async move {
            // Reading and hashing the file happens off the runtime (flash can be slow).
            let opened = path.clone();
            let candidate = tokio::task::spawn_blocking(move || Candidate::open(&opened)).await;
            let candidate = match candidate {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(format!("cannot open {}: {e}", path.display())),
                Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
            };
            info!(path = %path.display(), sha256 = %candidate.identity().sha256_hex(), "checking the new binary (check-config)");
            let result = accepts_config(&candidate, &config).await;
            Ok((candidate, result))
        }));
    }

    /// The running check's end; pending for ever while none runs.
    pub async fn checked(&mut self) -> CheckDone {
        let Some(check) = self.check.as_mut() else {
            return std::future::pending().await;
        };
        let done = check.await;
        self.check = None;
        match done {
            Ok(done) => done,
            Err(e) => Err(format!("the check failed: {e}")),
        }
    }

    /// Takes a check's result: a passed candidate waits for its moment; a refused one is
    /// not taken again until another file is installed; a check that could not finish (a
    /// busy machine, a package manager still at work) is tried again in `CHECK_RETRY`.
    pub fn done(&mut self, done: CheckDone) {
        let (candidate, result) = match done {
            Ok(done) => done,
            Err(why) => {
                warn!(
                    "the new binary could not be checked ({why}); trying again in {}s",
                    CHECK_RETRY.as_secs()
                );
                self.retry_later(self.watch.candidate);
                return;
            }
        };
        match result {
            Ok(()) => {
                info!(path = %candidate.path().display(), "the new binary accepts the configuration");
                self.ready = Some(candidate);
            }
            Err(CheckError::Unfinished(why)) => {
                warn!(
                    "the new binary at {} {why}; staying on the running version, trying again in {}s",
                    candidate.path().display(),
                    CHECK_RETRY.as_secs()
                );
                self.retry_later(Some(candidate.identity.id));
            }
            Err(CheckError::Refused(why)) => {
                self.watch.reject_file(candidate.identity.id);
                error!(
                    "the new binary at {} refuses the configuration, staying on the running version until it is replaced again: {}",
                    candidate.path().display(),
                    why.trim().replace('\n', "; ")
                );
            }
        }
    }
}

/// Time a new binary gets to answer `check-config`.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// What is kept of its output for the log.
pub const CHECK_OUTPUT: usize = 64 * 1024;

/// What identifies the contents of a file: where it is (device, inode) and what it holds
/// (size, mtime, SHA-256).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    id: FileId,
    sha256: Vec<u8>,
}

impl Identity {
    /// Of the open `file`, read from its start.
    fn of(file: &File) -> io::Result<Self> {
        let m = file.metadata()?;
        let id = FileId {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
        };
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            at += n as u64;
        }
        Ok(Identity {
            id,
            sha256: ctx.finish().as_ref().to_vec(),
        })
    }

    /// The SHA-256 as hex, to name the file in logs and the status.
    pub fn sha256_hex(&self) -> String {
        self.sha256.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The new binary, opened once: `check-config` runs that open file, and the re-exec
/// executes it from the same descriptor, so what runs is what was checked.
pub struct Candidate {
    path: PathBuf,
    file: File,
    identity: Identity,
}

impl Candidate {
    /// Opens the file now at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let identity = Identity::of(&file)?;
        Ok(Candidate {
            path: path.to_owned(),
            file,
            identity,
        })
    }

    /// Where it was found.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its identity when it was opened.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The open file as a path a child process can execute (while this one holds it open).
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/fd/{}",
            std::process::id(),
            self.file.as_raw_fd()
        ))
    }

    /// Rule (exec what was checked): replaces this process with the open file, same
    /// arguments and environment, after checking that its contents are still what was
    /// checked (a rewrite in place changes them); returns only if that failed.
    pub fn exec(&self) -> io::Error {
        match Identity::of(&self.file) {
            Ok(now) if now == self.identity => {}
            Ok(_) => {
                return io::Error::other(
                    "the new binary changed after it was checked: not executing it",
                );
            }
            Err(e) => return e,
        }
        // A script's interpreter opens the file by its /proc path: it must stay open
        // across the exec. An ELF image does not need it.
        let mut magic = [0u8; 4];
        let script = self.file.read_at(&mut magic, 0).is_ok() && magic.starts_with(b"#!");
        let path = if script {
            // SAFETY: F_SETFD on a descriptor this process owns.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFD, 0) };
            self.exec_path()
        } else {
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        };
        reexec_path(&path, &self.path)
    }
}

/// Rule: a new binary replaces the running one only if it accepts the configuration
/// (`check-config`) within `CHECK_TIMEOUT`; `Err` carries why not, with at most
/// `CHECK_OUTPUT` bytes of what it said. Runs the candidate's open file, as a child process
/// of the runtime (never blocking it); a child that hangs or talks without end is killed.
pub async fn accepts_config(candidate: &Candidate, config: &Path) -> Result<(), CheckError> {
    accepts_config_within(candidate, config, CHECK_TIMEOUT).await
}

async fn accepts_config_within(
    candidate: &Candidate,
    config: &Path,
    limit: Duration,
) -> Result<(), CheckError> {
    let (path, config) = (candidate.exec_path(), config.to_owned());
    tokio::task::spawn_blocking(move || check_within(&path, &config, limit))
        .await
        .map_err(|e| CheckError::Unfinished(format!("the check failed: {e}")))?
}

/// The check itself, on a blocking thread: the child runs in a process group of its own, so
/// what it started dies with it when it does not finish in time.
fn check_within(path: &Path, config: &Path, limit: Duration) -> Result<(), CheckError> {
    use std::os::unix::process::CommandExt as _;
    use std::process::Stdio;
    let mut child = std::process::Command::new(path)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| CheckError::Refused(format!("cannot run it: {e}")))?;
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || tx.send(bounded(pipe)));
    }
    let start = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            result => {
                // SAFETY: signalling the process group this child leads (`process_group(0)`).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                return Err(CheckError::Unfinished(match result {
                    Err(e) => format!("cannot wait for it: {e}"),
                    _ => format!("did not finish check-config within {limit:?}"),
                }));
            }
        }
    };
    if status.success() {
        return Ok(());
    }
    // What it said, once its pipes close (or what came by then).
    let mut out = Vec::new();
    for _ in 0..2 {
        if let Ok(part) = rx.recv_timeout(Duration::from_secs(1)) {
            out.extend_from_slice(&part);
        }
    }
    out.truncate(CHECK_OUTPUT);
    Err(CheckError::Refused(
        String::from_utf8_lossy(&out).into_owned(),
    ))
}

/// Up to `CHECK_OUTPUT` bytes of a child's output; the rest is read and dropped, so a child
/// that prints without end neither blocks nor grows the agent.
fn bounded(pipe: Option<Box<dyn io::Read + Send>>) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = pipe.read(&mut buf) {
        if n == 0 {
            break;
        }
        let room = CHECK_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// Replaces this process with `path` (shown as `shown`), same arguments and environment;
/// returns only if that failed. SIGHUP stays ignored across the exec, until the new
/// process installs its handler.
fn reexec_path(path: &Path, shown: &Path) -> io::Error {
    crate::signals::ignore_hangup();
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| shown.as_os_str().to_owned());
    let err = std::process::Command::new(path)
        .arg0(argv0)
        .args(args)
        .exec();
    warn!(path = %shown.display(), "cannot re-execute the new binary: {err}");
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_binary_counts_once_it_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent");
        std::fs::write(&path, b"v1").unwrap();
        let running = file_id(&path).unwrap();
        let mut w = BinaryWatch::watching(path.clone(), running).unwrap();
        assert!(!w.replaced());
        // dpkg writes the new file beside it and renames it into place: a new inode.
        let new = dir.path().join("agent.dpkg-new");
        std::fs::write(&new, b"version 2").unwrap();
        std::fs::rename(&new, &path).unwrap();
        assert!(!w.replaced(), "not before it looked the same twice");
        assert!(w.replaced());
        assert!(w.replaced());
    }

    #[test]
    fn a_missing_binary_is_not_an_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent");
        std::fs::write(&path, b"v1").unwrap();
        let mut w = BinaryWatch::watching(path.clone(), file_id(&path).unwrap()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(!w.replaced());
        assert!(!w.replaced());
    }

    #[test]
    fn a_refused_binary_is_not_taken_again_until_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent");
        std::fs::write(&path, b"v1").unwrap();
        let mut w = BinaryWatch::watching(path.clone(), file_id(&path).unwrap()).unwrap();
        let new = dir.path().join("new");
        std::fs::write(&new, b"v2").unwrap();
        std::fs::rename(&new, &path).unwrap();
        w.replaced();
        assert!(w.replaced());
        let refused = w.candidate.unwrap();
        w.reject_file(refused);
        assert!(!w.replaced() && !w.replaced());
        std::fs::write(&new, b"version 3").unwrap();
        std::fs::rename(&new, &path).unwrap();
        w.replaced();
        assert!(w.replaced());
    }

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn a_binary_that_refuses_the_config_is_not_executed() {
        let dir = tempfile::tempdir().unwrap();
        let bad = script(
            dir.path(),
            "agent",
            "echo 'thing_name: missing' >&2\nexit 2",
        );
        let bad = Candidate::open(&bad).unwrap();
        let err = accepts_config(&bad, Path::new("/etc/x.toml"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CheckError::Refused(e) if e.contains("thing_name")),
            "{err}"
        );
        let ok = Candidate::open(&script(dir.path(), "ok", "exit 0")).unwrap();
        assert!(accepts_config(&ok, Path::new("/etc/x.toml")).await.is_ok());
    }

    #[tokio::test]
    async fn a_check_that_hangs_or_talks_without_end_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let limit = Duration::from_millis(500);
        let hangs = Candidate::open(&script(dir.path(), "hangs", "sleep 60")).unwrap();
        let err = accepts_config_within(&hangs, Path::new("/x"), limit)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, CheckError::Unfinished(e) if e.contains("did not finish check-config within 500ms")),
            "{err}"
        );
        let talks = Candidate::open(&script(dir.path(), "talks", "yes; exit 1")).unwrap();
        let err = accepts_config_within(&talks, Path::new("/x"), limit)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckError::Unfinished(_)), "{err}");
        assert_eq!(CHECK_TIMEOUT, Duration::from_secs(10));
        let long = "head -c 200000 /dev/zero | tr '\\0' x; exit 1";
        let verbose = Candidate::open(&script(dir.path(), "verbose", long)).unwrap();
        let err = accepts_config(&verbose, Path::new("/x")).await.unwrap_err();
        assert_eq!(err.to_string().len(), CHECK_OUTPUT, "output kept");
    }

    #[test]
    fn the_checked_file_is_told_apart_from_a_rewrite_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = script(dir.path(), "agent", "exit 0");
        let c = Candidate::open(&path).unwrap();
        assert_eq!(
            Identity::of(&File::open(&path).unwrap()).unwrap(),
            c.identity
        );
        // The same inode rewritten: another identity, so `exec` refuses it.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"#!/bin/sh\nexit 1\n", 0)
            .unwrap();
        assert_ne!(Identity::of(&c.file).unwrap(), c.identity);
        let err = c.exec();
        assert!(
            err.to_string().contains("changed after it was checked"),
            "{err}"
        );
    }
}
