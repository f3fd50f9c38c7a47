//! Admin command set (NVMe base 2.0 §5): dispatch and data transfer helpers.

pub mod async_event;
mod doorbell_buffer;
pub(crate) mod features;
mod identify;
pub(crate) mod keep_alive;
mod lba_status;
pub(crate) mod log_page;
pub(crate) mod namespace_management;
mod queues;
#[cfg(test)]
mod thin_tests;
pub(crate) mod view;
pub(crate) mod virtualization;

use nvme_spec::opcode::admin as op;
use nvme_spec::{Status, Submission};

use crate::backend::IoOp;
use crate::compound::Part;
use crate::controller::{Controller, Outcome};
use crate::dptr;
use crate::memory::MemoryMap;
use crate::stats::ControllerStats;

pub(crate) use crate::state::async_events::AER_LIMIT;

impl Controller {
    /// Execute one admin command fetched into `slot` of the admin SQ.
    pub(crate) fn admin_command(
        &mut self,
        slot: u16,
        sqe: &Submission,
        mem: &MemoryMap,
    ) -> Outcome {
        if sqe.fuse() != 0 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if sqe.psdt() != 0 && self.cfg.fabrics.is_none() {
            // PCIe admin commands use PRPs only (§4.3); over a fabric, SGLs
            return Outcome::status(Status::INVALID_FIELD);
        }
        match sqe.opcode {
            op::IDENTIFY => {
                let page = self.view().identify(sqe);
                Outcome::status(page.map_or_else(|s| s, |p| self.admin_to_host(sqe, &p, mem)))
            }
            op::GET_FEATURES => {
                match features::get_features(self.view(), &self.admin.features, sqe) {
                    Ok(v) => match v.data {
                        Some(data) => match self.admin_to_host(sqe, &data, mem) {
                            s if s.is_success() => Outcome::Done(s, v.dw0),
                            s => Outcome::status(s),
                        },
                        None => Outcome::Done(Status::SUCCESS, v.dw0),
                    },
                    Err(s) => Outcome::status(s),
                }
            }
            op::SET_FEATURES => self.set_features(sqe, mem),
            op::GET_LOG_PAGE => Outcome::status(self.get_log_page(sqe, mem)),
            op::CREATE_IO_CQ | op::CREATE_IO_SQ => {
                let limits = self.queue_limits();
                let doorbells = queues::DoorbellPages {
                    registers: &self.doorbells,
                    shadow: self.shadow.as_ref(),
                };
                let create = if sqe.opcode == op::CREATE_IO_CQ {
                    queues::create_io_cq
                } else {
                    queues::create_io_sq
                };
                Outcome::status(create(&mut self.queues, &limits, doorbells, sqe, mem))
            }
            op::DELETE_IO_CQ => Outcome::status(queues::delete_io_cq(&mut self.queues, sqe)),
            op::DELETE_IO_SQ => queues::delete_io_sq(&mut self.queues, slot, sqe),
            // Abort is best effort: we never abort, dword 0 bit 0 = command not aborted (§5.1).
            op::ABORT => Outcome::Done(Status::SUCCESS, 1),
            op::ASYNC_EVENT_REQUEST => self.async_event_request(slot),
            op::KEEP_ALIVE => Outcome::status(self.keep_alive()),
            op::DOORBELL_BUFFER_CONFIG => {
                let page_size = self.page_size;
                match doorbell_buffer::doorbell_buffer_config(&mut self.queues, page_size, sqe, mem)
                {
                    Ok(pages) => {
                        log::info!(
                            "{}: shadow doorbells at {:#x}, EventIdx at {:#x}",
                            self.cfg.serial,
                            pages.shadow,
                            pages.event_idx
                        );
                        self.shadow = Some(pages);
                        self.journal_doorbells();
                        ControllerStats::bump(&self.stats.shadow_doorbell_configs);
                        Outcome::status(Status::SUCCESS)
                    }
                    Err(s) => Outcome::status(s),
                }
            }
            op::FORMAT_NVM => self.format_nvm(slot, sqe),
            op::GET_LBA_STATUS => Outcome::status(self.get_lba_status(sqe, mem)),
            op::NS_MANAGEMENT => self.namespace_management(slot, sqe, mem),
            op::NS_ATTACHMENT => self.namespace_attachment(slot, sqe, mem),
            op::VIRTUALIZATION_MANAGEMENT => {
                let (cdw10, cdw11) = (sqe.cdw10.get(), sqe.cdw11.get());
                let (s, dw0) = virtualization::virtualization_management(&self.cfg, cdw10, cdw11);
                Outcome::Done(s, dw0)
            }
            _ => Outcome::status(Status::INVALID_OPCODE),
        }
    }

