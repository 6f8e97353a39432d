//! Byte budgets: what all tunnels together hold for local sockets (`Budget`), and one
//! tunnel's share of it with a reserve of its own (`TunnelBudget`).

use super::*;

/// A byte budget: a semaphore of bytes, and its size.
#[derive(Clone, Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total: usize,
}

/// One bridge's view of a budget: the budget itself, the tunnel's own cap on it, and, when
/// it shares the budget with other tunnels, a reserve of its own.
#[derive(Clone, Debug)]
pub(crate) struct TunnelBudget {
    pub shared: Budget,
    cap: Arc<Semaphore>,
    reserve: Option<Arc<Semaphore>>,
}

/// Bytes each tunnel that shares the agent's budget holds on its own, besides that budget:
/// two full payloads, so its reader moves while others' stalled consumers hold the rest.
pub const TUNNEL_RESERVE: usize = 2 * crate::protocol::MAX_PAYLOAD;

/// A payload's share of the budget: released when the payload is written (or dropped).
#[derive(Debug)]
pub(crate) enum BudgetPermit {
    /// From the shared budget, within the tunnel's cap.
    Shared {
        _cap: tokio::sync::OwnedSemaphorePermit,
        _shared: tokio::sync::OwnedSemaphorePermit,
    },
    /// From the tunnel's own reserve.
    Reserved {
        _reserve: tokio::sync::OwnedSemaphorePermit,
    },
}

impl TunnelBudget {
    /// Rule (fair share): a tunnel may hold at most half of a budget it shares with other
    /// tunnels, and has `TUNNEL_RESERVE` of its own that it uses first, so consumers of other
    /// tunnels can never stall its reader; alone, it has all of its budget.
    pub fn new(shared: Budget, sharing: bool) -> Self {
        let cap = if sharing {
            shared.total / 2
        } else {
            shared.total
        };
        TunnelBudget {
            cap: Arc::new(Semaphore::new(cap.max(crate::protocol::MAX_PAYLOAD))),
            shared,
            reserve: sharing.then(|| Arc::new(Semaphore::new(TUNNEL_RESERVE))),
        }
    }

    /// `len` bytes now: from the reserve, else if both the tunnel's cap and the budget
    /// have them.
    pub fn try_acquire(&self, len: u32) -> Option<BudgetPermit> {
        if let Some(reserve) = &self.reserve
            && let Ok(p) = reserve.clone().try_acquire_many_owned(len)
        {
            return Some(BudgetPermit::Reserved { _reserve: p });
        }
        let cap = self.cap.clone().try_acquire_many_owned(len).ok()?;
        let shared = self.shared.sem.clone().try_acquire_many_owned(len).ok()?;
        Some(BudgetPermit::Shared {
            _cap: cap,
            _shared: shared,
        })
    }

    /// `len` bytes once available, from whichever has them first: the reserve, or the
    /// tunnel's cap and then the budget (so a tunnel at its cap does not hold a share of
    /// the budget while it waits).
    pub async fn acquire(&self, len: u32) -> Option<BudgetPermit> {
        let shared = async {
            let cap = self.cap.clone().acquire_many_owned(len).await.ok()?;
            let shared = self.shared.sem.clone().acquire_many_owned(len).await.ok()?;
            Some(BudgetPermit::Shared {
                _cap: cap,
                _shared: shared,
            })
        };
        let Some(reserve) = &self.reserve else {
            return shared.await;
        };
        tokio::select! {
            p = shared => p,
            Ok(p) = reserve.clone().acquire_many_owned(len) => {
                Some(BudgetPermit::Reserved { _reserve: p })
            }
        }
    }
}

impl Budget {
    /// `total` bytes.
    pub fn new(total: usize) -> Self {
        Budget {
            sem: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// Rule: under pressure when less than a quarter is left; then connections holding
    /// bytes that their consumers do not take are reset (see `relay::Session::sweep`).
    pub(crate) fn scarce(&self) -> bool {
        self.sem.available_permits() < self.total / 4
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.total.saturating_sub(self.sem.available_permits())
    }
}

/// Default byte budget: 8 MiB (`limits.max_buffered_kib` in the agent's config).
pub const DEFAULT_BUFFER_BUDGET: usize = 8 << 20;
/// Default upward budget per tunnel: 1 MiB, 16 full payloads.
pub const DEFAULT_UPWARD_BUDGET: usize = 1 << 20;
