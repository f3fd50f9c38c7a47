//! The target's discovery controller (base 2.0 §3.1.3.3): answered by the target itself,
//! per connection, with the properties, Identify Controller and Discovery log page (70h)
//! that `nvme discover` reads.

use nvme_spec::fabrics::{
    DISCOVERY_NQN, DiscoveryLogEntry, DiscoveryLogHeader, discovery, put_str, put_str_spaced,
};
use nvme_spec::identify::{IdentifyController, cns, lpa};
use nvme_spec::opcode::admin as op;
use nvme_spec::registers::{self as reg, cc, csts};
use nvme_spec::{Status, Submission};
use zerocopy::IntoBytes;

/// Controller ID the discovery controller reports.
pub const DISCOVERY_CNTLID: u16 = 1;

/// One entry of the log: a subsystem reachable through a port.
#[derive(Clone, Debug)]
pub struct Listed {
    /// Transport type ([`discovery::TRTYPE_TCP`] or [`discovery::TRTYPE_RDMA`]).
    pub trtype: u8,
    pub portid: u16,
    pub traddr: String,
    pub trsvcid: String,
    pub adrfam: u8,
    pub subnqn: String,
    pub subtype: u8,
}

/// Register state of one discovery controller.
#[derive(Debug, Default)]
pub struct DiscoveryController {
    cc: u32,
}

/// What a discovery command produced.
#[derive(Debug)]
pub enum Answer {
    /// Complete with this status, result and (controller-to-host) data.
    Done(Status, u64, Vec<u8>),
    /// Never answered (Asynchronous Event Request: there are no events).
    Parked,
}

impl DiscoveryController {
    /// CAP: 32 entries, CQR, 500 ms timeout, NVM command set.
    pub fn cap() -> u64 {
        31 | (1 << 16) | (1 << 24) | (1 << 37)
    }

    /// Property Get.
    pub fn property_get(&self, offset: u64) -> Result<u64, Status> {
        Ok(match offset {
            reg::CAP => Self::cap(),
            reg::VS => 0x0001_0300,
            reg::CC => u64::from(self.cc),
            reg::CSTS => {
                let mut v = 0;
                if self.cc & cc::EN != 0 {
                    v |= csts::RDY;
                }
                if (self.cc >> cc::SHN_SHIFT) & 3 != 0 {
                    v |= csts::SHST_COMPLETE;
                }
                u64::from(v)
            }
            _ => return Err(Status::INVALID_FIELD),
        })
    }

    /// Property Set (only CC is writable).
    pub fn property_set(&mut self, offset: u64, value: u64) -> Result<(), Status> {
        if offset != reg::CC {
            return Err(Status::INVALID_FIELD);
        }
        self.cc = value as u32;
        Ok(())
    }

    /// An admin command other than a Fabrics command; `listed` are the log's entries for
    /// this host.
    pub fn command(&self, sqe: &Submission, listed: &[Listed], genctr: u64) -> Answer {
        if self.cc & cc::EN == 0 {
            return Answer::Done(Status::COMMAND_SEQUENCE_ERROR, 0, Vec::new());
        }
        match sqe.opcode {
            op::IDENTIFY if sqe.cdw10.get() & 0xff == u32::from(cns::CONTROLLER) => {
                Answer::Done(Status::SUCCESS, 0, identify().as_bytes().to_vec())
            }
            op::IDENTIFY => Answer::Done(Status::INVALID_FIELD, 0, Vec::new()),
            op::GET_LOG_PAGE if sqe.cdw10.get() & 0xff == u32::from(discovery::LOG_ID) => {
                let numd = (sqe.cdw10.get() >> 16) | ((sqe.cdw11.get() & 0xffff) << 16);
                let len = (u64::from(numd) + 1) * 4;
                let offset = u64::from(sqe.cdw12.get()) | (u64::from(sqe.cdw13.get()) << 32);
                let log = log_page(listed, genctr);
                let mut out = vec![0u8; len.min(1 << 20) as usize];
                if let Some(src) = log.get(offset.min(log.len() as u64) as usize..) {
                    let n = src.len().min(out.len());
                    out[..n].copy_from_slice(&src[..n]);
                }
                Answer::Done(Status::SUCCESS, 0, out)
            }
            op::GET_LOG_PAGE => Answer::Done(Status::INVALID_LOG_PAGE, 0, Vec::new()),
            op::KEEP_ALIVE => Answer::Done(Status::SUCCESS, 0, Vec::new()),
            op::ASYNC_EVENT_REQUEST => Answer::Parked,
            // Get Features / Set Features: only Keep Alive Timer and Async Event Config
            op::GET_FEATURES | op::SET_FEATURES
                if matches!(sqe.cdw10.get() & 0xff, 0x0b | 0x0f) =>
            {
                Answer::Done(Status::SUCCESS, 0, Vec::new())
            }
            _ => Answer::Done(Status::INVALID_OPCODE, 0, Vec::new()),
        }
    }
}

