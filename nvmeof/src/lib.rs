//! NVMe over Fabrics on the TCP transport (NVMe/TCP 1.0).
//!
//! - `pdu.rs`: decoding and validating PDUs from the network (every field untrusted: a
//!   malformed PDU gives the fatal error status and field offset a termination request
//!   carries) and encoding our own, header and data digests included.
//!
//! The initiator backend and the target build on this codec (not yet: see the crate's
//! issue).

pub mod pdu;

pub use pdu::{Direction, Negotiated, Pdu, PduError};
