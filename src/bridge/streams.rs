//! The stream/connection table of one tunnel: which stream is active per service and which
//! local connections belong to it. Pure state, no I/O: the session decides what to send.

use std::collections::{HashMap, VecDeque};

#[derive(Debug)]
struct ServiceStreams<H> {
    active: Option<i32>,
    /// Whether the active stream's peer puts connection ids on the wire (V3), or leaves them
    /// out (V1/V2: one connection, keyed as connection 1).
    wire_ids: bool,
    conns: HashMap<u32, H>,
    last_stream: i32,
    last_conn: u32,
}

impl<H> Default for ServiceStreams<H> {
    fn default() -> Self {
        ServiceStreams {
            active: None,
            wire_ids: true,
            conns: HashMap::new(),
            last_stream: 0,
            last_conn: 0,
        }
    }
}

/// Stray streams remembered, so each is answered with one STREAM_RESET only.
const STRAY_MEMORY: usize = 32;

/// Where a DATA message goes.
#[derive(Debug)]
pub enum Route<'a, H> {
    Deliver(&'a mut H),
    /// The stream id is not the service's active stream: dropped, and the first such DATA
    /// answered with STREAM_RESET (`answer_stray_data`; docs/protocol.md §3.2, §3.3).
    StaleStream,
    /// The stream is current but the connection is unknown (already closed): drop.
    UnknownConnection,
}

/// `H` is whatever the session keeps per local connection; dropping it closes the connection.
#[derive(Debug)]
pub struct StreamTable<H> {
    services: HashMap<String, ServiceStreams<H>>,
    /// (service, stream) pairs already answered for stray DATA; bounded.
    strays: VecDeque<(String, i32)>,
}

impl<H> Default for StreamTable<H> {
    fn default() -> Self {
        StreamTable {
            services: HashMap::new(),
            strays: VecDeque::new(),
        }
    }
}

impl<H> StreamTable<H> {
    pub fn active_stream(&self, service: &str) -> Option<i32> {
        self.services.get(service).and_then(|s| s.active)
    }

    /// STREAM_START: `stream` becomes the service's active stream, with connection ids on
    /// the wire or not (`wire_ids`). The connections of the stream it replaces are returned,
    /// to be closed.
    pub fn start_stream(&mut self, service: &str, stream: i32, wire_ids: bool) -> Vec<H> {
        let s = self.services.entry(service.to_owned()).or_default();
        s.active = Some(stream);
        s.wire_ids = wire_ids;
        s.conns.drain().map(|(_, h)| h).collect()
    }

    /// Source side: the next stream id for a service (1, 2, ... wrapping to 1 after
    /// i32::MAX), made active. Counters outlive resets so ids are not reused soon.
    pub fn open_stream(&mut self, service: &str, wire_ids: bool) -> i32 {
        let s = self.services.entry(service.to_owned()).or_default();
        s.last_stream = s.last_stream.checked_add(1).unwrap_or(1);
        s.active = Some(s.last_stream);
        s.wire_ids = wire_ids;
        s.last_stream
    }

    /// Whether the service's stream carries connection ids (V3): only such a stream takes
    /// CONNECTION_START.
    pub fn has_wire_ids(&self, service: &str) -> bool {
        self.services.get(service).is_none_or(|s| s.wire_ids)
    }

    /// The connection id to put on the wire for connection `key` of the service's stream:
    /// none (0) when its peer speaks V1/V2.
    pub fn wire_connection_id(&self, service: &str, key: u32) -> u32 {
        match self.services.get(service) {
            Some(s) if !s.wire_ids => 0,
            _ => key,
        }
    }

    /// Rule (issue: a stray stream's client must not hang): DATA for a stream that is not
    /// active is answered with one STREAM_RESET per stream, so the source closes the client
    /// it is still feeding; repeats are dropped silently. Memory is bounded.
    pub fn answer_stray_data(&mut self, service: &str, stream: i32) -> bool {
        if self.answered(service, stream) {
            return false;
        }
        self.reset_sent(service, stream);
        true
    }

    fn answered(&self, service: &str, stream: i32) -> bool {
        self.strays
            .iter()
            .any(|(s, id)| *id == stream && s == service)
    }

    /// Rule: a STREAM_START refused at the connection limit leaves no active stream, so
    /// what follows for it is answered as a stray, not silently dropped.
    pub fn refuse_start(&mut self, service: &str, stream: i32) {
        drop(self.reset_stream(service, stream));
    }

    /// A STREAM_RESET went out for this stream: DATA that follows it needs no other.
    pub fn reset_sent(&mut self, service: &str, stream: i32) {
        if self.answered(service, stream) {
            return;
        }
        if self.strays.len() >= STRAY_MEMORY {
            self.strays.pop_front();
        }
        self.strays.push_back((service.to_owned(), stream));
    }

