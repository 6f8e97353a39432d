//! A session's bridge under the agent's own time limits for its token: the overlap of a
//! rotation, the lifetime after its first connect, and the connect-by of a session that
//! never connected.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::bridge::{Bridge, BridgeEnd, BridgeError, State};
use crate::persist::Moment;

/// After a rotation the old bridge serves on until the new one is connected, at most this.
pub const ROTATION_OVERLAP: Duration = Duration::from_secs(10);

/// A bridge reached its first websocket.
pub struct Connected {
    pub id: u64,
    pub at: Moment,
}

/// A session task's end: the bridge's result, and whether one of the agent's own time
/// limits ended it.
pub struct SessionExit {
    pub id: u64,
    pub result: Result<BridgeEnd, BridgeError>,
    pub expired: Option<Expiry>,
}

/// Which of the agent's own time limits ended a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// `limits.max_lifetime` after its first connect.
    Lifetime,
    /// It never connected within `CONNECT_WITHIN` of its notify.
    NeverConnected,
}

/// When a session ends on the agent's own account.
#[derive(Clone, Copy, Debug)]
pub struct Ends {
    /// Its lifetime's end, when it connected before (a resumed session).
    pub lifetime: Option<Instant>,
    /// The end for a session that has not connected yet.
    pub connect_by: Instant,
}

/// One session's bridge, with the agent's own time limits for its token and the overlap of
/// a rotation.
pub struct SessionTask {
    id: u64,
    bridge: Bridge,
    cancel: CancellationToken,
    retire: CancellationToken,
    ends: Ends,
    max_lifetime: Duration,
    connected: mpsc::Sender<Connected>,
}

impl SessionTask {
    /// `cancel` stops the bridge; `retire` starts the overlap. `connected` hears of the
    /// first websocket.
    pub fn new(
        id: u64,
        bridge: Bridge,
        cancel: CancellationToken,
        retire: CancellationToken,
        ends: Ends,
        max_lifetime: Duration,
        connected: mpsc::Sender<Connected>,
    ) -> Self {
        SessionTask {
            id,
            bridge,
            cancel,
            retire,
            ends,
            max_lifetime,
            connected,
        }
    }

    pub async fn run(self) -> SessionExit {
        let SessionTask {
            id,
            bridge,
            cancel,
            retire,
            ends,
            max_lifetime,
            connected,
        } = self;
        let mut state = bridge.state();
        let run = bridge.run(cancel.clone());
        tokio::pin!(run);
        // A retired bridge (its token was replaced) serves until its successor connects,
        // which cancels it, or until the overlap ends.
        let overlap = async {
            retire.cancelled().await;
            tokio::time::sleep(ROTATION_OVERLAP).await;
        };
        tokio::pin!(overlap);
        let exit = |result, expired| SessionExit {
            id,
            result,
            expired,
        };
        let deadline = match ends.lifetime {
            Some(d) => d,
            None => {
                tokio::select! {
                    r = &mut run => return exit(r, None),
                    _ = &mut overlap => {
                        cancel.cancel();
                        return exit(run.await, None);
                    }
                    _ = tokio::time::sleep_until(ends.connect_by) => {
                        info!("the session never connected within 12 h of its notify: giving up on this token");
                        cancel.cancel();
                        return exit(run.await, Some(Expiry::NeverConnected));
                    }
                    true = first_websocket(&mut state) => {}
                }
                let _ = connected
                    .send(Connected {
                        id,
                        at: Moment::now(),
                    })
                    .await;
                Instant::now() + max_lifetime
            }
        };
        tokio::select! {
            r = &mut run => exit(r, None),
            _ = &mut overlap => {
                cancel.cancel();
                exit(run.await, None)
            }
            _ = tokio::time::sleep_until(deadline) => {
                info!("the agent's maximum lifetime for this token ended: closing the session");
                cancel.cancel();
                exit(run.await, Some(Expiry::Lifetime))
            }
        }
    }
}

/// `true` once the bridge had its first websocket session; `false` if it ended first.
async fn first_websocket(state: &mut watch::Receiver<State>) -> bool {
    state.wait_for(|s| s.sessions > 0).await.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{BridgeConfig, DataEndpoint, Limits, Role};
    use crate::secret::Secret;
    use crate::services::{Scope, ServiceMap, SharedServiceMap};

    /// A bridge whose data plane never answers (nothing listens on port 1).
    fn unreachable_bridge() -> Bridge {
        Bridge::new(BridgeConfig {
            role: Role::Destination {
                services: SharedServiceMap::from(ServiceMap::default()),
                scope: Scope::Opened(vec!["SSH".into()]),
                consent: crate::consent::Gate::always(),
            },
            endpoint: DataEndpoint::parse_override("ws://127.0.0.1:1").unwrap(),
            tls: None,
            access_token: Secret::new("AQGA-never"),
            client_token: None,
            limits: Limits::default(),
        })
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_never_connects_ends_when_its_connect_deadline_passes() {
        let (connected, _rx) = mpsc::channel(1);
        let start = Instant::now();
        let hour = Duration::from_secs(3600);
        let ends = Ends {
            lifetime: None,
            connect_by: start + hour,
        };
        let (cancel, retire) = (CancellationToken::new(), CancellationToken::new());
        let task = SessionTask::new(
            1,
            unreachable_bridge(),
            cancel,
            retire,
            ends,
            10 * hour,
            connected,
        );
        let exit = task.run().await;
        assert_eq!(exit.expired, Some(Expiry::NeverConnected));
        assert!(matches!(exit.result, Ok(BridgeEnd::Cancelled)));
        assert!(start.elapsed() >= hour && start.elapsed() < hour + Duration::from_secs(60));
    }
}
