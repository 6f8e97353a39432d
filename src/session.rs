//! The tunnel table: which sessions are live, keyed by (region, sorted services), and what a
//! new notify means for them: a repeat, a new tunnel, or a rotation. Pure state, no I/O;
//! the agent carries out the decisions.

use std::collections::{HashMap, VecDeque};

use tokio::time::{Duration, Instant};

use crate::config::RotationPolicy;
use crate::secret::Secret;

/// The service's ceiling on a tunnel's lifetime.
pub const SERVICE_MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Tokens remembered per tunnel, so a late redelivery of a revoked one is never used.
const REMEMBERED_TOKENS: usize = 16;
/// Tunnels whose tokens are remembered after they end.
const REMEMBERED_KEYS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub region: String,
    pub services: Vec<String>,
}

impl TunnelKey {
    pub fn new(region: &str, services: &[String]) -> Self {
        let mut services = services.to_vec();
        services.sort();
        services.dedup();
        TunnelKey {
            region: region.to_owned(),
            services,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub key: TunnelKey,
    pub started: Instant,
    pub deadline: Instant,
    /// `token:<hash>` of the token the session runs with.
    pub token: String,
    pub rotations: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The same token again (QoS 1 redelivery): nothing to do.
    Duplicate,
    /// A token this tunnel already replaced: never presented again.
    Stale,
    Start {
        id: u64,
        deadline: Instant,
    },
    /// Replace session `old` by `id`, which keeps `old`'s start time and deadline.
    Rotate {
        old: u64,
        id: u64,
        deadline: Instant,
    },
    Refused(String),
}

pub struct SessionTable {
    entries: Vec<Entry>,
    seen: HashMap<TunnelKey, VecDeque<String>>,
    seen_order: VecDeque<TunnelKey>,
    next_id: u64,
    max_tunnels: usize,
    max_lifetime: Duration,
    policy: RotationPolicy,
}

impl SessionTable {
    pub fn new(max_tunnels: usize, max_lifetime: Duration, policy: RotationPolicy) -> Self {
        SessionTable {
            entries: Vec::new(),
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            next_id: 0,
            max_tunnels,
            max_lifetime: max_lifetime.min(SERVICE_MAX_LIFETIME),
            policy,
        }
    }

    pub fn decide(&mut self, key: TunnelKey, token: &Secret, now: Instant) -> Decision {
        let fp = token.to_string();
        let live: Vec<&Entry> = self.entries.iter().filter(|e| e.key == key).collect();
        if live.iter().any(|e| e.token == fp) {
            return Decision::Duplicate;
        }
        if self.seen.get(&key).is_some_and(|s| s.contains(&fp)) {
            return Decision::Stale;
        }
        let newest = live.iter().max_by_key(|e| e.id).map(|e| (*e).clone());
        let decision = match (newest, self.policy) {
            (Some(old), RotationPolicy::Replace) => {
                let id = self.next();
                self.entries.retain(|e| e.id != old.id);
                self.entries.push(Entry {
                    id,
                    token: fp.clone(),
                    rotations: old.rotations + 1,
                    ..old.clone()
                });
                Decision::Rotate {
                    old: old.id,
                    id,
                    deadline: old.deadline,
                }
            }
            (existing, _) => {
                if self.entries.len() >= self.max_tunnels {
                    return Decision::Refused(format!(
                        "{} tunnels are already live (limits.max_tunnels); a live tunnel is never evicted",
                        self.entries.len()
                    ));
                }
                // A parallel session is the same tunnel: it keeps the original deadline.
                let (started, deadline) =
                    existing.map_or((now, now + self.max_lifetime), |e| (e.started, e.deadline));
                let id = self.next();
                self.entries.push(Entry {
                    id,
                    key: key.clone(),
                    started,
                    deadline,
                    token: fp.clone(),
                    rotations: 0,
                });
                Decision::Start { id, deadline }
            }
        };
        self.remember(key, fp);
        decision
    }

    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn remember(&mut self, key: TunnelKey, fp: String) {
        let tokens = self.seen.entry(key.clone()).or_default();
        if tokens.is_empty() {
            self.seen_order.push_back(key);
        }
        tokens.push_back(fp);
        if tokens.len() > REMEMBERED_TOKENS {
            tokens.pop_front();
        }
        while self.seen_order.len() > REMEMBERED_KEYS {
            if let Some(old) = self.seen_order.pop_front() {
                if self.entries.iter().any(|e| e.key == old) {
                    self.seen_order.push_back(old);
                    break;
                }
                self.seen.remove(&old);
            }
        }
    }

    /// A session's bridge ended; `None` if it had already been replaced.
    pub fn ended(&mut self, id: u64) -> Option<Entry> {
        let pos = self.entries.iter().position(|e| e.id == id)?;
        Some(self.entries.remove(pos))
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(services: &[&str]) -> TunnelKey {
        let s: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        TunnelKey::new("us-east-1", &s)
    }

    fn table(max: usize, policy: RotationPolicy) -> SessionTable {
        SessionTable::new(max, Duration::from_secs(600), policy)
    }

    #[tokio::test(start_paused = true)]
    async fn an_exact_repeat_of_a_token_is_a_duplicate() {
        let mut t = table(10, RotationPolicy::Replace);
        let tok = Secret::new("a");
        assert!(matches!(
            t.decide(key(&["SSH"]), &tok, Instant::now()),
            Decision::Start { .. }
        ));
        assert_eq!(
            t.decide(key(&["SSH"]), &tok, Instant::now()),
            Decision::Duplicate
        );
        assert_eq!(t.entries().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_token_rotates_and_keeps_the_original_deadline() {
        let mut t = table(10, RotationPolicy::Replace);
        let start = Instant::now();
        let Decision::Start {
            id: first,
            deadline,
        } = t.decide(key(&["SSH", "HTTP"]), &Secret::new("a"), start)
        else {
            panic!()
        };
        assert_eq!(deadline, start + Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(300)).await;
        // Service order does not matter: same tunnel.
        let d = t.decide(key(&["HTTP", "SSH"]), &Secret::new("b"), Instant::now());
        let Decision::Rotate {
            old,
            id,
            deadline: kept,
        } = d
        else {
            panic!("{d:?}")
        };
        assert_eq!((old, kept), (first, deadline));
        assert_eq!(t.entries().len(), 1);
        assert_eq!(t.entries()[0].rotations, 1);
        assert_eq!(t.entries()[0].started, start);
        assert_eq!(
            t.ended(first),
            None,
            "the replaced session already left the table"
        );
        assert!(t.ended(id).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_revoked_token_is_never_used_again() {
        let mut t = table(10, RotationPolicy::Replace);
        let (a, b) = (Secret::new("a"), Secret::new("b"));
        t.decide(key(&["SSH"]), &a, Instant::now());
        t.decide(key(&["SSH"]), &b, Instant::now());
        assert_eq!(t.decide(key(&["SSH"]), &a, Instant::now()), Decision::Stale);
        // Even after the tunnel ended, a redelivery of an old token does not restart it.
        let id = t.entries()[0].id;
        t.ended(id);
        assert_eq!(t.decide(key(&["SSH"]), &b, Instant::now()), Decision::Stale);
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_maximum_a_new_tunnel_is_refused_and_none_evicted() {
        let mut t = table(2, RotationPolicy::Replace);
        t.decide(key(&["A"]), &Secret::new("1"), Instant::now());
        t.decide(key(&["B"]), &Secret::new("2"), Instant::now());
        assert!(matches!(
            t.decide(key(&["C"]), &Secret::new("3"), Instant::now()),
            Decision::Refused(_)
        ));
        assert_eq!(t.entries().len(), 2);
        // A rotation of a live tunnel is still accepted at the maximum.
        assert!(matches!(
            t.decide(key(&["A"]), &Secret::new("4"), Instant::now()),
            Decision::Rotate { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_policy_keeps_the_old_session_beside_the_new_one() {
        let mut t = table(10, RotationPolicy::Parallel);
        let Decision::Start { deadline, .. } =
            t.decide(key(&["SSH"]), &Secret::new("a"), Instant::now())
        else {
            panic!()
        };
        tokio::time::advance(Duration::from_secs(60)).await;
        let d = t.decide(key(&["SSH"]), &Secret::new("b"), Instant::now());
        assert!(
            matches!(d, Decision::Start { deadline: kept, .. } if kept == deadline),
            "{d:?}"
        );
        assert_eq!(t.entries().len(), 2);
    }

    #[test]
    fn lifetime_is_capped_at_the_services_12_hours() {
        let t = SessionTable::new(1, Duration::from_secs(24 * 3600), RotationPolicy::Replace);
        assert_eq!(t.max_lifetime, SERVICE_MAX_LIFETIME);
    }
}
