//! Asynchronous Event Request (NVMe base 2.0 §5.2): the host parks up to AERL + 1 commands,
//! the controller completes one per event. After an event is reported, further events of its
//! type are held back until the host reads the associated log page with RAE cleared.

use nvme_spec::Status;

use crate::controller::{Controller, Outcome};
use crate::memory::MemoryMap;
use crate::state::async_events::{AER_LIMIT, AsyncEvent, AsyncEvents};
use crate::stats::ControllerStats;

impl Controller {
    /// Asynchronous Event Request: complete at once if an event waits, else park the command.
    pub(crate) fn async_event_request(&mut self, slot: u16) -> Outcome {
        if self.admin.events.slots.len() >= AER_LIMIT {
            return Outcome::status(Status::ASYNC_EVENT_LIMIT_EXCEEDED);
        }
        if let Some(ev) = self.next_event() {
            return Outcome::Done(Status::SUCCESS, ev.dword0());
        }
        self.admin.events.slots.push(slot);
        Outcome::Pending
    }

    /// Report `ev` now if a request is parked, else keep it for the next one. Events of a
    /// type whose last report was not yet acknowledged (log page read) are dropped (§5.2).
    pub(crate) fn raise_event(&mut self, ev: AsyncEvent, mem: &MemoryMap) {
        let bit = 1u8 << (ev.event_type & 7);
        if self.admin.events.masked & bit != 0 || self.admin.events.queued.contains(&ev) {
            log::debug!("{}: async event {ev:?} held back", self.cfg.serial);
            return;
        }
        log::info!("{}: async event {ev:?}", self.cfg.serial);
        ControllerStats::bump(&self.stats.async_events);
        self.admin.events.queued.push_back(ev);
        self.events_unsaved = true;
        while !self.admin.events.slots.is_empty() {
            let Some(ev) = self.next_event() else { break };
            let slot = self.admin.events.slots.remove(0);
            self.complete(0, slot, Status::SUCCESS, ev.dword0(), mem);
        }
    }

    fn next_event(&mut self) -> Option<AsyncEvent> {
        let ev = self.admin.events.queued.pop_front()?;
        self.admin.events.masked |= 1 << (ev.event_type & 7);
        Some(ev)
    }

    /// Drop parked requests (controller reset: the admin queue is gone).
    pub(crate) fn reset_events(&mut self) {
        self.admin.events = AsyncEvents::default();
    }
}
