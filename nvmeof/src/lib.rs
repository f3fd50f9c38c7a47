//! NVMe over Fabrics on the TCP transport (NVMe/TCP 1.0).
//!
//! - `pdu.rs`: decoding and validating PDUs from the network (every field untrusted: a
//!   malformed PDU gives the fatal error status and field offset a termination request
//!   carries) and encoding our own, header and data digests included;
//! - `stream.rs`: a non-blocking connection framing PDUs;
//! - `initiator/`: the host side, a namespace backend on a remote namespace;
//! - `target/`: exporting emulated controllers, with a discovery controller.

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod export;
pub mod initiator;
pub mod pdu;
pub mod stream;

pub use pdu::{Direction, Negotiated, Pdu, PduError};
