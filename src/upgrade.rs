//! Upgrades that never cut a live connection: the package scripts leave the running agent
//! alone, the agent notices that its binary was replaced and re-executes it (same PID, so
//! systemd and procd keep tracking it) at the first moment no local connection is open.
//! Persisted sessions rejoin with their tokens in the new process.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

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
    /// restart).
    pub fn current() -> Option<Self> {
        let path = std::env::current_exe().ok()?;
        // /proc/self/exe is the running image even if the path was replaced meanwhile.
        let running = file_id(Path::new("/proc/self/exe"))?;
        Self::watching(path, running)
    }

    fn watching(path: PathBuf, running: FileId) -> Option<Self> {
        if path.to_string_lossy().ends_with(" (deleted)") {
            return None;
        }
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

    /// The new file was refused: it is not taken again until it changes.
    pub fn reject(&mut self) {
        if let Some(id) = self.candidate.take() {
            self.running = id;
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

/// Rule: a new binary replaces the running one only if it accepts the configuration
/// (`check-config`); `Err` carries what it said.
pub fn accepts_config(binary: &Path, config: &Path) -> Result<(), String> {
    let out = std::process::Command::new(binary)
        .arg("check-config")
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Replaces this process with `path`, same arguments and environment; returns only if that
/// failed.
pub fn reexec(path: &Path) -> std::io::Error {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| path.as_os_str().to_owned());
    let err = std::process::Command::new(path)
        .arg0(argv0)
        .args(args)
        .exec();
    warn!(path = %path.display(), "cannot re-execute the new binary: {err}");
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
        w.reject();
        assert!(!w.replaced() && !w.replaced());
        std::fs::write(&new, b"version 3").unwrap();
        std::fs::rename(&new, &path).unwrap();
        w.replaced();
        assert!(w.replaced());
    }

    #[test]
    fn a_binary_that_refuses_the_config_is_not_executed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("agent");
        std::fs::write(
            &script,
            "#!/bin/sh\necho 'thing_name: missing' >&2\nexit 2\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = accepts_config(&script, Path::new("/etc/x.toml")).unwrap_err();
        assert!(err.contains("thing_name"), "{err}");
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(accepts_config(&ok, Path::new("/etc/x.toml")).is_ok());
    }
}
