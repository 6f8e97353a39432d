//! Site consent (`[consent] mode = "file"`): remote access is served only while a file
//! exists, so a key switch, a GPIO daemon or a local operator grants and revokes it with
//! `touch` and `rm`. The rules here are pure; `watcher.rs` follows the file with inotify and
//! publishes whether it grants. `Gate` is what a bridge asks.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;

mod watcher;

pub use watcher::{Watcher, reading_of};

/// The file watched when `consent.path` is not set, in the agent's runtime directory
/// (`/run/securetunnel-agent/allow` under systemd).
pub const FILE_NAME: &str = "allow";

/// `[consent] mode = "file"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The file whose existence grants remote access.
    pub path: PathBuf,
    /// The services consent covers; empty: every service. Others stay open.
    pub services: Vec<String>,
}

/// What is at the consent path, now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// A regular file: consent is granted.
    Present,
    /// Nothing there.
    Absent,
    /// The directory that would hold it does not exist (yet).
    NoDirectory,
    /// A symbolic link: never followed (see `grants`).
    Symlink,
    /// Something that is not a regular file (a directory, a socket...).
    NotAFile,
    /// It could not be looked at (permissions): the error.
    Unreadable(String),
}

/// Rule (consent file): only a regular file at the path grants. A symbolic link grants
/// nothing: the agent watches the directory, not where a link points, so a link whose
/// target went away would keep granting unseen.
pub fn grants(reading: &Reading) -> bool {
    matches!(reading, Reading::Present)
}

/// Rule (consent scope): a service needs consent when the list is empty (every service)
/// or names it; the others stay open whatever the file says.
pub fn covers(services: &[String], service: &str) -> bool {
    services.is_empty() || services.iter().any(|s| s == service)
}

/// Rule (consent): a stream of `service` is admitted while consent is granted or when
/// consent does not cover it.
pub fn admits(granted: bool, services: &[String], service: &str) -> bool {
    granted || !covers(services, service)
}

/// Rule (awaiting consent): a tunnel connects only when at least one of its services is
/// admitted; one whose services all need a consent not given waits, within its lifetime.
pub fn may_connect(granted: bool, services: &[String], tunnel: &[String]) -> bool {
    granted || tunnel.iter().any(|s| !covers(services, s))
}

/// The word the status and the shadow show: "always", "granted" or "withheld".
pub fn state_name(gate: &Gate) -> &'static str {
    match &gate.granted {
        None => "always",
        Some(rx) if *rx.borrow() => "granted",
        Some(_) => "withheld",
    }
}

/// What a bridge asks before it connects and before each new stream; cheap to clone.
#[derive(Clone, Debug)]
pub struct Gate {
    /// `None`: `mode = "always"`.
    granted: Option<watch::Receiver<bool>>,
    services: Arc<[String]>,
}

impl Gate {
    /// `mode = "always"`: everything admitted, nothing to wait for.
    pub fn always() -> Self {
        Gate {
            granted: None,
            services: Arc::from(Vec::new()),
        }
    }

    /// Follows `granted` (from a `Watcher`) for `services` (empty: all).
    pub fn new(granted: watch::Receiver<bool>, services: &[String]) -> Self {
        Gate {
            granted: Some(granted),
            services: Arc::from(services.to_vec()),
        }
    }

    fn granted(&self) -> bool {
        self.granted.as_ref().is_none_or(|rx| *rx.borrow())
    }

    /// Whether a new stream of `service` may reach its endpoint now.
    pub fn admits(&self, service: &str) -> bool {
        admits(self.granted(), &self.services, service)
    }

    /// Whether a tunnel opened for `tunnel` may connect now.
    pub fn may_connect(&self, tunnel: &[String]) -> bool {
        may_connect(self.granted(), &self.services, tunnel)
    }

    /// The services consent covers (empty: all).
    pub fn services(&self) -> &[String] {
        &self.services
    }

    /// Returns when consent changes; never with `mode = "always"`, or once the watcher is
    /// gone.
    pub async fn changed(&mut self) {
        let ended = match &mut self.granted {
            Some(rx) => rx.changed().await.is_err(),
            None => true,
        };
        if ended {
            std::future::pending::<()>().await;
        }
    }

    /// Returns once a tunnel opened for `tunnel` may connect.
    pub async fn until_may_connect(&mut self, tunnel: &[String]) {
        while !self.may_connect(tunnel) {
            self.changed().await;
        }
    }
}

/// The nearest directory on the way to `path` that exists, and the name in it that leads
/// to the file (the file's own name when its directory exists).
pub fn nearest_existing(path: &Path) -> Option<(PathBuf, std::ffi::OsString)> {
    let mut child = path;
    while let Some(dir) = child.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if dir.is_dir() {
            return Some((dir.to_path_buf(), child.file_name()?.to_os_string()));
        }
        child = dir;
    }
    None
}

#[cfg(test)]
mod tests;
