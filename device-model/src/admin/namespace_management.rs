//! Namespace Management (NVMe base 2.0 §5.20) and Namespace Attachment (§5.19) on a
//! controller that offers them, the changes they make reaching every controller of the
//! subsystem, and the Changed Namespace List log page (§5.16.1.5) with its Namespace
//! Attribute Changed event (§5.2, notice 00h).

use nvme_spec::{Status, Submission};

use crate::controller::{Controller, Outcome};
use crate::memory::MemoryMap;
use crate::namespace::Namespace;
use crate::state::changed_namespaces::{NS_ATTRIBUTE_CHANGED, NS_ATTRIBUTE_NOTICES};
use crate::subsystem_link::{CommandTag, NamespaceChange, NsError, NvmSubsystem, SettleChange};

/// SEL values of Namespace Management and Namespace Attachment.
const SEL_CREATE: u32 = 0;
const SEL_DELETE: u32 = 1;
const SEL_ATTACH: u32 = 0;
const SEL_DETACH: u32 = 1;

/// LBA formats a namespace can be created with (FLBAS index -> log2 of the block size);
/// Identify Namespace with NSID FFFFFFFFh lists them.
pub(crate) const CREATE_FORMATS: [u8; 2] = [9, 12];

impl Controller {
    /// Namespace Management (0Dh): create (dword 0 = the new NSID) or delete.
    pub(crate) fn namespace_management(
        &mut self,
        slot: u16,
        sqe: &Submission,
        mem: &MemoryMap,
    ) -> Outcome {
        let Some(sub) = self.cfg.subsystem.clone() else {
            return Outcome::status(Status::INVALID_OPCODE);
        };
        if !self.cfg.namespace_management {
            return Outcome::status(Status::INVALID_OPCODE);
        }
        let tag = self.command_tag(slot, sqe);
        if let Some(done) = self.applied_before(&*sub, tag) {
            return done;
        }
        let csi = sqe.cdw11.get() >> 24;
        match sqe.cdw10.get() & 0xf {
            SEL_CREATE => {
                if csi != 0 {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                let s = self.copy_from_host(sqe, 4096, mem, false);
                if !s.is_success() {
                    return Outcome::status(s);
                }
                let data = &self.bounce[..4096];
                let u64_at =
                    |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap_or_default());
                let (nsze, ncap) = (u64_at(0), u64_at(8));
                let (flbas, dps, nmic) = (data[26], data[29], data[30]);
                let created = (|| {
                    let shift = *CREATE_FORMATS
                        .get(usize::from(flbas & 0xf))
                        .ok_or(NsError::InvalidFormat)?;
                    if dps != 0 || nmic > 1 || flbas & 0x10 != 0 {
                        return Err(NsError::InvalidField);
                    }
                    if ncap != nsze {
                        return Err(NsError::ThinProvisioning);
                    }
                    let size = nsze.checked_mul(1 << shift).ok_or(NsError::InvalidField)?;
                    sub.create(size, shift, nmic == 1, tag)
                })();
                match created {
                    Ok(nsid) => Outcome::Done(Status::SUCCESS, nsid),
                    Err(e) => {
                        log::info!("{}: namespace create refused: {e}", self.cfg.serial);
                        Outcome::status(e.status())
                    }
                }
            }
            SEL_DELETE => {
                let nsid = sqe.nsid.get();
                if nsid == 0 {
                    return Outcome::status(Status::INVALID_NAMESPACE);
                }
                match sub.delete(nsid, self.cfg.cntlid, tag) {
                    Ok(mine) => {
                        self.apply_all(mine);
                        Outcome::status(Status::SUCCESS)
                    }
                    Err(e) => Outcome::status(e.status()),
                }
            }
            _ => Outcome::status(Status::INVALID_FIELD),
        }
    }