    /// Source side: the next connection id for a service, never 0 (0 means "absent").
    pub fn next_connection_id(&mut self, service: &str) -> u32 {
        let s = self.services.entry(service.to_owned()).or_default();
        s.last_conn = s.last_conn.checked_add(1).unwrap_or(1);
        s.last_conn
    }

    pub fn insert(&mut self, service: &str, conn: u32, handle: H) {
        let s = self.services.entry(service.to_owned()).or_default();
        s.conns.insert(conn, handle);
    }

    pub fn get(&self, service: &str, conn: u32) -> Option<&H> {
        self.services.get(service)?.conns.get(&conn)
    }

    /// Every service with an active stream: (service, stream).
    pub fn active_streams(&self) -> impl Iterator<Item = (&str, i32)> {
        self.services
            .iter()
            .filter_map(|(s, ss)| ss.active.map(|a| (s.as_str(), a)))
    }

    /// Every connection: (service, connection, handle).
    pub fn connections(&self) -> impl Iterator<Item = (&str, u32, &H)> {
        self.services
            .iter()
            .flat_map(|(s, ss)| ss.conns.iter().map(move |(k, h)| (s.as_str(), *k, h)))
    }

    pub fn contains(&self, service: &str, conn: u32) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.conns.contains_key(&conn))
    }

    pub fn route(&mut self, service: &str, stream: i32, conn: u32) -> Route<'_, H> {
        match self.services.get_mut(service) {
            Some(s) if s.active == Some(stream) => match s.conns.get_mut(&conn) {
                Some(h) => Route::Deliver(h),
                None => Route::UnknownConnection,
            },
            _ => Route::StaleStream,
        }
    }

    /// STREAM_RESET: if `stream` is the active one, unset it and return all its connections;
    /// `None` (ignore) otherwise.
    pub fn reset_stream(&mut self, service: &str, stream: i32) -> Option<Vec<H>> {
        let s = self.services.get_mut(service)?;
        if s.active != Some(stream) {
            return None;
        }
        s.active = None;
        Some(s.conns.drain().map(|(_, h)| h).collect())
    }

    /// CONNECTION_RESET: the one connection, if stream and connection match; the stream
    /// stays active.
    pub fn reset_connection(&mut self, service: &str, stream: i32, conn: u32) -> Option<H> {
        let s = self.services.get_mut(service)?;
        if s.active != Some(stream) {
            return None;
        }
        s.conns.remove(&conn)
    }

    /// SESSION_RESET or session end: every connection of every service; ids keep counting.
    pub fn reset_all(&mut self) -> Vec<H> {
        self.services
            .values_mut()
            .flat_map(|s| {
                s.active = None;
                s.conns.drain().map(|(_, h)| h)
            })
            .collect()
    }

    /// Removes a connection only if `is_it` confirms it is the same one (not a successor
    /// that reused the id).
    pub fn remove_if(&mut self, service: &str, conn: u32, is_it: impl Fn(&H) -> bool) -> Option<H> {
        let s = self.services.get_mut(service)?;
        if !s.conns.get(&conn).is_some_and(is_it) {
            return None;
        }
        s.conns.remove(&conn)
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.services.values().map(|s| s.conns.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_for_a_stale_stream_or_unknown_connection_is_not_delivered() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 5, true);
        t.insert("SSH", 1, "conn1");
        assert!(matches!(t.route("SSH", 5, 1), Route::Deliver(&mut "conn1")));
        assert!(matches!(t.route("SSH", 4, 1), Route::StaleStream));
        assert!(matches!(t.route("SSH", 5, 2), Route::UnknownConnection));
        assert!(matches!(t.route("HTTP", 5, 1), Route::StaleStream));
    }

    #[test]
    fn a_new_stream_start_replaces_the_old_stream_and_its_connections() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 1, true);
        t.insert("SSH", 1, "a");
        t.insert("SSH", 2, "b");
        let mut closed = t.start_stream("SSH", 2, true);
        closed.sort();
        assert_eq!(closed, ["a", "b"]);
        assert_eq!(t.active_stream("SSH"), Some(2));
        assert_eq!(t.connection_count(), 0);
    }

    #[test]
    fn stream_reset_closes_every_connection_of_the_stream_only_if_it_matches() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 3, true);
        t.insert("SSH", 1, "a");
        t.insert("SSH", 2, "b");
        t.start_stream("HTTP", 1, true);
        t.insert("HTTP", 1, "h");
        assert!(t.reset_stream("SSH", 2).is_none());
        assert_eq!(t.reset_stream("SSH", 3).map(|v| v.len()), Some(2));
        assert_eq!(t.active_stream("SSH"), None);
        assert_eq!(t.connection_count(), 1);
    }

    #[test]
    fn connection_reset_closes_one_connection_and_keeps_the_stream() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 3, true);
        t.insert("SSH", 1, "a");
        t.insert("SSH", 2, "b");
        assert_eq!(t.reset_connection("SSH", 2, 1), None);
        assert_eq!(t.reset_connection("SSH", 3, 1), Some("a"));
        assert_eq!(t.active_stream("SSH"), Some(3));
        assert!(t.contains("SSH", 2));
    }

    #[test]
    fn session_reset_closes_everything_but_ids_keep_counting() {
        let mut t = StreamTable::default();
        assert_eq!(t.open_stream("SSH", true), 1);
        assert_eq!(t.next_connection_id("SSH"), 1);
        t.insert("SSH", 1, "a");
        t.open_stream("HTTP", true);
        t.insert("HTTP", 1, "h");
        assert_eq!(t.reset_all().len(), 2);
        assert_eq!(t.active_stream("SSH"), None);
        assert_eq!(t.open_stream("SSH", true), 2);
        assert_eq!(t.next_connection_id("SSH"), 2);
    }

    #[test]
    fn source_stream_ids_wrap_to_one() {
        let mut t: StreamTable<()> = StreamTable::default();
        t.services.entry("S".into()).or_default().last_stream = i32::MAX;
        assert_eq!(t.open_stream("S", true), 1);
        t.services.entry("S".into()).or_default().last_conn = u32::MAX;
        assert_eq!(t.next_connection_id("S"), 1);
    }

    #[test]
    fn remove_if_ignores_a_successor_with_the_same_id() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 1, true);
        t.insert("SSH", 1, 10u64);
        assert_eq!(t.remove_if("SSH", 1, |h| *h == 9), None);
        assert_eq!(t.remove_if("SSH", 1, |h| *h == 10), Some(10));
    }

    #[test]
    fn data_for_an_inactive_stream_is_answered_with_one_stream_reset() {
        let mut t: StreamTable<()> = StreamTable::default();
        assert!(t.answer_stray_data("SSH", 7));
        assert!(!t.answer_stray_data("SSH", 7), "once per stream");
        assert!(t.answer_stray_data("SSH", 8));
        assert!(t.answer_stray_data("HTTP", 7));
        // Bounded: a flood of stray streams forgets the oldest.
        for id in 100..100 + STRAY_MEMORY as i32 {
            t.answer_stray_data("X", id);
        }
        assert_eq!(t.strays.len(), STRAY_MEMORY);
        assert!(t.answer_stray_data("SSH", 7));
    }

    #[test]
    fn a_v1_v2_stream_puts_no_connection_id_on_the_wire() {
        let mut t: StreamTable<()> = StreamTable::default();
        t.start_stream("SSH", 1, false);
        assert_eq!(t.wire_connection_id("SSH", 1), 0);
        t.start_stream("SSH", 2, true);
        assert_eq!(t.wire_connection_id("SSH", 1), 1);
    }

    #[test]
    fn only_a_v3_stream_takes_connection_start() {
        let mut t: StreamTable<()> = StreamTable::default();
        assert!(
            t.has_wire_ids("SSH"),
            "a service with no stream yet: V3 until told"
        );
        t.start_stream("SSH", 1, false);
        assert!(!t.has_wire_ids("SSH"));
        t.start_stream("SSH", 2, true);
        assert!(t.has_wire_ids("SSH"));
    }

    #[test]
    fn the_table_finds_each_connection_by_service_and_id() {
        let mut t = StreamTable::default();
        t.start_stream("SSH", 1, true);
        t.insert("SSH", 3, 30u64);
        t.start_stream("HTTP", 1, true);
        t.insert("HTTP", 3, 40u64);
        assert_eq!(t.get("SSH", 3), Some(&30));
        assert_eq!(t.get("SSH", 4), None);
        assert!(t.contains("HTTP", 3));
        assert!(!t.contains("HTTP", 4) && !t.contains("RDP", 3));
        let mut all: Vec<(&str, u32, u64)> = t.connections().map(|(s, c, h)| (s, c, *h)).collect();
        all.sort();
        assert_eq!(all, [("HTTP", 3, 40), ("SSH", 3, 30)]);
    }

    #[test]
    fn a_stream_refused_at_the_connection_limit_is_not_left_active() {
        let mut t: StreamTable<()> = StreamTable::default();
        t.start_stream("SSH", 4, true);
        t.refuse_start("SSH", 4);
        assert_eq!(t.active_stream("SSH"), None);
        assert!(matches!(t.route("SSH", 4, 1), Route::StaleStream));
    }
}