    /// Get Log Page (§5.16): the page's bytes to the host, then its event unmasked unless
    /// RAE asked to retain it.
    fn get_log_page(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let req = match log_page::LogRequest::parse(sqe) {
            Ok(r) => r,
            Err(s) => return s,
        };
        let view = view::ControllerView {
            cfg: &self.cfg,
            namespaces: &self.namespaces,
        };
        let data = match log_page::log_page(view, &mut self.admin, &req) {
            Ok(d) => d,
            Err(s) => return s,
        };
        let s = self.admin_to_host(sqe, &data, mem);
        if s.is_success() {
            self.admin.events.log_page_read(req.id, req.retain_event);
        }
        s
    }

    /// The read-only view the reporting admin commands get.
    pub(crate) fn view(&self) -> view::ControllerView<'_> {
        view::ControllerView {
            cfg: &self.cfg,
            namespaces: &self.namespaces,
        }
    }

    /// The limits a new I/O queue is checked against.
    fn queue_limits(&self) -> queues::QueueLimits {
        queues::QueueLimits {
            mqes: self.cfg.mqes,
            page_size: self.page_size,
            granted: self.admin.features.granted(),
        }
    }

    /// Copy `data` to the host buffer of an admin command (controller to host).
    pub(crate) fn admin_to_host(
        &mut self,
        sqe: &Submission,
        data: &[u8],
        mem: &MemoryMap,
    ) -> Status {
        // over a fabric, admin data is described by SGLs too (base 2.0 §6: PRPs are PCIe only)
        let sgl = self.cfg.fabrics.is_some();
        if let Err(s) = dptr::map_data(
            mem,
            sqe,
            data.len() as u64,
            self.page_size,
            true,
            sgl,
            &mut self.scratch,
        ) {
            return s;
        }
        self.scratch.copy_from_slice(data);
        Status::SUCCESS
    }

    /// Copy `len` bytes of a command's host buffer into `self.bounce[..len]` (admin
    /// commands pass `allow_sgl = false`: on PCIe they use PRPs only; over a fabric SGLs).
    pub(crate) fn copy_from_host(
        &mut self,
        sqe: &Submission,
        len: usize,
        mem: &MemoryMap,
        allow_sgl: bool,
    ) -> Status {
        if len > self.bounce.len() {
            return Status::INVALID_FIELD;
        }
        let allow_sgl = allow_sgl || self.cfg.fabrics.is_some();
        if let Err(s) = dptr::map_data(
            mem,
            sqe,
            len as u64,
            self.page_size,
            false,
            allow_sgl,
            &mut self.scratch,
        ) {
            return s;
        }
        self.scratch.copy_to_slice(&mut self.bounce[..len]);
        Status::SUCCESS
    }

    /// Format NVM (§5.23): LBA format 0 only, no metadata or protection; SES 0 or 1. Each
    /// namespace's blocks are deallocated (they read as zeroes: DLFEAT), all namespaces at
    /// once with NSID FFFFFFFFh; the command completes when the last backend answered.
    fn format_nvm(&mut self, slot: u16, sqe: &Submission) -> Outcome {
        let cdw10 = sqe.cdw10.get();
        let lbaf = cdw10 & 0xf;
        let mset = (cdw10 >> 4) & 1;
        let pi = (cdw10 >> 5) & 7;
        let ses = (cdw10 >> 9) & 7;
        if lbaf != 0 || mset != 0 || pi != 0 {
            return Outcome::status(Status::INVALID_FORMAT);
        }
        if ses > 1 {
            return Outcome::status(Status::INVALID_FIELD);
        }
        if self.wait_for_room(0, slot, sqe) {
            return Outcome::Pending;
        }
        let nsid = sqe.nsid.get();
        let targets = if nsid == u32::MAX {
            0..self.namespaces.len()
        } else {
            match self.namespace_index(nsid) {
                Some(i) => i..i + 1,
                None => return Outcome::status(Status::INVALID_NAMESPACE),
            }
        };
        let parts: Vec<Part> = self.namespaces[targets]
            .iter_mut()
            .map(|ns| {
                ns.uncorrectable.clear_all(); // every block deallocated: readable again
                log::info!("namespace {}: format ({})", ns.nsid, ns.backend.describe());
                Part {
                    nsid: ns.nsid,
                    op: IoOp::Deallocate {
                        len: ns.backend.size(),
                    },
                    offset: 0,
                    data: None,
                }
            })
            .collect();
        let n = parts.len();
        self.start_parts(0, slot, parts, n)
    }
}
