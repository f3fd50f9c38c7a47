//! One host connection to the target, what it is bound to, and how its transport carries
//! responses and data: the fabrics layer above calls the same operations whether the
//! connection is a TCP stream of PDUs or an RDMA queue pair.

use std::net::SocketAddr;

use nvme_spec::{Completion, Submission};
#[cfg(feature = "rdma")]
use zerocopy::IntoBytes;

use crate::pdu::Pdu;
use crate::stream::PduStream;

use super::discovery::DiscoveryController;
use super::local_host::LocalHost;

/// Where a connection is in its life (TCP transport 1.0 §3.3, base 2.0 §6.3).
#[derive(Debug)]
pub(super) enum Role {
    /// Waiting for ICReq (TCP only: an RDMA queue is set up by RDMA CM).
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

/// The transport under a connection.
pub(super) enum Link {
    Tcp(PduStream),
    #[cfg(feature = "rdma")]
    Rdma(Box<crate::rdma::link::RdmaLink>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(s) => write!(f, "tcp {}", s.peer()),
            #[cfg(feature = "rdma")]
            Self::Rdma(l) => write!(f, "{l:?}"),
        }
    }
}

/// A connection.
#[derive(Debug)]
pub(super) struct Conn {
    pub link: Link,
    pub role: Role,
    pub local: SocketAddr,
    pub hostnqn: String,
    /// When it was accepted (set-up timeout).
    pub since: std::time::Instant,
}

impl Conn {
    /// The TCP stream, if this is a TCP connection.
    #[cfg_attr(not(feature = "rdma"), allow(clippy::unnecessary_wraps))]
    pub fn tcp(&mut self) -> Option<&mut PduStream> {
        match &mut self.link {
            Link::Tcp(s) => Some(s),
            #[cfg(feature = "rdma")]
            Link::Rdma(_) => None,
        }
    }

    /// Whether commands name their data with Keyed SGLs (RDMA) rather than transport data
    /// blocks (TCP).
    pub fn keyed(&self) -> bool {
        !matches!(self.link, Link::Tcp(_))
    }

    pub fn peer(&self) -> String {
        match &self.link {
            Link::Tcp(s) => s.peer().clone(),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.peer().to_string(),
        }
    }

    /// Send a response capsule.
    pub fn respond(&mut self, cqe: &Completion) {
        match &mut self.link {
            Link::Tcp(s) => {
                let neg = s.neg;
                s.tx.push(&Pdu::CapsuleResp { cqe: *cqe }, &neg);
            }
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.respond(cqe.as_bytes(), None),
        }
    }

    /// Send the response `cqe` to command `sqe` (over RDMA invalidating the host's key when
    /// the command asked for it).
    #[cfg_attr(not(feature = "rdma"), allow(unused_variables))]
    pub fn respond_to(&mut self, sqe: &Submission, cqe: &Completion) {
        match &mut self.link {
            Link::Tcp(_) => self.respond(cqe),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.respond(cqe.as_bytes(), crate::rdma::sgl::invalidate_key(sqe)),
        }
    }

    /// Send `data` to the host for command `sqe` (data with no command slot: discovery).
    pub fn send_data(&mut self, sqe: &Submission, data: &[u8]) {
        match &mut self.link {
            Link::Tcp(s) => push_c2h(s, sqe.cid.get(), data),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => {
                let (addr, len, key) = crate::rdma::sgl::keyed(sqe);
                l.write_staged(&data[..data.len().min(len)], addr, key);
            }
        }
    }

    /// Send the first `len` bytes of `slot`'s buffer (queue `qid` of `host`) to the host for
    /// command `sqe`, then the response `cqe`. True when the slot must stay taken until the
    /// transport says they went out (RDMA: the adapter reads the buffer after this call).
    #[allow(clippy::too_many_arguments)]
    pub fn send_slot_data_and_respond(
        &mut self,
        sqe: &Submission,
        cqe: &Completion,
        host: &LocalHost,
        qid: u16,
        slot: u16,
        len: usize,
        #[cfg(feature = "rdma")] region: Option<&crate::rdma::verbs::Region>,
    ) -> bool {
        match &mut self.link {
            Link::Tcp(s) => {
                push_c2h_from_slot(s, sqe.cid.get(), host, qid, slot, len);
                let neg = s.neg;
                s.tx.push(&Pdu::CapsuleResp { cqe: *cqe }, &neg);
                false
            }
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => {
                let (addr, _, key) = crate::rdma::sgl::keyed(sqe);
                let invalidate = crate::rdma::sgl::invalidate_key(sqe).is_some();
                let Some(r) = region else {
                    l.respond(cqe.as_bytes(), crate::rdma::sgl::invalidate_key(sqe));
                    return false;
                };
                let at = host.slot_offset(qid, slot);
                l.write_then_respond(r, at, len, (addr, key), cqe.as_bytes(), slot, invalidate);
                true
            }
        }
    }

    /// Push out what is queued (TCP); RDMA posts at once.
    pub fn flush(&mut self) -> Result<(), String> {
        match &mut self.link {
            Link::Tcp(s) => s.flush().map_err(|e| e.to_string()),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.failed().map_or(Ok(()), |e| Err(e.to_string())),
        }
    }

    /// Bytes queued and not yet sent.
    pub fn pending(&self) -> usize {
        match &self.link {
            Link::Tcp(s) => s.tx.pending(),
            #[cfg(feature = "rdma")]
            Link::Rdma(_) => 0,
        }
    }

    /// End the connection after a fatal transport error from the host: TCP sends a
    /// C2HTermReq with `fes`/`fei`; RDMA has no such message and disconnects.
    pub fn terminate(&mut self, fes: u16, fei: u32) {
        match &mut self.link {
            Link::Tcp(s) => s.terminate(fes, fei, true),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.disconnect(),
        }
    }

    pub fn shutdown(&mut self) {
        match &mut self.link {
            Link::Tcp(s) => s.shutdown(),
            #[cfg(feature = "rdma")]
            Link::Rdma(l) => l.disconnect(),
        }
    }
}

/// Queue a C2HData PDU with `data` for command `cid` on `stream` (LAST set).
pub(super) fn push_c2h(stream: &mut PduStream, cid: u16, data: &[u8]) {
    let neg = stream.neg;
    stream.tx.push(
        &Pdu::C2HData {
            cccid: cid,
            offset: 0,
            data,
            last: true,
            success: false,
        },
        &neg,
    );
}

/// Queue a C2HData PDU for command `cid` on `stream` (LAST set) with the first `len` bytes
/// of `slot` of queue `qid` of `host`, copied straight into the send buffer.
fn push_c2h_from_slot(
    stream: &mut PduStream,
    cid: u16,
    host: &LocalHost,
    qid: u16,
    slot: u16,
    len: usize,
) {
    let neg = stream.neg;
    let out = stream.tx.out();
    let c2h = Pdu::C2HData {
        cccid: cid,
        offset: 0,
        data: &[],
        last: true,
        success: false,
    };
    let dd = crate::pdu::encode_header(&c2h, len, &neg, out);
    let start = out.len();
    out.resize(start + len, 0);
    host.read_slot(qid, slot, &mut out[start..]);
    if dd {
        let c = crate::pdu::data_digest([&out[start..]]);
        out.extend_from_slice(&c.to_le_bytes());
    }
}
