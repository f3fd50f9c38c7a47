//! Controller bring-up and the admin queue (NVMe base 2.0 §3.5.1 initialisation, §3.6
//! shutdown, §3.7.2 reset): disable and wait for !RDY within CAP.TO, program the admin
//! queue, enable and wait for RDY, Identify the controller and its namespaces, negotiate the
//! number of I/O queues; then create and delete I/O queue pairs on request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvme_spec::identify::{IdentifyController, IdentifyNamespace, cns};
use nvme_spec::opcode::admin;
use nvme_spec::registers::{self as reg, cc, csts};
use nvme_spec::{Status, Submission};
use zerocopy::FromBytes;

use crate::dma::{DmaMemory, PAGE};
use crate::error::DriverError;
use crate::queue_pair::{IoQueuePair, QueuePair, Request, ShadowPages};
use crate::transport::Transport;

/// Admin queue entries.
const ADMIN_QUEUE_SIZE: u16 = 32;
/// How long an admin command may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting admin command checks that the controller is still there.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(50);
/// Device address where the driver's DMA memory starts (not 0, so no valid PRP is null).
pub const DMA_IOVA_BASE: u64 = 1 << 32;
/// A DMA base above every x86_64 user-space address (47 bits), for drivers that also map
/// foreign memory at its host address.
pub const HIGH_DMA_IOVA_BASE: u64 = 1 << 47;
/// `user` tag of the driver's own Asynchronous Event Requests.
const AER_TAG: u64 = u64::MAX;

/// One active namespace.
#[derive(Clone)]
pub struct NamespaceInfo {
    pub nsid: u32,
    /// Size in logical blocks (NSZE).
    pub blocks: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    pub identify: Box<IdentifyNamespace>,
}

impl std::fmt::Debug for NamespaceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceInfo")
            .field("nsid", &self.nsid)
            .field("blocks", &self.blocks)
            .field("block_size", &self.block_size)
            .finish()
    }
}

/// A Controller Memory Buffer as the controller advertises it (NVMe base 2.0 §8.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Cmb {
    /// Size in bytes.
    pub bytes: u64,
    /// BAR holding it and its offset there.
    pub bar: u8,
    pub offset: u64,
    /// What may live there: submission queues, completion queues, PRP/SGL lists, read
    /// data, write data.
    pub sqs: bool,
    pub cqs: bool,
    pub lists: bool,
    pub read_data: bool,
    pub write_data: bool,
}

impl Cmb {
    /// Decode CMBLOC and CMBSZ; `None` when CMBSZ is 0 (no CMB).
    pub fn decode(cmbloc: u32, cmbsz: u32) -> Option<Self> {
        let unit = 4096u64 << (4 * ((cmbsz >> 8) & 0xf));
        let bytes = u64::from(cmbsz >> 12) * unit;
        (bytes > 0).then_some(Self {
            bytes,
            bar: (cmbloc & 7) as u8,
            offset: u64::from(cmbloc >> 12) * unit,
            sqs: cmbsz & 1 != 0,
            cqs: cmbsz & 2 != 0,
            lists: cmbsz & 4 != 0,
            read_data: cmbsz & 8 != 0,
            write_data: cmbsz & 16 != 0,
        })
    }
}

/// A controller driven from user space.
pub struct NvmeDriver {
    transport: Box<dyn Transport>,
    dma: Arc<DmaMemory>,
    admin: QueuePair,
    cap: u64,
    stride: usize,
    timeout: Duration,
    identify: Box<IdentifyController>,
    namespaces: Vec<NamespaceInfo>,
    /// I/O queue pairs granted by Set Features Number of Queues.
    io_queues: u16,
    qid_used: Vec<bool>,
    /// Asynchronous events received (completion dword 0), oldest first.
    events: Vec<u32>,
    /// Doorbell Buffer Config's pages, once asked for (I/O queues created afterwards use
    /// them; configured again after a reset).
    shadow: Option<Arc<ShadowPages>>,
    shut_down: bool,
}

impl std::fmt::Debug for NvmeDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDriver")
            .field("target", &self.transport.name())
            .field("namespaces", &self.namespaces)
            .finish_non_exhaustive()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

