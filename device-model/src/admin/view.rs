//! What the admin commands that only report (Identify, parts of Get Log Page) read of a
//! controller: its configuration and its attached namespaces, nothing they could change.

use crate::controller::ControllerConfig;
use crate::namespace::{self, Namespace};

/// A read-only view of one controller for the reporting admin commands.
#[derive(Clone, Copy)]
pub(crate) struct ControllerView<'a> {
    pub cfg: &'a ControllerConfig,
    /// Attached namespaces, sorted by NSID.
    pub namespaces: &'a [Namespace],
}

impl ControllerView<'_> {
    /// The attached namespace with `nsid`, if any.
    pub(crate) fn namespace_index(&self, nsid: u32) -> Option<usize> {
        namespace::index_of(self.namespaces, nsid)
    }

    /// Identify NN: the subsystem's highest NSID, attached here or not.
    pub(crate) fn nn(&self) -> u32 {
        let own = self.namespaces.last().map_or(0, |n| n.nsid);
        self.cfg
            .subsystem
            .as_ref()
            .map_or(own, |s| s.max_nsid().max(own))
    }

    /// True when `nsid` is a valid NSID this controller does not have attached: Identify
    /// returns zeroes for it (an inactive namespace).
    pub(crate) fn is_inactive(&self, nsid: u32) -> bool {
        nsid != 0 && nsid != u32::MAX && nsid <= self.nn()
    }
}
