//! Backpressure toward local sockets: a payload is written through or queued within the
//! budget, a consumer that cannot keep up stalls the websocket reader for `stall_timeout`
//! at most, and then its stream is reset (`stalled`), never buffered without bound.

use super::*;

/// Rule (stalled consumer): a consumer holding bytes that wrote less than one full payload
/// in a `stall_timeout` window is stalled, even if it trickles: it would hold the whole
/// tunnel (every stream waits behind it) for as long as it pleases.
pub fn stalled(written_before: u64, written_now: u64) -> bool {
    written_now.saturating_sub(written_before) < crate::protocol::MAX_PAYLOAD as u64
}

impl Session<'_> {
    /// Backpressure policy: a full connection queue, or a spent byte budget, pauses the
    /// websocket reader (and so the whole tunnel) for at most `stall_timeout`, counted once
    /// the connection is up. Then connections whose local consumer made no progress are
    /// reset, so the others go on.
    pub(super) async fn on_data(&mut self, msg: Message, cancel: &CancellationToken) {
        let (service, stream) = (msg.service_id, msg.stream_id);
        let key = connection_key(msg.connection_id);
        let handle = match self.table.route(&service, stream, key) {
            Route::Deliver(h) => h,
            Route::StaleStream => {
                if self.table.answer_stray_data(&service, stream) {
                    debug!(service = ?service, stream, "DATA for a stream that is not active: resetting it");
                    self.send(Message::stream_reset(stream, &service));
                }
                return;
            }
            Route::UnknownConnection => {
                debug!(service = ?service, stream, conn = key, "no such connection: dropping DATA");
                return;
            }
        };
        self.stats
            .bytes_from_tunnel
            .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
        // Only a copy of what the socket did not take outlives the websocket message.
        let Some(payload) = handle.down().deliver(msg.payload) else {
            return;
        };
        let (payload, waiting) = match self.budget.try_acquire(payload.len() as u32) {
            Some(permit) => match handle.down().try_queue((payload, permit), self.stats) {
                Ok(()) => return,
                // The task is ending; its exit is handled in `on_conn_exit`.
                Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full((payload, permit))) => (payload, Some(permit)),
            },
            None => (payload, None),
        };
        self.stall(payload, waiting, &service, stream, key, cancel)
            .await;
    }

    /// Waits for a queue slot and budget for one payload; see `on_data`. The websocket is
    /// not read meanwhile. After each `stall_timeout` without room, every connected
    /// connection that holds bytes and is `stalled` is reset (this one included); this one
    /// is also reset if it did not connect within one connect attempt. A consumer that
    /// keeps writing at least a payload per window is waited for: that is backpressure.
    pub(super) async fn stall(
        &mut self,
        payload: Bytes,
        mut permit: Option<crate::bridge::BudgetPermit>,
        service: &str,
        stream: i32,
        key: u32,
        cancel: &CancellationToken,
    ) {
        self.stats.stalls.fetch_add(1, Ordering::Relaxed);
        let len = payload.len();
        let stall = self.limits.stall_timeout;
        // Data queued for a connection still connecting waits for one connect attempt.
        let connect_limit = self.limits.connect_timeout.saturating_add(stall);
        // A revoke of site consent must not wait for the consumer.
        let mut consent = self.consent_gate();
        loop {
            let Some(handle) = self.table.get(service, key) else {
                return;
            };
            let (down, id) = (handle.down().clone(), handle.id());
            let before = self.progress_snapshot();
            let budget = self.budget.clone();
            let acquire = async {
                let permit = match permit.take() {
                    Some(p) => p,
                    None => budget.acquire(len as u32).await?,
                };
                let slot = down.reserve().await?;
                Some((slot, permit))
            };
            let deadline = stall_window(handle.connected(), connect_limit, stall);
            let waited = tokio::select! {
                _ = cancel.cancelled() => return,
                // The task ended (its exit is handled in `on_conn_exit`): nothing to wait for.
                _ = down.closed() => return,
                r = acquire => Some(r),
                _ = deadline => None,
                () = consent.changed() => {
                    // Revoked: its connection is gone and the loop returns; else wait on.
                    self.on_consent(&consent);
                    continue;
                }
            };
            match waited {
                Some(Some((slot, permit))) => {
                    slot.send((payload, permit), self.stats);
                    return;
                }
                Some(None) => return,
                None => {
                    if !self.after_window(&before, service, stream, key, id) {
                        return;
                    }
                }
            }
        }
    }

    /// A stall window passed without room: the idle holders are reset; `true` when this
    /// connection is still there and up, so it is waited for again (it wrote, or others
    /// freed the budget; a queue permit is re-acquired).
    fn after_window(
        &mut self,
        before: &[(String, u32, u64, u64)],
        service: &str,
        stream: i32,
        key: u32,
        id: u64,
    ) -> bool {
        self.reset_idle_holders(before);
        let Some(up) = self
            .table
            .get(service, key)
            .filter(|h| h.id() == id)
            .map(ConnHandle::is_connected)
        else {
            return false;
        };
        if !up {
            self.reset_stalled(service, stream, key, id);
        }
        up
    }

    /// Under budget pressure (`Budget::scarce`), resets the connected holders that wrote
    /// nothing since the previous sweep: the budget is shared with other tunnels, whose
    /// readers would otherwise wait on consumers only this session can reset. Called every
    /// `stall_timeout`.
    pub fn sweep(&mut self) {
        let before = std::mem::take(&mut self.swept);
        if self.budget.shared.scarce() {
            self.reset_idle_holders(&before);
        }
        self.swept = self.progress_snapshot();
    }

    /// (service, connection, task id, bytes written so far) of every connected connection
    /// holding bytes: who made progress while the reader waited.
    pub(super) fn progress_snapshot(&self) -> Vec<(String, u32, u64, u64)> {
        self.table
            .connections()
            .filter(|(_, _, h)| h.down().queued() > 0 && h.is_connected())
            .map(|(s, k, h)| (s.to_owned(), k, h.id(), h.down().written()))
            .collect()
    }

    /// Resets the connections of `before` that still hold bytes and wrote none since.
    pub(super) fn reset_idle_holders(&mut self, before: &[(String, u32, u64, u64)]) -> usize {
        let mut reset = 0;
        for (service, key, id, written) in before {
            let idle = self.table.get(service, *key).is_some_and(|h| {
                h.id() == *id && stalled(*written, h.down().written()) && h.down().queued() > 0
            });
            if idle {
                let stream = self.table.active_stream(service).unwrap_or(0);
                self.reset_stalled(service, stream, *key, *id);
                reset += 1;
            }
        }
        reset
    }

    pub(super) fn reset_stalled(&mut self, service: &str, stream: i32, key: u32, id: u64) {
        let wire = self.table.wire_connection_id(service, key);
        let Some(handle) = self.table.remove_if(service, key, |h| h.id() == id) else {
            return;
        };
        handle.reset(End::Stall);
        self.stats.stall_resets.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.stats.logs.admit(Kind::Stall) {
            warn!(
                service = ?service, stream, conn = key, suppressed,
                "local consumer stopped reading for {:?}: resetting this connection to keep the tunnel moving",
                self.limits.stall_timeout
            );
        }
        if wire == 0 {
            close_all(
                self.table.reset_stream(service, stream).unwrap_or_default(),
                End::Stall,
            );
        }
        self.send(protocol::reset_on_local_close(stream, service, wire));
    }
}

/// Rule (stall window): a connection still connecting is not a stalled consumer, unless it
/// takes longer than any connect could (`connect_limit`); once up, it has `stall` to make
/// room. Pending for ever once its task ended (the room's wait then fails at once).
async fn stall_window(
    mut connected: tokio::sync::watch::Receiver<bool>,
    connect_limit: std::time::Duration,
    stall: std::time::Duration,
) {
    let up = tokio::time::timeout(connect_limit, async {
        connected.wait_for(|up| *up).await.is_ok()
    })
    .await;
    match up {
        Ok(true) => tokio::time::sleep(stall).await,
        Ok(false) => std::future::pending().await,
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_writing_less_than_a_payload_per_window_is_stalled() {
        assert!(stalled(1000, 1000));
        assert!(stalled(1000, 1000 + 64511));
        assert!(!stalled(1000, 1000 + 64512));
        assert!(stalled(5, 0), "a counter that went back is no progress");
    }
}