impl NvmeDriver {
    /// Bring up the controller behind `transport` with `dma_size` bytes of DMA memory and ask
    /// for `io_queues` I/O queue pairs.
    pub fn new(
        transport: Box<dyn Transport>,
        dma_size: u64,
        io_queues: u16,
    ) -> Result<Self, DriverError> {
        Self::with_dma_base(transport, dma_size, io_queues, DMA_IOVA_BASE)
    }

    /// As [`Self::new`], with the driver's DMA memory at device address `iova_base` (a
    /// zero-copy user that maps foreign memory at its host addresses puts it above every
    /// user-space address, e.g. [`HIGH_DMA_IOVA_BASE`]).
    pub fn with_dma_base(
        mut transport: Box<dyn Transport>,
        dma_size: u64,
        io_queues: u16,
        iova_base: u64,
    ) -> Result<Self, DriverError> {
        let dma = DmaMemory::new(dma_size, iova_base)?;
        transport.map_dma(&dma)?;
        let cap = transport.read64(reg::CAP)?;
        let stride = 4usize << ((cap >> 32) & 0xf);
        let timeout = Duration::from_millis(500 * ((cap >> 24) & 0xff).max(1));
        let mpsmin = (cap >> 48) & 0xf;
        if mpsmin > 0 {
            return Err(DriverError::Invalid(format!(
                "controller needs pages of at least {} bytes; this driver uses 4 KiB",
                4096u64 << mpsmin
            )));
        }
        if (cap >> 37) & 1 == 0 {
            return Err(DriverError::Invalid(
                "controller lacks the NVM command set".into(),
            ));
        }
        let admin = QueuePair::new(&dma, 0, ADMIN_QUEUE_SIZE, transport.doorbells(), stride)?;
        let mut c = Self {
            transport,
            dma,
            admin,
            cap,
            stride,
            timeout,
            identify: Box::default(),
            namespaces: Vec::new(),
            io_queues: 0,
            qid_used: Vec::new(),
            events: Vec::new(),
            shadow: None,
            shut_down: false,
        };
        c.enable()?;
        c.identify_all()?;
        c.set_queue_count(io_queues)?;
        c.post_async_event_request();
        log::info!(
            "{}: {} {} ({} namespace{}, {} I/O queue{})",
            c.transport.name(),
            text(&c.identify.mn),
            text(&c.identify.sn),
            c.namespaces.len(),
            if c.namespaces.len() == 1 { "" } else { "s" },
            c.io_queues,
            if c.io_queues == 1 { "" } else { "s" }
        );
        Ok(c)
    }

