//! The Changed Namespace List (NVMe base 2.0 §5.16.1.5): NSIDs whose attachment changed
//! since the host last read log page 04h, and the Namespace Attribute Changed event that
//! announces them (§5.2, notice 00h).

use nvme_spec::log_page::lid;

use crate::state::async_events::{AsyncEvent, event_type};

/// Entries the Changed Namespace List holds; more changes turn it into FFFFFFFFh (§5.16.1.5).
pub(crate) const CHANGED_LIST_MAX: usize = 1024;

/// Asynchronous Event Configuration bit 8: Namespace Attribute Notices (§5.27.1.7).
pub(crate) const NS_ATTRIBUTE_NOTICES: u32 = 1 << 8;

/// Namespace Attribute Changed (notice type, information 00h, log page 04h).
pub(crate) const NS_ATTRIBUTE_CHANGED: AsyncEvent = AsyncEvent {
    event_type: event_type::NOTICE,
    info: 0x00,
    log_page: lid::CHANGED_NS_LIST,
};

/// NSIDs whose attachment changed since the host last read log page 04h.
#[derive(Debug, Default)]
pub(crate) struct ChangedNamespaces {
    pub(crate) nsids: Vec<u32>,
    pub(crate) overflow: bool,
}

impl ChangedNamespaces {
    pub(crate) fn record(&mut self, nsid: u32) {
        if self.overflow || self.nsids.contains(&nsid) {
            return;
        }
        if self.nsids.len() == CHANGED_LIST_MAX {
            self.overflow = true;
            self.nsids.clear();
            return;
        }
        self.nsids.push(nsid);
        self.nsids.sort_unstable();
    }

    /// The log page; cleared unless `retain`.
    pub(crate) fn page(&mut self, retain: bool) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        if self.overflow {
            page[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        } else {
            for (i, n) in self.nsids.iter().enumerate() {
                page[i * 4..i * 4 + 4].copy_from_slice(&n.to_le_bytes());
            }
        }
        if !retain {
            *self = Self::default();
        }
        page
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_list_is_sorted_deduplicated_cleared_and_overflows() {
        let mut c = ChangedNamespaces::default();
        c.record(3);
        c.record(1);
        c.record(3);
        let p = c.page(true);
        assert_eq!(&p[..12], &[1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        let p = c.page(false);
        assert_eq!(p[0], 1);
        assert!(c.page(false).iter().all(|&b| b == 0));
        for n in 1..=1025 {
            c.record(n);
        }
        assert_eq!(&c.page(false)[..8], &[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    }
}
