//! The tunnel table: which sessions are live, keyed by (thing, region, sorted services), and
//! what a new notify means for them: a repeat, a new tunnel, or a rotation. Pure state, no I/O;
//! the agent carries out the decisions.

use std::collections::{HashMap, VecDeque};

use tokio::time::{Duration, Instant};

use crate::config::RotationPolicy;
use crate::secret::{Secret, TokenHash};

/// The service's ceiling on a tunnel's lifetime.
pub const SERVICE_MAX_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A session that never connects (data plane unreachable, DNS broken) ends this long after
/// its notify arrived: no token outlives the service's longest tunnel.
pub const CONNECT_WITHIN: Duration = SERVICE_MAX_LIFETIME;

/// Rule (nothing lives for ever): when a session that has not connected yet gives up,
/// `since_notify` after its notify arrived (unknown: counted from now); `None` when that
/// time is already over.
pub fn connect_deadline(since_notify: Option<Duration>, now: Instant) -> Option<Instant> {
    let left = CONNECT_WITHIN.saturating_sub(since_notify.unwrap_or_default());
    (!left.is_zero()).then(|| now + left)
}

/// Tokens remembered per tunnel, so a late redelivery of a revoked one is never used.
const REMEMBERED_TOKENS: usize = 16;
/// Tunnels whose tokens are remembered after they end.
const REMEMBERED_KEYS: usize = 64;

/// What identifies a tunnel in notifies: the thing it is for, its region and its services.
/// Notifies carry no tunnel id, so two tunnels with the same key look like a rotation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TunnelKey {
    pub thing: String,
    pub region: String,
    pub services: Vec<String>,
}

impl TunnelKey {
    pub fn new(thing: &str, region: &str, services: &[String]) -> Self {
        let mut services = services.to_vec();
        services.sort();
        services.dedup();
        TunnelKey {
            thing: thing.to_owned(),
            region: region.to_owned(),
            services,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub id: u64,
    pub key: TunnelKey,
    /// When the session was created (notify received, or resumed).
    pub created: Instant,
    /// The agent's own end for this token: `max_lifetime` after its first connect; `None`
    /// until then.
    pub deadline: Option<Instant>,
    /// The whole SHA-256 of the token the session runs with (shown as `token:<8 hex>`).
    pub token: TokenHash,
    /// Tokens this tunnel had before this one (rotations seen by this agent).
    pub rotations: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// The same token again (QoS 1 redelivery): nothing to do.
    Duplicate,
    /// A token this tunnel already replaced: never presented again.
    Stale,
    /// A new session `id`.
    Start { id: u64 },
    /// Replace session `old` by `id`: connect `id` first, then stop `old`.
    Rotate { old: u64, id: u64 },
    /// No room for a new tunnel.
    Refused(NoRoom),
}

/// Why a new tunnel does not fit (`SessionTable::room_for`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoom {
    #[error("{live} tunnels are already live (limits.max_tunnels); a live tunnel is never evicted")]
    Agent { live: usize },
    #[error("{live} tunnels of thing {thing} are already live (things.{thing}.max_tunnels)")]
    Thing { thing: String, live: usize },
    #[error(
        "the last of limits.max_tunnels ({max}) stays free for the gateway's own thing {own}; give things.{thing}.max_tunnels to share it otherwise"
    )]
    KeptForOwnThing {
        max: usize,
        own: String,
        thing: String,
    },
}

/// Why a persisted session is not resumed into the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotResumed {
    #[error("a live session has the same token")]
    AlreadyLive,
    #[error(transparent)]
    NoRoom(#[from] NoRoom),
}

