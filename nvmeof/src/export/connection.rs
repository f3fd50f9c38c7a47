//! One host connection to the target and what it is bound to.

use std::net::SocketAddr;

use crate::stream::PduStream;

use super::discovery::DiscoveryController;

/// Where a connection is in its life (TCP transport 1.0 §3.3, base 2.0 §6.3).
#[derive(Debug)]
pub(super) enum Role {
    /// Waiting for ICReq.
    Initializing,
    /// Initialized; the first command must be a Fabrics Connect.
    AwaitingConnect,
    /// The admin queue of a discovery controller.
    Discovery(DiscoveryController),
    /// Queue `qid` of the association with export `export`.
    Queue { export: usize, qid: u16 },
    /// Connect for an I/O queue is being completed (queues being created).
    Connecting { export: usize },
}

/// A connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub stream: PduStream,
    pub role: Role,
    pub local: SocketAddr,
    pub hostnqn: String,
    /// When it was accepted (set-up timeout).
    pub since: std::time::Instant,
}
