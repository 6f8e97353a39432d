//! The one thread that writes session files. Each write is two fsyncs (file, directory),
//! which on a gateway's flash can take hundreds of milliseconds: on the runtime's one thread
//! they would stall every websocket, the MQTT keepalive and the watchdog. Operations run in
//! the order they were asked for, so a removal never overtakes the save of the same file.

use std::io;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::persist::{PersistedSession, SessionStore};

/// Operations waiting for the thread; the agent waits for room beyond this.
pub const QUEUE: usize = 64;

enum Op {
    Save(
        Box<PersistedSession>,
        Option<oneshot::Sender<io::Result<()>>>,
    ),
    /// Answered once the file is gone (or could not be removed).
    Remove(String, oneshot::Sender<()>),
    SweepRejected,
    /// Answered once everything asked before it is done.
    Flush(oneshot::Sender<()>),
}

/// The agent's handle on the thread; the thread ends when the handle is dropped.
pub struct PersistWriter {
    tx: mpsc::Sender<Op>,
}

impl PersistWriter {
    /// Starts the thread that owns `store`.
    pub fn start(store: SessionStore) -> io::Result<Self> {
        let (tx, mut rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name("session-files".into())
            .spawn(move || {
                while let Some(op) = rx.blocking_recv() {
                    run(&store, op);
                }
            })?;
        Ok(PersistWriter { tx })
    }

    /// Saves `s` and waits until it is on disk (the notify is acknowledged only then).
    pub async fn save(&self, s: PersistedSession) -> io::Result<()> {
        let (done, result) = oneshot::channel();
        self.send(Op::Save(Box::new(s), Some(done))).await;
        result
            .await
            .unwrap_or_else(|_| Err(io::Error::other("the session-file thread stopped")))
    }

    /// Saves `s` without waiting; a failure is logged.
    pub async fn save_later(&self, s: PersistedSession) {
        self.send(Op::Save(Box::new(s), None)).await;
    }

    /// Removes a session's file (the session ended) and returns once it is gone, so what
    /// follows (the "session ended" line) may be trusted by whoever reads the directory; a
    /// failure is logged.
    pub async fn remove(&self, file_id: &str) {
        let (done, removed) = oneshot::channel();
        self.send(Op::Remove(file_id.to_owned(), done)).await;
        let _ = removed.await;
    }

    /// Removes files moved aside 12 h ago or more.
    pub async fn sweep_rejected(&self) {
        self.send(Op::SweepRejected).await;
    }

    /// Waits until everything asked so far is done.
    pub async fn flush(&self) {
        let (done, finished) = oneshot::channel();
        self.send(Op::Flush(done)).await;
        let _ = finished.await;
    }

    async fn send(&self, op: Op) {
        if self.tx.send(op).await.is_err() {
            warn!("the session-file thread stopped: session files are not kept up to date");
        }
    }
}

fn run(store: &SessionStore, op: Op) {
    match op {
        Op::Save(s, done) => {
            let result = store.save(&s);
            match done {
                Some(done) => {
                    let _ = done.send(result);
                }
                None => {
                    if let Err(e) = result {
                        warn!("cannot persist the session: {e}");
                    }
                }
            }
        }
        Op::Remove(id, done) => {
            if let Err(e) = store.remove(&id) {
                warn!("cannot remove a persisted session: {e}");
            }
            let _ = done.send(());
        }
        Op::Flush(done) => {
            let _ = done.send(());
        }
        Op::SweepRejected => {
            let n = store.sweep_rejected(SystemTime::now());
            if n > 0 {
                info!(files = n, "removed session files kept aside for 12 h");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn session(id: &str) -> PersistedSession {
        PersistedSession {
            file_id: id.to_owned(),
            thing: "gw".into(),
            region: "us-east-1".into(),
            services: vec!["SSH".into()],
            access_token: Secret::new("AQGA-x"),
            client_token: Secret::new(uuid::Uuid::new_v4().to_string()),
            first_connected: None,
            received: None,
        }
    }

    #[tokio::test]
    async fn a_removal_never_overtakes_the_save_of_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SessionStore::open(dir.path()).unwrap();
        let w = PersistWriter::start(SessionStore::open(dir.path()).unwrap()).unwrap();
        for i in 0..50 {
            let id = format!("s{i}");
            w.save_later(session(&id)).await;
            w.remove(&id).await;
        }
        w.save_later(session("kept")).await;
        w.flush().await;
        let (left, _) = store.load();
        let ids: Vec<&str> = left.iter().map(|s| s.file_id.as_str()).collect();
        assert_eq!(ids, ["kept"]);
    }
}
