//! Source mode's local side: one listener per service; accepted clients are queued (bounded)
//! for the session, which opens a tunnel stream or connection for each.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{info, warn};

use super::local::LocalStream;
use crate::services::{LocalEndpoint, ServiceMap};

/// A client accepted on the listener of `service` ("" for the unnamed mapping).
pub struct Accepted {
    pub service: String,
    pub stream: LocalStream,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The listeners of a source-mode bridge, bound before it starts.
pub struct SourceListeners {
    listeners: Vec<(String, Listener)>,
}

impl SourceListeners {
    /// Binds every mapping now, so a port that is taken fails at start-up, not later.
    pub async fn bind(map: &ServiceMap) -> io::Result<Self> {
        let mut listeners = Vec::new();
        let unnamed = map.unnamed_endpoint().map(|e| ("", e));
        for (service, endpoint) in map.named().chain(unnamed) {
            let listener = bind_one(endpoint).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot listen on {endpoint} for service {service:?}: {e}"),
                )
            })?;
            listeners.push((service.to_owned(), listener));
        }
        Ok(SourceListeners { listeners })
    }

    /// The bound TCP address of a service's listener (port 0 mappings get a free port).
    pub fn tcp_addr(&self, service: &str) -> Option<SocketAddr> {
        self.listeners.iter().find_map(|(s, l)| match l {
            Listener::Tcp(t) if s == service => t.local_addr().ok(),
            _ => None,
        })
    }

    /// Logs where each service listens.
    pub fn log_addresses(&self) {
        for (service, l) in &self.listeners {
            let addr = match l {
                Listener::Tcp(t) => t.local_addr().map(|a| a.to_string()),
                Listener::Unix(u) => u
                    .local_addr()
                    .map(|a| format!("{:?}", a.as_pathname().unwrap_or(std::path::Path::new("?")))),
            };
            match addr {
                Ok(a) => info!(service = %service, "listening on {a}"),
                Err(e) => warn!(service = %service, "listener address unknown: {e}"),
            }
        }
    }

    pub(super) fn spawn(self, tasks: &mut JoinSet<()>, tx: mpsc::Sender<Accepted>) {
        for (service, listener) in self.listeners {
            tasks.spawn(accept_loop(service, listener, tx.clone()));
        }
    }
}

async fn bind_one(endpoint: &LocalEndpoint) -> io::Result<Listener> {
    match endpoint {
        LocalEndpoint::Tcp { host, port } => Ok(Listener::Tcp(
            TcpListener::bind((host.as_str(), *port)).await?,
        )),
        LocalEndpoint::Unix(path) => {
            // A socket left by an earlier run would make bind fail; anything else is kept.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path)?;
            }
            Ok(Listener::Unix(UnixListener::bind(path)?))
        }
    }
}

async fn accept_loop(service: String, listener: Listener, tx: mpsc::Sender<Accepted>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                LocalStream::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| LocalStream::Unix(s)),
        };
        match accepted {
            Ok(stream) => {
                let item = Accepted {
                    service: service.clone(),
                    stream,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(service = %service, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}
