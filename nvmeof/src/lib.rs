//! NVMe over Fabrics: one fabrics layer over two transports, TCP (NVMe/TCP 1.0) and RDMA
//! (NVMe/RDMA 1.0, cargo feature `rdma`, on by default).
//!
//! - `pdu.rs`: decoding and validating PDUs from the network (every field untrusted: a
//!   malformed PDU gives the fatal error status and field offset a termination request
//!   carries) and encoding our own, header and data digests included;
//! - `stream.rs`: a non-blocking connection framing PDUs;
//! - `initiator/`: the host side, a namespace backend on a remote namespace;
//! - `export/`: exporting emulated controllers, with a discovery controller, over TCP and
//!   RDMA;
//! - `rdma/`: what is RDMA's own: verbs bindings, CM records, keyed SGLs, connections.

#![deny(unsafe_code)] // unsafe only in the modules marked `allow(unsafe_code)` below

pub mod export;
pub mod initiator;
pub mod pdu;
pub mod rdma;
pub mod stream;

pub use pdu::{Direction, Negotiated, Pdu, PduError};