fn identify() -> IdentifyController {
    let mut id = IdentifyController::default();
    let sn = b"VNVME-DISCOVERY     ";
    id.sn.copy_from_slice(sn);
    put_str_spaced(&mut id.mn, "vnvme discovery controller");
    put_str_spaced(&mut id.fr, env!("CARGO_PKG_VERSION"));
    id.cntlid = DISCOVERY_CNTLID.into();
    id.ver = 0x0001_0300.into();
    id.cntrltype = 2; // discovery controller
    id.lpa = lpa::EXTENDED_DATA;
    id.maxcmd = 32.into();
    id.kas = 1.into();
    // SGLs, Keyed SGL Data Blocks (an NVMe/RDMA host requires them), offsets
    id.sgls = (1 | (1 << 2) | (1 << 20)).into();
    put_str(&mut id.subnqn, DISCOVERY_NQN);
    id.nvmeof[0..4].copy_from_slice(&4u32.to_le_bytes()); // IOCCSZ: 64 bytes
    id.nvmeof[4..8].copy_from_slice(&1u32.to_le_bytes()); // IORCSZ: 16 bytes
    id.nvmeof[11] = 1;
    id
}

/// The Discovery log page (Figure 292): header, then one 1024-byte entry per record.
pub fn log_page(listed: &[Listed], genctr: u64) -> Vec<u8> {
    let mut h = DiscoveryLogHeader::default();
    h.genctr = genctr.into();
    h.numrec = (listed.len() as u64).into();
    let mut out = h.as_bytes().to_vec();
    for l in listed {
        let mut e = DiscoveryLogEntry::default();
        e.trtype = l.trtype;
        e.adrfam = l.adrfam;
        e.subtype = l.subtype;
        e.treq = discovery::TREQ_NOT_REQUIRED;
        e.portid = l.portid.into();
        e.cntlid = 0xffff.into();
        e.asqsz = 32.into();
        put_str_spaced(&mut e.trsvcid, &l.trsvcid);
        put_str(&mut e.subnqn, &l.subnqn);
        put_str_spaced(&mut e.traddr, &l.traddr);
        // TSAS for TCP: security type none; for RDMA (NVMe/RDMA 1.0 §4.1): reliable
        // connected queue pairs, any provider, RDMA CM
        if l.trtype == discovery::TRTYPE_RDMA {
            e.tsas[0] = discovery::RDMA_QPTYPE_CONNECTED;
            e.tsas[1] = discovery::RDMA_PRTYPE_NOT_SPECIFIED;
            e.tsas[2] = discovery::RDMA_CMS_RDMA_CM;
        }
        out.extend_from_slice(e.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_page_lists_each_record_and_honours_offset_and_length() {
        let listed = vec![Listed {
            trtype: discovery::TRTYPE_TCP,
            portid: 1,
            traddr: "127.0.0.1".into(),
            trsvcid: "4420".into(),
            adrfam: discovery::ADRFAM_IPV4,
            subnqn: "nqn.x".into(),
            subtype: discovery::SUBTYPE_NVME,
        }];
        let mut d = DiscoveryController::default();
        let mut sqe = Submission::default();
        sqe.opcode = op::GET_LOG_PAGE;
        // disabled: refused
        assert!(matches!(
            d.command(&sqe, &listed, 1),
            Answer::Done(s, _, _) if s == Status::COMMAND_SEQUENCE_ERROR
        ));
        d.property_set(reg::CC, 1).unwrap();
        assert_eq!(d.property_get(reg::CSTS).unwrap() & 1, 1);
        assert!(d.property_set(reg::AQA, 1).is_err());
        sqe.cdw10 = (0x70 | (255 << 16)).into(); // 1024 bytes
        sqe.cdw12 = 1024.into(); // from the first entry
        let Answer::Done(s, _, data) = d.command(&sqe, &listed, 7) else {
            panic!("parked")
        };
        assert!(s.is_success());
        assert_eq!(data.len(), 1024);
        assert_eq!(data[0], discovery::TRTYPE_TCP);
        assert_eq!(&data[256..261], b"nqn.x");
        assert_eq!(&data[512..521], b"127.0.0.1");
    }
}