    /// Namespace Attachment (15h): attach or detach a namespace to a list of controllers.
    pub(crate) fn namespace_attachment(
        &mut self,
        slot: u16,
        sqe: &Submission,
        mem: &MemoryMap,
    ) -> Outcome {
        let Some(sub) = self.cfg.subsystem.clone() else {
            return Outcome::status(Status::INVALID_OPCODE);
        };
        if !self.cfg.namespace_management {
            return Outcome::status(Status::INVALID_OPCODE);
        }
        let tag = self.command_tag(slot, sqe);
        if let Some(done) = self.applied_before(&*sub, tag) {
            return done;
        }
        let nsid = sqe.nsid.get();
        if nsid == 0 || nsid == u32::MAX {
            return Outcome::status(Status::INVALID_NAMESPACE);
        }
        let sel = sqe.cdw10.get() & 0xf;
        if sel != SEL_ATTACH && sel != SEL_DETACH {
            return Outcome::status(Status::INVALID_FIELD);
        }
        let s = self.copy_from_host(sqe, 4096, mem, false);
        if !s.is_success() {
            return Outcome::status(s);
        }
        // Controller List (Figure 137): count, then that many CNTLIDs (at most 2047)
        let n = usize::from(u16::from_le_bytes([self.bounce[0], self.bounce[1]]));
        if n > 2047 {
            return Outcome::status(NsError::ControllerListInvalid.status());
        }
        let ids: Vec<u16> = (0..n)
            .map(|k| u16::from_le_bytes([self.bounce[2 + 2 * k], self.bounce[3 + 2 * k]]))
            .collect();
        let r = if sel == SEL_ATTACH {
            sub.attach(nsid, &ids, self.cfg.cntlid, tag)
        } else {
            sub.detach(nsid, &ids, self.cfg.cntlid, tag)
        };
        match r {
            Ok(mine) => {
                self.apply_all(mine);
                Outcome::status(Status::SUCCESS)
            }
            Err(e) => {
                log::info!(
                    "{}: namespace {nsid} attachment refused: {e}",
                    self.cfg.serial
                );
                Outcome::status(e.status())
            }
        }
    }

    /// The journal's tag of the admin command in `slot` (none without a journal).
    fn command_tag(&self, slot: u16, sqe: &Submission) -> Option<CommandTag> {
        let rec = self.journal.as_ref()?.slot(0, slot)?;
        Some(CommandTag {
            seq: rec.seq,
            sq_pos: rec.sq_pos,
            cid: sqe.cid.get(),
            opcode: sqe.opcode,
        })
    }

    /// The answer of a change command the last worker made and saved but did not complete:
    /// this is its second run (after a crash), which changes nothing again.
    fn applied_before(&self, sub: &dyn NvmSubsystem, tag: Option<CommandTag>) -> Option<Outcome> {
        if !self.reissuing {
            return None;
        }
        let tag = tag?;
        let dw0 = sub.applied(tag)?;
        log::info!(
            "{}: admin command {:#04x} (cid {}) was applied before the last worker died: \
             answered as then",
            self.cfg.serial,
            tag.opcode,
            tag.cid
        );
        Some(Outcome::Done(Status::SUCCESS, dw0))
    }

    /// Apply the changes the subsystem handed back for this controller itself (it has no
    /// reactor to post them to), in order.
    fn apply_all(&mut self, changes: Vec<NamespaceChange>) {
        for c in changes {
            self.apply(c);
        }
    }

    /// Take namespace `ns` (in NSID order); its NSID.
    fn take_namespace(&mut self, ns: Namespace) -> u32 {
        let nsid = ns.nsid;
        match self.namespaces.binary_search_by_key(&nsid, |n| n.nsid) {
            Ok(i) => {
                // not expected (changes arrive in order): the old one's requests finish on
                // their own, its handle goes then
                self.detach_namespace(i);
                self.namespaces.insert(i, ns);
            }
            Err(i) => self.namespaces.insert(i, ns),
        }
        self.namespaces_changed();
        log::info!("{}: namespace {nsid} attached", self.cfg.serial);
        nsid
    }

    /// Let go of namespace `nsid`; false when this controller does not have it.
    fn let_go_namespace(&mut self, nsid: u32) -> bool {
        let Some(i) = self.namespace_index(nsid) else {
            return false;
        };
        self.detach_namespace(i);
        log::info!("{}: namespace {nsid} detached", self.cfg.serial);
        true
    }

    /// Apply a change of this controller's namespaces made in the subsystem: take a new
    /// namespace, or take a detached one out of the host's view (its requests in flight
    /// finish on their own, then its backend handle is dropped). The host hears of it
    /// through the Changed Namespace List and, when enabled, an asynchronous event.
    pub fn apply(&mut self, change: NamespaceChange) {
        let nsid = match change {
            NamespaceChange::Attach(ns) => self.take_namespace(ns),
            NamespaceChange::Detach(nsid) => {
                if !self.let_go_namespace(nsid) {
                    return;
                }
                nsid
            }
            NamespaceChange::Settle(SettleChange::Attach(ns)) => {
                self.take_namespace(ns);
                return;
            }
            NamespaceChange::Settle(SettleChange::Detach(nsid)) => {
                self.let_go_namespace(nsid);
                return;
            }
        };
        self.admin.changed_ns.record(nsid);
        if self.is_ready() && self.admin.features.async_event_config & NS_ATTRIBUTE_NOTICES != 0 {
            let mem = self.mem.snapshot();
            self.raise_event(NS_ATTRIBUTE_CHANGED, &mem);
        }
    }
}
