//! One QoS 1 publish at a time, as the shadow and the audit topic publish: its packet id
//! once rumqttc sent it, and the refusal rule (`shadow::Refusals`: AWS IoT closes the
//! connection of a client that publishes where its policy does not allow).

use crate::shadow::Refusals;

#[derive(Debug, Default)]
pub(super) struct InFlight {
    /// Queued in the client, its packet id not known yet.
    queued: bool,
    /// Its packet id once sent.
    pkid: Option<u16>,
    refusals: Refusals,
}

impl InFlight {
    /// Handed to the client.
    pub(super) fn queued(&mut self) {
        self.queued = true;
    }

    /// One is queued or unacknowledged: the next waits.
    pub(super) fn busy(&self) -> bool {
        self.queued || self.pkid.is_some()
    }

    /// The queued one went out as packet `pkid`.
    pub(super) fn sent(&mut self, pkid: u16) {
        if std::mem::take(&mut self.queued) {
            self.pkid = Some(pkid);
        }
    }

    /// A PUBACK; `true` when it was for ours.
    pub(super) fn acked(&mut self, pkid: u16) -> bool {
        if self.pkid != Some(pkid) {
            return false;
        }
        self.pkid = None;
        self.refusals.acked();
        true
    }

    /// The connection ended, with ours unacknowledged or not; `true` once the policy
    /// plainly refuses the topic (`shadow::REFUSALS` such ends in a row).
    pub(super) fn refused_at_end(&mut self) -> bool {
        let unacked = self.pkid.take().is_some() || std::mem::take(&mut self.queued);
        self.refusals.connection_ended(unacked)
    }
}
