//! What a controller keeps between commands that its admin commands read and change:
//! asynchronous events, feature values, the error log and SMART counters, the Changed
//! Namespace List. Plain data with no knowledge of the controller, so the controller and
//! the admin handlers (`admin/`) both build on it without depending on each other.

pub mod async_events;
pub mod changed_namespaces;
pub mod features;
pub mod logs;
