//! Asynchronous Event Request (NVMe base 2.0 §5.2): the host parks up to AERL + 1 commands,
//! the controller completes one per event. After an event is reported, further events of its
//! type are held back until the host reads the associated log page with RAE cleared.

use std::collections::VecDeque;

use nvme_spec::Status;
use nvme_spec::log_page::lid;

use crate::controller::{Controller, Outcome};
use crate::memory::MemoryMap;
use crate::stats::ControllerStats;

/// Outstanding Asynchronous Event Requests allowed (Identify AERL is 0's based).
pub(crate) const AER_LIMIT: usize = 4;

/// Asynchronous Event Type (§5.2.1, completion dword 0 bits 2:0).
pub mod event_type {
    pub const ERROR: u8 = 0;
    pub const SMART: u8 = 1;
    pub const NOTICE: u8 = 2;
}

/// Asynchronous Event Information for the Error status type (§5.2.1, Figure 147).
pub mod error_info {
    pub const INVALID_DOORBELL_REGISTER: u8 = 0x00;
    pub const INVALID_DOORBELL_VALUE: u8 = 0x01;
    pub const PERSISTENT_INTERNAL_ERROR: u8 = 0x03;
}

/// Asynchronous Event Information for the SMART / Health status type (§5.2.1).
pub mod smart_info {
    pub const RELIABILITY: u8 = 0x00;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x01;
    pub const SPARE_BELOW_THRESHOLD: u8 = 0x02;
}

/// One event: type, information and the log page that clears it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    pub event_type: u8,
    pub info: u8,
    pub log_page: u8,
}

impl AsyncEvent {
    /// Completion dword 0 (§5.2.1).
    pub fn dword0(self) -> u32 {
        u32::from(self.event_type & 7)
            | (u32::from(self.info) << 8)
            | (u32::from(self.log_page) << 16)
    }
}

/// Parked requests, events waiting for one, and the types held back until their log is read.
#[derive(Debug, Default)]
pub(crate) struct AsyncEvents {
    /// Admin SQ slots holding outstanding requests.
    slots: Vec<u16>,
    queued: VecDeque<AsyncEvent>,
    /// Bit per event type: reported, its log page not yet read.
    masked: u8,
}

impl AsyncEvents {
    /// Events waiting for a request (for tests and diagnostics).
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }
}

impl Controller {
    /// Asynchronous Event Request: complete at once if an event waits, else park the command.
    pub(crate) fn async_event_request(&mut self, slot: u16) -> Outcome {
        if self.events.slots.len() >= AER_LIMIT {
            return Outcome::status(Status::ASYNC_EVENT_LIMIT_EXCEEDED);
        }
        if let Some(ev) = self.next_event() {
            return Outcome::Done(Status::SUCCESS, ev.dword0());
        }
        self.events.slots.push(slot);
        Outcome::Pending
    }

    /// Report `ev` now if a request is parked, else keep it for the next one. Events of a
    /// type whose last report was not yet acknowledged (log page read) are dropped (§5.2).
    pub(crate) fn raise_event(&mut self, ev: AsyncEvent, mem: &MemoryMap) {
        let bit = 1u8 << (ev.event_type & 7);
        if self.events.masked & bit != 0 || self.events.queued.contains(&ev) {
            log::debug!("{}: async event {ev:?} held back", self.cfg.serial);
            return;
        }
        log::info!("{}: async event {ev:?}", self.cfg.serial);
        ControllerStats::bump(&self.stats.async_events);
        self.events.queued.push_back(ev);
        while !self.events.slots.is_empty() {
            let Some(ev) = self.next_event() else { break };
            let slot = self.events.slots.remove(0);
            self.complete(0, slot, Status::SUCCESS, ev.dword0(), mem);
        }
    }

    fn next_event(&mut self) -> Option<AsyncEvent> {
        let ev = self.events.queued.pop_front()?;
        self.events.masked |= 1 << (ev.event_type & 7);
        Some(ev)
    }

    /// A log page was read: with RAE (Retain Asynchronous Event) clear, events of the
    /// matching type may be reported again.
    pub(crate) fn log_page_read(&mut self, log_page: u8, retain: bool) {
        if retain {
            return;
        }
        let t = match log_page {
            lid::ERROR_INFORMATION => event_type::ERROR,
            lid::SMART_HEALTH => event_type::SMART,
            lid::CHANGED_NS_LIST => event_type::NOTICE,
            _ => return,
        };
        self.events.masked &= !(1 << t);
    }

    /// Drop parked requests (controller reset: the admin queue is gone).
    pub(crate) fn reset_events(&mut self) {
        self.events = AsyncEvents::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dword0_layout() {
        let ev = AsyncEvent {
            event_type: event_type::ERROR,
            info: error_info::INVALID_DOORBELL_VALUE,
            log_page: lid::ERROR_INFORMATION,
        };
        assert_eq!(ev.dword0(), 0x0001_0100);
    }
}
