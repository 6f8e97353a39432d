//! The tunnel lifecycle, in one place: which sessions are live and what a notify means for
//! them (`table`), which bridge retires, replaces or stops which (`Lifecycle`, here), and
//! the time limits each session's bridge runs under: rotation overlap, lifetime, connect-by
//! (`task`). `Lifecycle` returns `Effect`s; the agent loop carries them out.

mod table;
mod task;

use std::collections::HashMap;

use tokio::time::Instant;

pub use table::{
    CONNECT_WITHIN, Decision, Entry, NotResumed, SessionTable, TunnelKey, connect_deadline,
};
pub use task::{Connected, Ends, Expiry, SessionExit, SessionTask};

use crate::persist::{Moment, PersistedSession};
use crate::secret::Secret;

/// What the agent does for the lifecycle.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Cancel this session's bridge now.
    Stop(u64),
    /// Retire it: it serves until its successor connects or `ROTATION_OVERLAP` ends, and
    /// never reconnects.
    Retire(u64),
    /// Remove this session file.
    Forget(String),
    /// Write this session file (off the loop, in order with the others).
    Save(PersistedSession),
}

/// What the lifecycle keeps of a session besides its table entry.
struct Tracked {
    /// The thing the session serves.
    thing: String,
    /// What is on disk for it (`None` when sessions are not persisted).
    persisted: Option<PersistedSession>,
    /// Sessions it replaces: stopped once it is connected.
    replaces: Vec<u64>,
}

/// The owner of every session's lifecycle: the table's rules plus retire/replace.
pub struct Lifecycle {
    table: SessionTable,
    tracked: HashMap<u64, Tracked>,
}

impl Lifecycle {
    pub fn new(table: SessionTable) -> Self {
        Lifecycle {
            table,
            tracked: HashMap::new(),
        }
    }

    /// The rules' table (decisions, caps, entries).
    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    /// What a notify's token means for its tunnel (`SessionTable::decide`).
    pub fn decide(&mut self, key: TunnelKey, token: &Secret, now: Instant) -> Decision {
        self.table.decide(key, token, now)
    }

