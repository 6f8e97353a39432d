//! Name lookups of host-name services, bounded. getaddrinfo blocks, so each lookup takes one
//! of the runtime's blocking threads until the resolver answers, even after the connection
//! that asked gave up: a resolver that never answers must not take them all (the session
//! files and the upgrade check use them too).

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Lookups in flight, all tunnels of the agent together.
pub const MAX_LOOKUPS: usize = 32;

/// A blocking lookup: the system's (getaddrinfo) or a test's stand-in.
pub type LookupFn = dyn Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync;

/// Where bridges resolve host names, with the bound they share.
#[derive(Clone)]
pub struct Lookups {
    in_flight: Arc<Semaphore>,
    bound: usize,
    lookup: Option<Arc<LookupFn>>,
}

impl std::fmt::Debug for Lookups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookups")
            .field("free", &self.in_flight.available_permits())
            .finish()
    }
}

impl Default for Lookups {
    fn default() -> Self {
        Lookups::system(MAX_LOOKUPS)
    }
}

impl Lookups {
    /// The system resolver, at most `bound` lookups in flight.
    pub fn system(bound: usize) -> Self {
        Lookups {
            in_flight: Arc::new(Semaphore::new(bound)),
            bound,
            lookup: None,
        }
    }

    /// `lookup` instead of the system resolver (a test's stand-in).
    pub fn with(bound: usize, lookup: Arc<LookupFn>) -> Self {
        Lookups {
            in_flight: Arc::new(Semaphore::new(bound)),
            bound,
            lookup: Some(lookup),
        }
    }

    /// The addresses of `host`. An IP literal needs no lookup. Rule (bounded lookups): a
    /// lookup starts only while fewer than the bound are in flight, and keeps `hold` (the
    /// connection's count against `max_connections_per_tunnel`) until the resolver
    /// answers, whether or not anyone still waits for it.
    pub async fn resolve<H: Send + 'static>(
        &self,
        host: &str,
        port: u16,
        hold: H,
    ) -> io::Result<Vec<SocketAddr>> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            io::Error::other(format!(
                "name lookup of {host} not started: {} lookups are in flight (the resolver is slow or does not answer)",
                self.bound
            ))
        })?;
        let lookup = self.lookup.clone();
        let host = host.to_owned();
        let blocking = tokio::task::spawn_blocking(move || {
            let _held = (permit, hold);
            match lookup {
                Some(f) => f(&host, port),
                None => (host.as_str(), port)
                    .to_socket_addrs()
                    .map(Iterator::collect),
            }
        });
        blocking.await.map_err(io::Error::other)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::mpsc;

    #[tokio::test]
    async fn an_ip_literal_needs_no_lookup() {
        let never: Arc<LookupFn> = Arc::new(|_, _| panic!("looked up"));
        let l = Lookups::with(1, never);
        let addrs = l.resolve("::1", 22, ()).await.unwrap();
        assert_eq!(addrs, vec!["[::1]:22".parse().unwrap()]);
    }

    /// Stands for a connection's count: says when the lookup lets go of it.
    struct Hold(tokio::sync::mpsc::Sender<()>);

    impl Drop for Hold {
        fn drop(&mut self) {
            let _ = self.0.try_send(());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_beyond_the_bound_fail_at_once_and_each_holds_its_slot_until_answered() {
        let (answer, wait) = mpsc::channel::<()>();
        let wait = Arc::new(Mutex::new(wait));
        let stuck: Arc<LookupFn> = Arc::new(move |_, _| {
            let _ = wait.lock().unwrap().recv();
            Err(io::Error::other("no answer"))
        });
        let l = Lookups::with(2, stuck);
        let (released, mut releases) = tokio::sync::mpsc::channel(4);
        // Two lookups that do not answer; their waiters give up.
        for _ in 0..2 {
            let r = tokio::time::timeout(
                std::time::Duration::from_millis(50),
                l.resolve("slow.example", 80, Hold(released.clone())),
            )
            .await;
            assert!(r.is_err(), "the stand-in answered");
        }
        let err = l.resolve("slow.example", 80, ()).await.unwrap_err();
        assert!(err.to_string().contains("2 lookups are in flight"), "{err}");
        assert!(
            releases.try_recv().is_err(),
            "a count let go before its lookup ended"
        );
        // The resolver answers: the counts and the slots come back.
        drop(answer);
        for _ in 0..2 {
            releases.recv().await.unwrap();
        }
        let err = l.resolve("slow.example", 80, ()).await.unwrap_err();
        assert!(err.to_string().contains("no answer"), "{err}");
    }
}
