//! Asynchronous events (NVMe base 2.0 §5.2): the requests the host parks, the events
//! waiting for one, and the event types held back until their log page is read. The
//! Asynchronous Event Request command is in `admin/async_event.rs`.

use std::collections::VecDeque;

use nvme_spec::log_page::lid;

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
    pub(crate) slots: Vec<u16>,
    pub(crate) queued: VecDeque<AsyncEvent>,
    /// Bit per event type: reported, its log page not yet read.
    pub(crate) masked: u8,
}

impl AsyncEvents {
    /// Events waiting for a request (for tests and diagnostics).
    pub(crate) fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Log page `log_page` was read: with RAE (Retain Asynchronous Event) clear, events of
    /// the matching type may be reported again (§5.2).
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
        self.masked &= !(1 << t);
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