    /// A persisted session rejoins the table (`SessionTable::resume`).
    pub fn resume(
        &mut self,
        key: TunnelKey,
        token: &Secret,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Result<u64, NotResumed> {
        self.table.resume(key, token, deadline, now)
    }

    /// Session `id` got no bridge: it leaves the table.
    pub fn abandon(&mut self, id: u64) {
        self.table.ended(id);
        self.tracked.remove(&id);
    }

    /// The per-thing caps (`things.<name>.max_tunnels`), replacing the previous ones.
    pub fn set_thing_caps(&mut self, caps: HashMap<String, usize>) {
        self.table.set_thing_caps(caps);
    }

    /// Session `id` has a bridge; `replaces` are stopped once it connects.
    pub fn started(
        &mut self,
        id: u64,
        thing: &str,
        persisted: Option<PersistedSession>,
        replaces: Vec<u64>,
    ) {
        let thing = thing.to_owned();
        let tracked = Tracked {
            thing,
            persisted,
            replaces,
        };
        self.tracked.insert(id, tracked);
    }

    /// What session `id` stops once it connects (a rotation's successor).
    pub fn set_replaces(&mut self, id: u64, replaces: Vec<u64>) {
        if let Some(t) = self.tracked.get_mut(&id) {
            t.replaces = replaces;
        }
    }

    /// Rule (rotation bursts): the token of session `old` was replaced. Per tunnel, only the
    /// bridge that serves and the newest one live. One that has connected serves on until
    /// its successor connects (or the overlap ends) but never reconnects, and what it was
    /// replacing stops now; one that never connected stops at once and hands on what it was
    /// replacing. Its file goes now either way. Returns the effects and what the successor
    /// replaces.
    pub fn retire(&mut self, old: u64, connected: bool) -> (Vec<Effect>, Vec<u64>) {
        let Some(t) = self.tracked.get_mut(&old) else {
            return (Vec::new(), Vec::new());
        };
        let file = t.persisted.take().map(|p| Effect::Forget(p.file_id));
        let replaced = std::mem::take(&mut t.replaces);
        if !connected {
            return (
                [Effect::Stop(old)].into_iter().chain(file).collect(),
                replaced,
            );
        }
        let mut effects = vec![Effect::Retire(old)];
        effects.extend(file);
        effects.extend(replaced.into_iter().map(Effect::Stop));
        (effects, vec![old])
    }

    /// Rule: a session's first websocket starts its lifetime (persisted) and stops what it
    /// replaces.
    pub fn connected(&mut self, id: u64, at: Moment, now: Instant) -> Vec<Effect> {
        self.table.connected(id, now);
        let Some(t) = self.tracked.get_mut(&id) else {
            return Vec::new();
        };
        let mut effects = Vec::new();
        if let Some(p) = t.persisted.as_mut().filter(|p| p.first_connected.is_none()) {
            p.first_connected = Some(at);
            effects.push(Effect::Save(p.clone()));
        }
        effects.extend(
            std::mem::take(&mut t.replaces)
                .into_iter()
                .map(Effect::Stop),
        );
        effects
    }

    /// Session `id`'s bridge ended: its entry, when it was still the tunnel's (not replaced),
    /// and its file to forget.
    pub fn ended(&mut self, id: u64) -> Option<(Entry, Vec<Effect>)> {
        let tracked = self.tracked.remove(&id);
        let entry = self.table.ended(id)?;
        let file = tracked
            .and_then(|t| t.persisted)
            .map(|p| Effect::Forget(p.file_id));
        Some((entry, file.into_iter().collect()))
    }

    /// A thing left the configuration: every bridge of it stops, one being replaced by a
    /// rotation included.
    pub fn thing_removed(&self, thing: &str) -> Vec<Effect> {
        let mut ids: Vec<u64> = self
            .tracked
            .iter()
            .filter(|(_, t)| t.thing == thing)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids.into_iter().map(Effect::Stop).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RotationPolicy;
    use std::time::Duration;

    fn lifecycle() -> Lifecycle {
        let table = SessionTable::new(10, Duration::from_secs(3600), RotationPolicy::Replace);
        Lifecycle::new(table)
    }

    fn file(id: &str) -> Option<PersistedSession> {
        Some(PersistedSession {
            file_id: id.into(),
            thing: "gw".into(),
            region: "eu-west-1".into(),
            services: vec!["SSH".into()],
            access_token: crate::secret::Secret::new("t"),
            client_token: crate::secret::Secret::new("c"),
            first_connected: None,
            received: None,
        })
    }

    #[test]
    fn a_replaced_bridge_that_never_connected_stops_at_once_and_hands_on_what_it_replaced() {
        let mut lc = lifecycle();
        lc.started(1, "gw", file("f1"), Vec::new());
        lc.started(2, "gw", file("f2"), vec![1]);
        let (effects, replaces) = lc.retire(2, false);
        assert_eq!(effects, [Effect::Stop(2), Effect::Forget("f2".into())]);
        assert_eq!(replaces, [1], "the successor stops what 2 was replacing");
    }

    #[test]
    fn a_replaced_bridge_that_connected_retires_and_what_it_replaced_stops_now() {
        let mut lc = lifecycle();
        lc.started(1, "gw", file("f1"), Vec::new());
        lc.started(2, "gw", file("f2"), vec![1]);
        let (effects, replaces) = lc.retire(2, true);
        assert_eq!(
            effects,
            [
                Effect::Retire(2),
                Effect::Forget("f2".into()),
                Effect::Stop(1)
            ]
        );
        assert_eq!(replaces, [2]);
    }

    #[test]
    fn a_first_connect_saves_its_time_and_stops_the_replaced_sessions() {
        let mut lc = lifecycle();
        lc.started(3, "gw", file("f3"), vec![1, 2]);
        let effects = lc.connected(3, Moment::now(), Instant::now());
        assert!(matches!(&effects[0], Effect::Save(p) if p.first_connected.is_some()));
        assert_eq!(effects[1..], [Effect::Stop(1), Effect::Stop(2)]);
        assert!(
            lc.connected(3, Moment::now(), Instant::now()).is_empty(),
            "saved and stopped once"
        );
    }

    #[test]
    fn a_successor_stops_what_it_was_set_to_replace_once_connected() {
        let mut lc = lifecycle();
        lc.started(2, "gw", None, Vec::new());
        lc.set_replaces(2, vec![1]);
        let effects = lc.connected(2, Moment::now(), Instant::now());
        assert_eq!(effects, [Effect::Stop(1)]);
    }

    #[test]
    fn an_ended_session_leaves_the_table_and_its_file_goes_unless_it_was_replaced() {
        let mut lc = lifecycle();
        let key = TunnelKey::new("gw", "eu-west-1", &["SSH".to_owned()]);
        let now = Instant::now();
        let Decision::Start { id } = lc.decide(key.clone(), &Secret::new("a"), now) else {
            panic!("a first notify starts a session");
        };
        lc.started(id, "gw", file("f1"), Vec::new());
        let (entry, effects) = lc.ended(id).expect("still the tunnel's session");
        assert_eq!((entry.id, effects), (id, vec![Effect::Forget("f1".into())]));
        assert!(lc.table().entries().is_empty());
        // A replaced session is no longer the tunnel's: nothing to report.
        let Decision::Start { id: old } = lc.decide(key.clone(), &Secret::new("b"), now) else {
            panic!("the key is free again");
        };
        let Decision::Rotate { id: new, .. } = lc.decide(key, &Secret::new("c"), now) else {
            panic!("a new token rotates");
        };
        assert!(lc.ended(old).is_none());
        assert_eq!(lc.table().entries()[0].id, new);
    }

    #[test]
    fn a_removed_thing_stops_every_bridge_of_it_and_no_other() {
        let mut lc = lifecycle();
        lc.started(1, "plc", None, Vec::new());
        lc.started(2, "gw", None, Vec::new());
        lc.started(3, "plc", None, Vec::new());
        assert_eq!(lc.thing_removed("plc"), [Effect::Stop(1), Effect::Stop(3)]);
    }
}