    fn wait_ready(&mut self, ready: bool) -> Result<(), DriverError> {
        let start = Instant::now();
        loop {
            let s = self.transport.read32(reg::CSTS)?;
            if s == u32::MAX {
                return Err(DriverError::Transport(
                    "CSTS reads all ones: device gone".into(),
                ));
            }
            if ready && s & csts::CFS != 0 {
                return Err(DriverError::Fatal);
            }
            if (s & csts::RDY != 0) == ready {
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                return Err(DriverError::Timeout(self.timeout.as_millis() as u64));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Disable, program the admin queue, enable (§3.5.1).
    fn enable(&mut self) -> Result<(), DriverError> {
        self.transport.write32(reg::CC, 0)?;
        self.wait_ready(false)?;
        self.admin = QueuePair::new(
            &self.dma,
            0,
            ADMIN_QUEUE_SIZE,
            self.transport.doorbells(),
            self.stride,
        )?;
        let (asq, acq) = self.admin.rings();
        let q = u32::from(ADMIN_QUEUE_SIZE - 1);
        self.transport.write32(reg::AQA, (q << 16) | q)?;
        self.transport.write64(reg::ASQ, asq)?;
        self.transport.write64(reg::ACQ, acq)?;
        let cc = cc::EN | (6 << cc::IOSQES_SHIFT) | (4 << cc::IOCQES_SHIFT);
        self.transport.write32(reg::CC, cc)?;
        self.wait_ready(true)
    }

    /// Run one admin command and wait for it; `data` is its buffer (PRPs built here).
    pub fn admin_command(
        &mut self,
        name: &'static str,
        sqe: Submission,
        data: Option<(u64, u64)>,
    ) -> Result<u32, DriverError> {
        const TAG: u64 = 1;
        match data {
            Some((iova, len)) => self.admin.submit_with_data(sqe, iova, len, TAG)?,
            None => self.admin.submit(sqe, TAG)?,
        };
        self.admin.ring();
        let start = Instant::now();
        let mut next_health_check = HEALTH_CHECK_EVERY;
        let mut result = None;
        loop {
            let events = &mut self.events;
            let mut resubmit_aer = false;
            self.admin.poll(usize::MAX, |r: Request| {
                if r.user == AER_TAG {
                    if r.status.is_success() {
                        events.push(r.dw0);
                        resubmit_aer = true;
                    }
                } else {
                    result = Some(r);
                }
            });
            if resubmit_aer {
                self.post_async_event_request();
            }
            if let Some(r) = result {
                return if r.status.is_success() {
                    Ok(r.dw0)
                } else {
                    Err(DriverError::Command {
                        command: name,
                        status: r.status,
                    })
                };
            }
            let waited = start.elapsed();
            if waited > ADMIN_TIMEOUT {
                return Err(DriverError::CommandTimeout {
                    command: name,
                    ms: ADMIN_TIMEOUT.as_millis() as u64,
                });
            }
            if waited > next_health_check {
                // a controller that went away or failed never completes: notice it early
                self.check_health()?;
                next_health_check = waited + HEALTH_CHECK_EVERY;
            }
            std::hint::spin_loop();
        }
    }

    fn post_async_event_request(&mut self) {
        let mut sqe = Submission::default();
        sqe.opcode = admin::ASYNC_EVENT_REQUEST;
        if self.admin.submit(sqe, AER_TAG).is_ok() {
            self.admin.ring();
        }
    }

    fn identify_raw(&mut self, cns_value: u8, nsid: u32) -> Result<Vec<u8>, DriverError> {
        let buf = self.dma.alloc(PAGE)?;
        let mut sqe = Submission::default();
        sqe.opcode = admin::IDENTIFY;
        sqe.nsid = nsid.into();
        sqe.cdw10 = u32::from(cns_value).into();
        self.admin_command("Identify", sqe, Some((buf.iova(), PAGE)))?;
        Ok(buf.as_slice()[..4096].to_vec())
    }

    fn identify_all(&mut self) -> Result<(), DriverError> {
        let raw = self.identify_raw(cns::CONTROLLER, 0)?;
        *self.identify = IdentifyController::read_from_bytes(&raw)
            .map_err(|_| DriverError::Invalid("Identify Controller size".into()))?;
        let list = self.identify_raw(cns::ACTIVE_NS_LIST, 0)?;
        let mut namespaces = Vec::new();
        for chunk in list.chunks(4) {
            let nsid = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            if nsid == 0 {
                break;
            }
            let raw = self.identify_raw(cns::NAMESPACE, nsid)?;
            let id = IdentifyNamespace::read_from_bytes(&raw)
                .map_err(|_| DriverError::Invalid("Identify Namespace size".into()))?;
            let fmt = id.lbaf[(id.flbas & 0xf) as usize];
            // LBADS below 9 is not supported (NVM command set 1.0, LBA Format); past 31 a
            // u32 cannot hold it: a device that says so has its namespace skipped, not a
            // shift overflowed
            let Some(block_size) = 1u32.checked_shl(u32::from(fmt.lbads)).filter(|b| *b >= 512)
            else {
                log::warn!(
                    "{}: namespace {nsid}: LBA data size 2^{} not supported; skipped",
                    self.transport.name(),
                    fmt.lbads
                );
                continue;
            };
            namespaces.push(NamespaceInfo {
                nsid,
                blocks: id.nsze.get(),
                block_size,
                identify: Box::new(id),
            });
        }
        self.namespaces = namespaces;
        Ok(())
    }

    fn set_queue_count(&mut self, wanted: u16) -> Result<(), DriverError> {
        let n = u32::from(wanted.max(1) - 1);
        let mut sqe = Submission::default();
        sqe.opcode = admin::SET_FEATURES;
        sqe.cdw10 = 0x07.into();
        sqe.cdw11 = ((n << 16) | n).into();
        let dw0 = self.admin_command("Set Features (Number of Queues)", sqe, None)?;
        let granted = (dw0 & 0xffff).min(dw0 >> 16) as u16 + 1;
        self.io_queues = granted.min(wanted.max(1));
        self.qid_used = vec![false; self.io_queues as usize + 1];
        Ok(())
    }

    /// Check that the controller is reachable and not in Controller Fatal Status (callers
    /// polling I/O queues do this now and then: a dead controller completes nothing).
    pub fn check_health(&mut self) -> Result<(), DriverError> {
        let s = self.transport.read32(reg::CSTS)?;
        if s == u32::MAX {
            return Err(DriverError::Transport(
                "CSTS reads all ones: device gone".into(),
            ));
        }
        if s & csts::CFS != 0 {
            return Err(DriverError::Fatal);
        }
        if s & csts::RDY == 0 && !self.shut_down {
            return Err(DriverError::Transport(
                "controller no longer ready (reset behind the driver's back?)".into(),
            ));
        }
        Ok(())
    }

    /// Identify Controller data.
    pub fn identify(&self) -> &IdentifyController {
        &self.identify
    }

    /// Active namespaces.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        &self.namespaces
    }

    /// Controller Capabilities.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// The controller's memory buffer, if it has one (on controllers with CAP.CMBS the
    /// registers are enabled first through CMBMSC.CRE, without enabling the buffer itself).
    pub fn cmb(&mut self) -> Result<Option<Cmb>, DriverError> {
        if self.cap & reg::CAP_CMBS != 0 {
            self.transport.write32(reg::CMBMSC, 1)?;
        }
        let loc = self.transport.read32(reg::CMBLOC)?;
        let sz = self.transport.read32(reg::CMBSZ)?;
        Ok(Cmb::decode(loc, sz))
    }

    /// I/O queue pairs granted.
    pub fn io_queue_count(&self) -> u16 {
        self.io_queues
    }

    /// Largest transfer in bytes (MDTS, capped by one PRP list page).
    pub fn max_transfer(&self) -> u64 {
        let prp_limit = (PAGE / 8 + 1) * PAGE;
        match self.identify.mdts {
            0 => prp_limit,
            m => (PAGE << m).min(prp_limit),
        }
    }

    /// Largest queue size the controller supports (CAP.MQES + 1).
    pub fn max_queue_size(&self) -> u32 {
        (self.cap & 0xffff) as u32 + 1
    }

    /// The driver's DMA memory (for data buffers).
    pub fn dma(&self) -> &Arc<DmaMemory> {
        &self.dma
    }

    /// Map foreign memory for the device (see [`Transport::map_foreign`]).
    pub fn map_foreign(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        file_offset: u64,
        host: *mut u8,
        iova: u64,
        len: u64,
    ) -> Result<(), DriverError> {
        self.transport.map_foreign(fd, file_offset, host, iova, len)
    }

    /// Undo [`Self::map_foreign`].
    pub fn unmap_foreign(&mut self, iova: u64, len: u64) -> Result<(), DriverError> {
        self.transport.unmap_foreign(iova, len)
    }

    /// Asynchronous events received so far (completion dword 0 values), drained.
    pub fn take_events(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.events)
    }

    /// Create an I/O queue pair with `size` entries on the lowest free queue id.
    pub fn create_io_queue_pair(&mut self, size: u16) -> Result<IoQueuePair, DriverError> {
        let qid = (1..self.qid_used.len())
            .find(|&q| !self.qid_used[q])
            .ok_or_else(|| {
                DriverError::Invalid(format!("all {} I/O queues in use", self.io_queues))
            })? as u16;
        self.create_io_queue_pair_at(qid, size)
    }

    /// After a [`Self::reset`], create `qp` again on the same queue id and size, so a
    /// queue pair owned by another thread that has not caught up with the reset yet can
    /// never ring a doorbell of a queue handed to someone else. Its outstanding commands
    /// are dropped (fail them first with [`IoQueuePair::fail_outstanding`]).
    pub fn recreate_io_queue_pair(&mut self, qp: &mut IoQueuePair) -> Result<(), DriverError> {
        *qp = self.create_io_queue_pair_at(qp.qid(), qp.size())?;
        Ok(())
    }

    /// Create an I/O queue pair with `size` entries on queue id `qid` (1..=granted count).
    pub fn create_io_queue_pair_at(
        &mut self,
        qid: u16,
        size: u16,
    ) -> Result<IoQueuePair, DriverError> {
        if self.qid_used.get(usize::from(qid)) != Some(&false) || qid == 0 {
            return Err(DriverError::Invalid(format!(
                "queue {qid} is in use or beyond the {} I/O queues granted",
                self.io_queues
            )));
        }
        let mut qp = QueuePair::new(
            &self.dma,
            qid,
            size,
            self.transport.doorbells(),
            self.stride,
        )?;
        if let Some(pages) = &self.shadow {
            qp.use_shadow(pages, self.stride);
        }
        let (sq, cq) = qp.rings();
        let q = u32::from(qid) | ((u32::from(size) - 1) << 16);
        let mut c = Submission::default();
        c.opcode = admin::CREATE_IO_CQ;
        c.prp1 = cq.into();
        c.cdw10 = q.into();
        c.cdw11 = 1.into(); // physically contiguous, interrupts off: we poll
        self.admin_command("Create I/O CQ", c, None)?;
        let mut s = Submission::default();
        s.opcode = admin::CREATE_IO_SQ;
        s.prp1 = sq.into();
        s.cdw10 = q.into();
        s.cdw11 = ((u32::from(qid) << 16) | 1).into();
        if let Err(e) = self.admin_command("Create I/O SQ", s, None) {
            let _ = self.delete_queue(admin::DELETE_IO_CQ, qid);
            return Err(e);
        }
        self.qid_used[qid as usize] = true;
        Ok(qp)
    }

    fn delete_queue(&mut self, opcode: u8, qid: u16) -> Result<u32, DriverError> {
        let mut d = Submission::default();
        d.opcode = opcode;
        d.cdw10 = u32::from(qid).into();
        let name = if opcode == admin::DELETE_IO_SQ {
            "Delete I/O SQ"
        } else {
            "Delete I/O CQ"
        };
        self.admin_command(name, d, None)
    }

    /// Delete an I/O queue pair (its outstanding commands are aborted by the controller).
    pub fn delete_io_queue_pair(&mut self, qp: IoQueuePair) -> Result<(), DriverError> {
        let qid = qp.qid();
        self.delete_queue(admin::DELETE_IO_SQ, qid)?;
        self.delete_queue(admin::DELETE_IO_CQ, qid)?;
        self.qid_used[qid as usize] = false;
        drop(qp); // its rings go back to the DMA allocator only now, after the deletion
        Ok(())
    }

    /// Abort (§5.1) command `cid` of SQ `sqid`. True when the controller aborted it (it then
    /// completes with Command Abort Requested); false when it declined (dword 0 bit 0), which
    /// the spec allows for any command.
    pub fn abort(&mut self, sqid: u16, cid: u16) -> Result<bool, DriverError> {
        let mut s = Submission::default();
        s.opcode = admin::ABORT;
        s.cdw10 = (u32::from(sqid) | (u32::from(cid) << 16)).into();
        Ok(self.admin_command("Abort", s, None)? & 1 == 0)
    }

    /// Recovery from commands that timed out on `qps` (abort did not help): reset the
    /// controller, complete every outstanding command with Host Aborted Command through
    /// `done`, and re-create the queue pairs in place with the same sizes.
    pub fn reset_queue_pairs(
        &mut self,
        qps: &mut [IoQueuePair],
        mut done: impl FnMut(u16, Request),
    ) -> Result<(), DriverError> {
        self.reset()?;
        for qp in qps.iter_mut() {
            let qid = qp.qid();
            qp.fail_outstanding(Status::HOST_ABORTED, |r| done(qid, r));
        }
        for qp in qps.iter_mut() {
            self.recreate_io_queue_pair(qp)?;
        }
        Ok(())
    }

    /// Controller reset (§3.7.2): every I/O queue pair is gone afterwards (drop them and
    /// create new ones, or use [`Self::reset_queue_pairs`]); namespaces are identified again.
    pub fn reset(&mut self) -> Result<(), DriverError> {
        log::info!("{}: controller reset", self.transport.name());
        self.transport.before_reset()?;
        self.enable()?;
        self.identify_all()?;
        self.set_queue_count(self.io_queues)?;
        self.post_async_event_request();
        if let Some(pages) = self.shadow.take() {
            // the setting ends with the reset: configure it again, on clean pages
            drop(pages);
            self.use_shadow_doorbells()?;
        }
        Ok(())
    }

    /// Doorbell Buffer Config (NVMe base 2.0 §5.8), as Linux uses it: the I/O queues created
    /// from now on keep their doorbells in a shadow page in host memory and write the
    /// registers only when the controller's EventIdx asks for it; the admin queue keeps its
    /// registers. Refused when the controller does not offer the command (OACS bit 8).
    pub fn use_shadow_doorbells(&mut self) -> Result<(), DriverError> {
        if self.identify.oacs.get() & nvme_spec::identify::oacs::DOORBELL_BUFFER_CONFIG == 0 {
            return Err(DriverError::Invalid(
                "the controller has no Doorbell Buffer Config".into(),
            ));
        }
        // one SQ tail and one CQ head entry per queue id the driver may use
        let len = (usize::from(self.io_queues) + 1) * 2 * self.stride;
        let pages = ShadowPages {
            shadow: self.dma.alloc(len as u64)?,
            event_idx: self.dma.alloc(len as u64)?,
        };
        let mut c = Submission::default();
        c.opcode = admin::DOORBELL_BUFFER_CONFIG;
        c.prp1 = pages.shadow.iova().into();
        c.prp2 = pages.event_idx.iova().into();
        self.admin_command("Doorbell Buffer Config", c, None)?;
        self.shadow = Some(Arc::new(pages));
        Ok(())
    }

    /// Normal shutdown (CC.SHN = 01b, wait for SHST complete); also done on drop.
    pub fn shutdown(&mut self) -> Result<(), DriverError> {
        if self.shut_down {
            return Ok(());
        }
        self.shut_down = true;
        let cc = self.transport.read32(reg::CC)?;
        self.transport
            .write32(reg::CC, (cc & !(3 << cc::SHN_SHIFT)) | (1 << cc::SHN_SHIFT))?;
        let start = Instant::now();
        while self.transport.read32(reg::CSTS)? & (3 << csts::SHST_SHIFT) != csts::SHST_COMPLETE {
            if start.elapsed() > self.timeout {
                return Err(DriverError::Timeout(self.timeout.as_millis() as u64));
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        Ok(())
    }

    /// Model number, serial number and firmware revision, trimmed.
    pub fn names(&self) -> (String, String, String) {
        (
            text(&self.identify.mn),
            text(&self.identify.sn),
            text(&self.identify.fr),
        )
    }

    /// The transport's target name.
    pub fn target(&self) -> String {
        self.transport.name()
    }

    /// Status of a failed command, for callers matching on spec codes.
    pub fn status_of(e: &DriverError) -> Option<Status> {
        match e {
            DriverError::Command { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl Drop for NvmeDriver {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("{}: shutdown: {e}", self.transport.name());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cmb;

    #[test]
    fn cmb_registers_decode() {
        assert_eq!(Cmb::decode(0, 0), None);
        // QEMU, cmb_size_mb=16: BAR 2, offset 0, SZU 1 MiB (2), 16 units, SQS|LISTS|RDS|WDS
        let c = Cmb::decode(2, (16 << 12) | (2 << 8) | 0b11101).unwrap();
        assert_eq!((c.bytes, c.bar, c.offset), (16 << 20, 2, 0));
        assert!(c.sqs && !c.cqs && c.lists && c.read_data && c.write_data);
        // 4 KiB units, offset 8 units
        let c = Cmb::decode((8 << 12) | 4, (3 << 12) | 1).unwrap();
        assert_eq!((c.bytes, c.bar, c.offset), (3 * 4096, 4, 8 * 4096));
    }
}
