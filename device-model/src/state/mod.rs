//! What a controller keeps between commands that its admin commands read and change:
//! asynchronous events, feature values, the error log and SMART counters, the Changed
//! Namespace List. Plain data with no knowledge of the controller, so the controller and
//! the admin handlers (`admin/`) both build on it without depending on each other.

pub mod async_events;
pub mod changed_namespaces;
pub mod features;
pub mod logs;

use std::time::Instant;

use async_events::AsyncEvents;
use changed_namespaces::ChangedNamespaces;
use features::Features;
use logs::{ErrorLog, SmartCounters};

/// A controller's admin state, in one place: what its admin handlers change.
#[derive(Debug)]
pub(crate) struct AdminState {
    pub(crate) features: Features,
    pub(crate) events: AsyncEvents,
    pub(crate) errors: ErrorLog,
    /// Namespaces attached or detached since the host last read log page 04h.
    pub(crate) changed_ns: ChangedNamespaces,
    pub(crate) smart: SmartCounters,
    /// Start of the current Keep Alive period (None: starts at the next check).
    pub(crate) keep_alive_since: Option<Instant>,
    /// A thin namespace's pool is over its warning threshold: its free percent (reported
    /// as Available Spare, below the threshold; an event was raised when it started).
    pub(crate) pool_warning: Option<u8>,
}

impl AdminState {
    /// The power-on state with `features`.
    pub(crate) fn new(features: Features) -> Self {
        Self {
            features,
            events: AsyncEvents::default(),
            errors: ErrorLog::default(),
            changed_ns: ChangedNamespaces::default(),
            smart: SmartCounters::default(),
            keep_alive_since: None,
            pool_warning: None,
        }
    }
}
