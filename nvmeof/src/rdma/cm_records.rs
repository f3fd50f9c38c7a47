//! The private data NVMe/RDMA puts in RDMA CM messages (NVMe/RDMA transport 1.0 §3.2,
//! Figures 2-4): the host's request names the queue and its sizes, the target's accept its
//! receive queue size, a reject why. Decoded from untrusted bytes, checked field by field.

/// Record format this transport speaks (RECFMT 0).
pub const RECFMT: u16 = 0;

/// Why a connect request is refused (CM reject record STS, §3.2 Figure 4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum RejectStatus {
    InvalidLength = 0x01,
    InvalidRecfmt = 0x02,
    InvalidQid = 0x03,
    InvalidHsqsize = 0x04,
    InvalidHrqsize = 0x05,
    NoResources = 0x06,
}

/// The host's RDMA CM connect request private data (32 bytes; Figure 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Queue ID the Fabrics Connect on this connection will name.
    pub qid: u16,
    /// Host receive queue size (entries; responses the host can take at once).
    pub hrqsize: u16,
    /// Host send queue size, 0's based (commands the host may have outstanding, less one).
    pub hsqsize: u16,
}

impl ConnectRequest {
    /// Bytes of the record.
    pub const LEN: usize = 32;

    /// Decode and check a request against the largest queue this target gives (`max_size`
    /// entries) and the I/O queues it has (`max_qid`).
    pub fn parse(data: &[u8], max_size: u16, max_qid: u16) -> Result<Self, RejectStatus> {
        if data.len() < Self::LEN {
            return Err(RejectStatus::InvalidLength);
        }
        let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
        if word(0) != RECFMT {
            return Err(RejectStatus::InvalidRecfmt);
        }
        let r = Self {
            qid: word(2),
            hrqsize: word(4),
            hsqsize: word(6),
        };
        if r.qid > max_qid {
            return Err(RejectStatus::InvalidQid);
        }
        if r.hsqsize == 0 || r.hsqsize >= max_size {
            return Err(RejectStatus::InvalidHsqsize);
        }
        if r.hrqsize == 0 || r.hrqsize > max_size {
            return Err(RejectStatus::InvalidHrqsize);
        }
        Ok(r)
    }

    /// The record a host sends.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..2].copy_from_slice(&RECFMT.to_le_bytes());
        out[2..4].copy_from_slice(&self.qid.to_le_bytes());
        out[4..6].copy_from_slice(&self.hrqsize.to_le_bytes());
        out[6..8].copy_from_slice(&self.hsqsize.to_le_bytes());
        out
    }
}

/// The target's accept record (Figure 3): its receive queue size.
pub fn accept_record(crqsize: u16) -> [u8; 32] {
    let mut out = [0u8; 32];
    out[0..2].copy_from_slice(&RECFMT.to_le_bytes());
    out[2..4].copy_from_slice(&crqsize.to_le_bytes());
    out
}

/// The target's reject record (Figure 4).
pub fn reject_record(status: RejectStatus) -> [u8; 4] {
    let mut out = [0u8; 4];
    out[0..2].copy_from_slice(&RECFMT.to_le_bytes());
    out[2..4].copy_from_slice(&(status as u16).to_le_bytes());
    out
}

/// A reject record's status, if `data` is one.
pub fn parse_reject(data: &[u8]) -> Option<u16> {
    (data.len() >= 4).then(|| u16::from_le_bytes([data[2], data[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_checks() {
        let r = ConnectRequest {
            qid: 1,
            hrqsize: 128,
            hsqsize: 127,
        };
        assert_eq!(ConnectRequest::parse(&r.encode(), 128, 4), Ok(r));
        assert_eq!(
            ConnectRequest::parse(&r.encode()[..31], 128, 4),
            Err(RejectStatus::InvalidLength)
        );
        let mut bad = r.encode();
        bad[0] = 1;
        assert_eq!(
            ConnectRequest::parse(&bad, 128, 4),
            Err(RejectStatus::InvalidRecfmt)
        );
        assert_eq!(
            ConnectRequest::parse(&ConnectRequest { qid: 5, ..r }.encode(), 128, 4),
            Err(RejectStatus::InvalidQid)
        );
        for hsqsize in [0, 128, u16::MAX] {
            assert_eq!(
                ConnectRequest::parse(&ConnectRequest { hsqsize, ..r }.encode(), 128, 4),
                Err(RejectStatus::InvalidHsqsize)
            );
        }
        for hrqsize in [0, 129] {
            assert_eq!(
                ConnectRequest::parse(&ConnectRequest { hrqsize, ..r }.encode(), 128, 4),
                Err(RejectStatus::InvalidHrqsize)
            );
        }
        assert_eq!(accept_record(128)[2..4], [128, 0]);
        assert_eq!(
            parse_reject(&reject_record(RejectStatus::NoResources)),
            Some(6)
        );
    }
}
