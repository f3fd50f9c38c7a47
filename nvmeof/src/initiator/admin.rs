//! Synchronous admin operations over a connected admin queue: Property Get/Set (base 2.0
//! §6.5, 6.6), controller enable and shutdown through CC/CSTS, Identify, Get Log Page and
//! Keep Alive.

use std::time::{Duration, Instant};

use nvme_spec::fabrics::{PROPERTY_SIZE_8, fctype};
use nvme_spec::identify::cns;
use nvme_spec::opcode::admin as op;
use nvme_spec::registers::{self as reg, cc, csts};
use nvme_spec::{Status, Submission};

use super::queue::{HostQueue, QueueError, SyncData, fabrics_sqe};
use crate::stream::StreamError;

impl HostQueue {
    fn checked(
        &mut self,
        what: &'static str,
        sqe: Submission,
        data: SyncData<'_>,
        timeout: Duration,
    ) -> Result<u64, QueueError> {
        let c = self.sync(sqe, data, timeout)?;
        if c.status.is_success() {
            Ok(c.result)
        } else {
            Err(QueueError::Refused {
                what,
                status: c.status,
            })
        }
    }

    /// Property Get: read controller register `offset` (8 bytes for CAP, 4 otherwise).
    pub fn property_get(&mut self, offset: u64, timeout: Duration) -> Result<u64, QueueError> {
        let mut sqe = fabrics_sqe(fctype::PROPERTY_GET);
        if offset == reg::CAP {
            sqe.cdw10 = PROPERTY_SIZE_8.into();
        }
        sqe.cdw11 = (offset as u32).into();
        self.checked("Property Get", sqe, SyncData::None, timeout)
    }

    /// Property Set: write the 4-byte controller register `offset`.
    pub fn property_set(
        &mut self,
        offset: u64,
        value: u32,
        timeout: Duration,
    ) -> Result<(), QueueError> {
        let mut sqe = fabrics_sqe(fctype::PROPERTY_SET);
        sqe.cdw11 = (offset as u32).into();
        sqe.cdw12 = value.into();
        self.checked("Property Set", sqe, SyncData::None, timeout)
            .map(|_| ())
    }

    /// Enable the controller (CC.EN with 64-byte SQEs and 16-byte CQEs) and wait for
    /// CSTS.RDY within CAP.TO (base 2.0 §3.5.1). Returns CAP.
    pub fn enable(&mut self, timeout: Duration) -> Result<u64, QueueError> {
        let cap = self.property_get(reg::CAP, timeout)?;
        let value = cc::EN | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT);
        self.property_set(reg::CC, value, timeout)?;
        let to = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        let deadline = Instant::now() + to;
        loop {
            let st = self.property_get(reg::CSTS, timeout)? as u32;
            if st & csts::CFS != 0 {
                return Err(QueueError::Refused {
                    what: "enable (CSTS.CFS set)",
                    status: Status::INTERNAL_ERROR,
                });
            }
            if st & csts::RDY != 0 {
                return Ok(cap);
            }
            if Instant::now() >= deadline {
                return Err(StreamError::Timeout(to.as_millis() as u64).into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Normal shutdown (CC.SHN = 01b), waiting briefly for CSTS.SHST complete.
    pub fn shutdown_controller(&mut self, timeout: Duration) -> Result<(), QueueError> {
        let cc_now = self.property_get(reg::CC, timeout)? as u32;
        self.property_set(reg::CC, cc_now | (1 << cc::SHN_SHIFT), timeout)?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let st = self.property_get(reg::CSTS, timeout)? as u32;
            if st & csts::SHST_COMPLETE != 0 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(StreamError::Timeout(timeout.as_millis() as u64).into())
    }

    /// Identify with `cns` for `nsid`: 4096 bytes.
    pub fn identify(
        &mut self,
        cns: u8,
        nsid: u32,
        timeout: Duration,
    ) -> Result<Vec<u8>, QueueError> {
        let mut buf = vec![0u8; 4096];
        let mut sqe = Submission::default();
        sqe.opcode = op::IDENTIFY;
        sqe.nsid = nsid.into();
        sqe.cdw10 = u32::from(cns).into();
        self.checked("Identify", sqe, SyncData::FromController(&mut buf), timeout)?;
        Ok(buf)
    }

    /// Identify Controller.
    pub fn identify_controller(&mut self, timeout: Duration) -> Result<Vec<u8>, QueueError> {
        self.identify(cns::CONTROLLER, 0, timeout)
    }

    /// Get Log Page `lid`: `len` bytes (a multiple of 4) from byte `offset`.
    pub fn get_log_page(
        &mut self,
        lid: u8,
        offset: u64,
        len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, QueueError> {
        let mut buf = vec![0u8; len];
        let numd = (len / 4).saturating_sub(1) as u32;
        let mut sqe = Submission::default();
        sqe.opcode = op::GET_LOG_PAGE;
        sqe.cdw10 = (u32::from(lid) | ((numd & 0xffff) << 16)).into();
        sqe.cdw11 = (numd >> 16).into();
        sqe.cdw12 = (offset as u32).into();
        sqe.cdw13 = ((offset >> 32) as u32).into();
        self.checked(
            "Get Log Page",
            sqe,
            SyncData::FromController(&mut buf),
            timeout,
        )?;
        Ok(buf)
    }

    /// Set Features `fid` with CDW11 `value`; returns the completion's dword 0.
    pub fn set_features(
        &mut self,
        fid: u8,
        value: u32,
        timeout: Duration,
    ) -> Result<u64, QueueError> {
        let mut sqe = Submission::default();
        sqe.opcode = op::SET_FEATURES;
        sqe.cdw10 = u32::from(fid).into();
        sqe.cdw11 = value.into();
        self.checked("Set Features", sqe, SyncData::None, timeout)
            .map(|r| r & 0xffff_ffff)
    }

    /// Keep Alive (base 2.0 §5.25).
    pub fn keep_alive(&mut self, timeout: Duration) -> Result<(), QueueError> {
        let mut sqe = Submission::default();
        sqe.opcode = op::KEEP_ALIVE;
        self.checked("Keep Alive", sqe, SyncData::None, timeout)
            .map(|_| ())
    }
}