pub struct SessionTable {
    entries: Vec<Entry>,
    seen: HashMap<TunnelKey, VecDeque<TokenHash>>,
    seen_order: VecDeque<TunnelKey>,
    next_id: u64,
    max_tunnels: usize,
    max_lifetime: Duration,
    policy: RotationPolicy,
    /// Per downstream thing: at most this many of its tunnels live.
    thing_caps: HashMap<String, usize>,
    /// The gateway's own thing, for which one slot stays free (`room_for`).
    own_thing: Option<String>,
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
            thing_caps: HashMap::new(),
            own_thing: None,
        }
    }

    /// The gateway's own thing: downstream things without a cap of their own leave it one
    /// tunnel slot.
    pub fn set_own_thing(&mut self, thing: &str) {
        self.own_thing = Some(thing.to_owned());
    }

    /// The per-thing caps (`things.<name>.max_tunnels`), replacing the previous ones.
    pub fn set_thing_caps(&mut self, caps: HashMap<String, usize>) {
        self.thing_caps = caps;
    }

    /// Rule (tunnel caps): a new tunnel (not a rotation) needs room under the agent's
    /// `max_tunnels` and under its thing's cap; a downstream thing without a cap of its own
    /// also leaves one slot to the gateway's own thing while that has none. The refusal
    /// says which.
    fn room_for(&self, thing: &str) -> Result<(), NoRoom> {
        let total = self.entries.len();
        if total >= self.max_tunnels {
            return Err(NoRoom::Agent { live: total });
        }
        let live_of = |t: &str| self.entries.iter().filter(|e| e.key.thing == t).count();
        let live = live_of(thing);
        let thing = thing.to_owned();
        match (self.thing_caps.get(&thing), &self.own_thing) {
            (Some(&cap), _) if live >= cap => Err(NoRoom::Thing { thing, live }),
            (None, Some(own))
                if *own != thing && live_of(own) == 0 && total + 1 >= self.max_tunnels =>
            {
                Err(NoRoom::KeptForOwnThing {
                    max: self.max_tunnels,
                    own: own.clone(),
                    thing,
                })
            }
            _ => Ok(()),
        }
    }

    pub fn decide(&mut self, key: TunnelKey, token: &Secret, now: Instant) -> Decision {
        let fp = token.hash();
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
                // The new token's lifetime is its own: it starts at its first connect.
                self.entries.push(Entry {
                    id,
                    key: key.clone(),
                    created: now,
                    deadline: None,
                    token: fp,
                    rotations: old.rotations + 1,
                });
                Decision::Rotate { old: old.id, id }
            }
            _ => {
                if let Err(why) = self.room_for(&key.thing) {
                    return Decision::Refused(why);
                }
                let id = self.insert(key.clone(), fp, now);
                Decision::Start { id }
            }
        };
        self.remember(key, fp);
        decision
    }

    /// A session persisted by an earlier run, resumed with its token. `deadline` is what is
    /// left of its lifetime, if it had connected; `None` is returned (nothing added) when
    /// the table is full or the key already has a session with this token.
    pub fn resume(
        &mut self,
        key: TunnelKey,
        token: &Secret,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<u64, NotResumed> {
        let fp = token.hash();
        if self.entries.iter().any(|e| e.key == key && e.token == fp) {
            return Err(NotResumed::AlreadyLive);
        }
        self.room_for(&key.thing)?;
        let id = self.insert(key.clone(), fp, now);
        if let Some(e) = self.entries.iter_mut().find(|e| e.id == id) {
            e.deadline = deadline;
        }
        self.remember(key, fp);
        Ok(id)
    }

    fn insert(&mut self, key: TunnelKey, token: TokenHash, now: Instant) -> u64 {
        let id = self.next();
        self.entries.push(Entry {
            id,
            key,
            created: now,
            deadline: None,
            token,
            rotations: 0,
        });
        id
    }

    /// Rule: the agent's own lifetime for a token counts from the token's first connect and
    /// is never inherited from another token (the service enforces the tunnel's real
    /// lifetime). Returns the session's deadline.
    pub fn connected(&mut self, id: u64, now: Instant) -> Option<Instant> {
        let max = self.max_lifetime;
        let e = self.entries.iter_mut().find(|e| e.id == id)?;
        Some(*e.deadline.get_or_insert(now + max))
    }

    /// The agent's own lifetime cap.
    pub fn max_lifetime(&self) -> Duration {
        self.max_lifetime
    }

    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn remember(&mut self, key: TunnelKey, fp: TokenHash) {
        let tokens = self.seen.entry(key.clone()).or_default();
        if tokens.contains(&fp) {
            return;
        }
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

    /// Tokens remembered in all (bounded by `REMEMBERED_KEYS` x `REMEMBERED_TOKENS`).
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.seen.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(services: &[&str]) -> TunnelKey {
        let s: Vec<String> = services.iter().map(|s| s.to_string()).collect();
        TunnelKey::new("gw", "us-east-1", &s)
    }

    fn table(max: usize, policy: RotationPolicy) -> SessionTable {
        SessionTable::new(max, Duration::from_secs(600), policy)
    }

    #[test]
    fn tunnel_caps_count_per_thing_and_for_the_agent() {
        let mut t = table(3, RotationPolicy::Replace);
        t.set_thing_caps(HashMap::from([("PLC-42".to_owned(), 1)]));
        let plc = |s: &str| TunnelKey::new("PLC-42", "us-east-1", &[s.to_owned()]);
        let now = Instant::now();
        assert!(matches!(
            t.decide(plc("HTTP"), &Secret::new("a"), now),
            Decision::Start { .. }
        ));
        // A second tunnel of the capped thing is refused by name; a rotation is not new.
        match t.decide(plc("MODBUS"), &Secret::new("b"), now) {
            Decision::Refused(why) => {
                assert_eq!(
                    why.to_string(),
                    "1 tunnels of thing PLC-42 are already live (things.PLC-42.max_tunnels)"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            t.decide(plc("HTTP"), &Secret::new("c"), now),
            Decision::Rotate { .. }
        ));
        // Other things still fit, up to the agent's limit.
        assert!(matches!(
            t.decide(key(&["SSH"]), &Secret::new("d"), now),
            Decision::Start { .. }
        ));
        assert!(matches!(
            t.decide(key(&["VNC"]), &Secret::new("e"), now),
            Decision::Start { .. }
        ));
        match t.decide(key(&["WEB"]), &Secret::new("f"), now) {
            Decision::Refused(why) => assert_eq!(why, NoRoom::Agent { live: 3 }),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_uncapped_downstream_thing_leaves_the_gateway_its_last_slot() {
        let mut t = table(3, RotationPolicy::Replace);
        t.set_own_thing("gw");
        t.set_thing_caps(HashMap::from([("CAM".to_owned(), 3)]));
        let of = |thing: &str, s: &str| TunnelKey::new(thing, "us-east-1", &[s.to_owned()]);
        let now = Instant::now();
        assert!(matches!(
            t.decide(of("PLC", "A"), &Secret::new("1"), now),
            Decision::Start { .. }
        ));
        assert!(matches!(
            t.decide(of("PLC", "B"), &Secret::new("2"), now),
            Decision::Start { .. }
        ));
        match t.decide(of("PLC", "C"), &Secret::new("3"), now) {
            Decision::Refused(why) => {
                assert!(matches!(&why, NoRoom::KeptForOwnThing { own, .. } if own == "gw"));
                assert!(why.to_string().contains("gateway's own thing gw"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        // A thing with a cap of its own may take it; so may the gateway itself.
        let mut capped = table(3, RotationPolicy::Replace);
        capped.set_own_thing("gw");
        capped.set_thing_caps(HashMap::from([("CAM".to_owned(), 3)]));
        for (i, s) in ["A", "B", "C"].iter().enumerate() {
            let d = capped.decide(of("CAM", s), &Secret::new(i.to_string()), now);
            assert!(matches!(d, Decision::Start { .. }), "{d:?}");
        }
        assert!(matches!(
            t.decide(of("gw", "SSH"), &Secret::new("4"), now),
            Decision::Start { .. }
        ));
        // Once the gateway has its tunnel, nothing more is held back (the total still counts).
        let mut t = table(3, RotationPolicy::Replace);
        t.set_own_thing("gw");
        t.decide(of("gw", "SSH"), &Secret::new("5"), now);
        t.decide(of("PLC", "A"), &Secret::new("6"), now);
        assert!(matches!(
            t.decide(of("PLC", "B"), &Secret::new("7"), now),
            Decision::Start { .. }
        ));
    }

    fn start(t: &mut SessionTable, k: TunnelKey, token: &str) -> u64 {
        match t.decide(k, &Secret::new(token), Instant::now()) {
            Decision::Start { id } => id,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_exact_repeat_of_a_token_is_a_duplicate() {
        let mut t = table(10, RotationPolicy::Replace);
        start(&mut t, key(&["SSH"]), "a");
        assert_eq!(
            t.decide(key(&["SSH"]), &Secret::new("a"), Instant::now()),
            Decision::Duplicate
        );
        assert_eq!(t.entries().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_token_for_a_live_key_is_a_rotation_with_a_lifetime_of_its_own() {
        let mut t = table(10, RotationPolicy::Replace);
        let first = start(&mut t, key(&["SSH", "HTTP"]), "a");
        let d1 = t.connected(first, Instant::now()).unwrap();
        assert_eq!(d1, Instant::now() + Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(300)).await;
        // Service order does not matter: same tunnel.
        let d = t.decide(key(&["HTTP", "SSH"]), &Secret::new("b"), Instant::now());
        let Decision::Rotate { old, id } = d else {
            panic!("{d:?}")
        };
        assert_eq!(old, first);
        assert_eq!(t.entries().len(), 1);
        assert_eq!(t.entries()[0].rotations, 1);
        assert_eq!(
            t.entries()[0].deadline,
            None,
            "no deadline before it connects"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let d2 = t.connected(id, Instant::now()).unwrap();
        assert_eq!(
            d2,
            Instant::now() + Duration::from_secs(600),
            "never inherited"
        );
        assert_eq!(
            t.connected(id, Instant::now() + Duration::from_secs(9)),
            Some(d2)
        );
        assert_eq!(t.ended(first), None, "the replaced session already left");
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
    async fn tunnels_of_different_things_are_different_tunnels() {
        let mut t = table(10, RotationPolicy::Replace);
        let s = vec!["SSH".to_owned()];
        start(&mut t, TunnelKey::new("plc-1", "us-east-1", &s), "a");
        start(&mut t, TunnelKey::new("plc-2", "us-east-1", &s), "b");
        assert_eq!(t.entries().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_maximum_a_new_tunnel_is_refused_and_none_evicted() {
        let mut t = table(2, RotationPolicy::Replace);
        start(&mut t, key(&["A"]), "1");
        start(&mut t, key(&["B"]), "2");
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
        // So is nothing resumed above it.
        let refused = t.resume(key(&["D"]), &Secret::new("5"), None, Instant::now());
        assert!(matches!(
            refused,
            Err(NotResumed::NoRoom(NoRoom::Agent { .. }))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn parallel_policy_keeps_the_old_session_beside_the_new_one() {
        let mut t = table(10, RotationPolicy::Parallel);
        let a = start(&mut t, key(&["SSH"]), "a");
        t.connected(a, Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        let b = start(&mut t, key(&["SSH"]), "b");
        assert_eq!(t.entries().len(), 2);
        assert_eq!(
            t.connected(b, Instant::now()),
            Some(Instant::now() + Duration::from_secs(600))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_resumed_session_keeps_its_deadline_and_its_token_is_known() {
        let mut t = table(10, RotationPolicy::Replace);
        let deadline = Instant::now() + Duration::from_secs(42);
        let id = t
            .resume(
                key(&["SSH"]),
                &Secret::new("a"),
                Some(deadline),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(t.connected(id, Instant::now()), Some(deadline));
        assert_eq!(
            t.decide(key(&["SSH"]), &Secret::new("a"), Instant::now()),
            Decision::Duplicate,
            "the redelivered notify of a resumed session"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_are_told_apart_by_their_whole_hash_not_their_display_form() {
        let mut t = table(10, RotationPolicy::Replace);
        // The same `token:<8 hex>`: a rotation all the same, and no duplicate.
        let (a, b) = (
            Secret::new("AQGA-collide-40119"),
            Secret::new("AQGA-collide-45948"),
        );
        assert_eq!(a.to_string(), b.to_string());
        start(&mut t, key(&["SSH"]), a.expose());
        assert!(matches!(
            t.decide(key(&["SSH"]), &b, Instant::now()),
            Decision::Rotate { .. }
        ));
        let c = Secret::new("AQGA-later");
        t.decide(key(&["SSH"]), &c, Instant::now());
        assert_eq!(t.decide(key(&["SSH"]), &a, Instant::now()), Decision::Stale);
    }

    /// Rotates one key through `n` tokens named `{prefix}{i}`, each ending the previous.
    fn rotate_through(t: &mut SessionTable, k: &TunnelKey, prefix: &str, n: usize) {
        for i in 0..n {
            let d = t.decide(
                k.clone(),
                &Secret::new(format!("{prefix}{i}")),
                Instant::now(),
            );
            assert!(
                matches!(d, Decision::Start { .. } | Decision::Rotate { .. }),
                "{d:?}"
            );
        }
    }

    #[test]
    fn a_key_remembers_its_last_16_tokens() {
        let mut t = table(4, RotationPolicy::Replace);
        let k = key(&["SSH"]);
        rotate_through(&mut t, &k, "tok-", REMEMBERED_TOKENS + 1);
        assert_eq!(REMEMBERED_TOKENS, 16);
        // tok-0 is the 17th back: forgotten, so it reads as a new token (a rotation).
        let oldest_kept = Secret::new("tok-1");
        assert_eq!(
            t.decide(k.clone(), &oldest_kept, Instant::now()),
            Decision::Stale
        );
        let forgotten = Secret::new("tok-0");
        assert!(matches!(
            t.decide(k, &forgotten, Instant::now()),
            Decision::Rotate { .. }
        ));
    }

    #[test]
    fn the_table_remembers_the_tokens_of_its_last_64_keys() {
        let mut t = table(4, RotationPolicy::Replace);
        let keys: Vec<TunnelKey> = (0..=REMEMBERED_KEYS)
            .map(|i| key(&[&format!("S{i}")]))
            .collect();
        for k in &keys {
            rotate_through(&mut t, k, "old-", 1);
            let id = t.entries().iter().find(|e| &e.key == k).map(|e| e.id);
            t.ended(id.unwrap());
        }
        assert_eq!(REMEMBERED_KEYS, 64);
        assert_eq!(t.remembered(), REMEMBERED_KEYS);
        let old = Secret::new("old-0");
        assert_eq!(
            t.decide(keys[1].clone(), &old, Instant::now()),
            Decision::Stale
        );
        assert!(matches!(
            t.decide(keys[0].clone(), &old, Instant::now()),
            Decision::Start { .. }
        ));
    }

    #[test]
    fn a_live_keys_tokens_are_never_forgotten_for_other_keys() {
        let mut t = table(4, RotationPolicy::Replace);
        let live = key(&["LIVE"]);
        rotate_through(&mut t, &live, "live-", 2);
        for i in 0..2 * REMEMBERED_KEYS {
            let k = key(&[&format!("S{i}")]);
            rotate_through(&mut t, &k, "x-", 1);
            let id = t.entries().iter().find(|e| e.key == k).map(|e| e.id);
            t.ended(id.unwrap());
        }
        let replaced = Secret::new("live-0");
        assert_eq!(t.decide(live, &replaced, Instant::now()), Decision::Stale);
    }

    #[test]
    fn a_resumed_session_is_refused_when_its_token_is_already_live() {
        let mut t = table(4, RotationPolicy::Replace);
        let tok = Secret::new("AQGA-resumed");
        let now = Instant::now();
        assert!(t.resume(key(&["SSH"]), &tok, None, now).is_ok());
        assert_eq!(
            t.resume(key(&["SSH"]), &tok, None, now),
            Err(NotResumed::AlreadyLive)
        );
        assert!(t.resume(key(&["HTTP"]), &tok, None, now).is_ok());
        assert_eq!(t.entries().len(), 2);
        assert_eq!(t.decide(key(&["SSH"]), &tok, now), Decision::Duplicate);
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let mut t = SessionTable::new(100, Duration::from_secs(600), RotationPolicy::Replace);
        for k in 0..200 {
            for n in 0..40 {
                let id = match t.decide(
                    key(&[&format!("S{k}")]),
                    &Secret::new(format!("{k}-{n}")),
                    Instant::now(),
                ) {
                    Decision::Start { id } | Decision::Rotate { id, .. } => id,
                    other => panic!("{other:?}"),
                };
                if n == 39 {
                    t.ended(id);
                }
            }
        }
        assert!(t.remembered() <= REMEMBERED_KEYS * REMEMBERED_TOKENS);
    }

    #[test]
    fn a_session_that_never_connects_ends_12_hours_after_its_notify() {
        let now = Instant::now();
        assert_eq!(connect_deadline(None, now), Some(now + CONNECT_WITHIN));
        let hour = Duration::from_secs(3600);
        assert_eq!(connect_deadline(Some(11 * hour), now), Some(now + hour));
        assert_eq!(connect_deadline(Some(12 * hour), now), None);
        assert_eq!(connect_deadline(Some(13 * hour), now), None);
        assert_eq!(CONNECT_WITHIN, 12 * hour);
    }

    #[test]
    fn lifetime_is_capped_at_the_services_12_hours() {
        let t = SessionTable::new(1, Duration::from_secs(24 * 3600), RotationPolicy::Replace);
        assert_eq!(t.max_lifetime(), SERVICE_MAX_LIFETIME);
        let shorter = SessionTable::new(1, Duration::from_secs(3600), RotationPolicy::Replace);
        assert_eq!(shorter.max_lifetime(), Duration::from_secs(3600));
    }
}
