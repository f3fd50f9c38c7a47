//! The slow state of a controller's journal (`snapshot.rs`): a little-endian, versioned
//! record of the registers, features, queue geometry, shadow doorbell addresses, the admin
//! completion being posted, the QoS limits, the SMART counters and error log, and the
//! asynchronous event state (an event raised before an upgrade reaches the host once, after
//! it), a primary's SR-IOV assignments and the statistics (`snapshot_stats.rs`); encoded
//! here, and decoded from untrusted bytes with every length and index checked. Version 6;
//! blobs of versions 1 to 5 (without the QoS limits, the logs, the events, the SR-IOV state,
//! the statistics) still load.

use zerocopy::{FromBytes, IntoBytes};

use crate::journal;
use crate::queue::{CompletionQueue, SubmissionQueue};
use crate::shadow_doorbell::ShadowDoorbells;
use crate::state::features::Features;

use super::Controller;
use super::snapshot_codec::{R, W};

const VERSION: u32 = 6;
/// The versions before the QoS limits, the logs, the events and then the SR-IOV state were
/// carried (still read).
const VERSION_NO_QOS: u32 = 1;
const VERSION_NO_LOGS: u32 = 2;
const VERSION_NO_EVENTS: u32 = 3;
const VERSION_NO_VIRT: u32 = 4;
const VERSION_NO_STATS: u32 = 5;
/// Secondaries carried at most (a PF's VFs).
const MAX_SECONDARIES: usize = 256;
/// Queued events carried at most (each type/information pair is queued once).
const MAX_QUEUED_EVENTS: usize = 32;

/// The journal's view of an admin completion being posted (part of the blob).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PendingAdmin {
    pub(super) slot: u16,
    pub(super) sq_pos: u32,
    pub(super) cq_pos: u32,
    pub(super) phase: bool,
    pub(super) cqe: [u8; 16],
}

/// The decoded slow state.
pub(super) struct Blob {
    pub(super) cc: u32,
    pub(super) csts: u32,
    pub(super) aqa: u32,
    pub(super) asq: u64,
    pub(super) acq: u64,
    pub(super) intms: u32,
    pub(super) page_size: u64,
    pub(super) features: Features,
    pub(super) shadow: Option<ShadowDoorbells>,
    /// id, base, size, vector, interrupts enabled
    pub(super) cqs: Vec<(u16, u64, u32, u16, bool)>,
    /// id, base, size, cqid
    pub(super) sqs: Vec<(u16, u64, u32, u16)>,
    pub(super) pending: Option<PendingAdmin>,
    /// QoS limits (none in a version 1 blob: the configuration's stay).
    pub(super) qos: Option<crate::qos::QosLimits>,
    /// SMART counters and error log (none before version 3).
    pub(super) logs: Option<SavedLogs>,
    /// Asynchronous event state (none before version 4).
    pub(super) events: Option<SavedEvents>,
    /// A primary's SR-IOV assignments (none before version 5, or for another controller).
    pub(super) virt: Option<crate::virt_link::SavedVirt>,
    /// The statistics (none before version 6).
    pub(super) stats: Option<super::snapshot_stats::SavedStats>,
}

/// The asynchronous event state as saved.
pub(super) struct SavedEvents {
    pub(super) masked: u8,
    pub(super) queued: Vec<crate::state::async_events::AsyncEvent>,
    pub(super) changed_overflow: bool,
    pub(super) changed: Vec<u32>,
    pub(super) pool_warning: Option<u8>,
}

/// The SMART counters and the error log as saved.
pub(super) struct SavedLogs {
    pub(super) bytes_read: u64,
    pub(super) bytes_written: u64,
    pub(super) reads: u64,
    pub(super) writes: u64,
    pub(super) power_on_secs: u64,
    pub(super) errors: u64,
    /// Newest first.
    pub(super) entries: Vec<nvme_spec::log_page::ErrorLogEntry>,
}
/// A primary's SR-IOV assignments, after their presence byte.
fn encode_virt(w: &mut W, v: &crate::virt_link::SavedVirt) {
    w.u16(v.vq_primary);
    w.u16(v.vi_primary);
    let n = v.secondaries.len().min(MAX_SECONDARIES);
    w.u16(n as u16);
    for s in v.secondaries.iter().take(n) {
        w.u16(s.scid);
        w.u16(s.nvq);
        w.u16(s.nvi);
        w.u8(u8::from(s.online));
    }
}

/// [`encode_virt`]'s record back (the pools check the values when they take them).
fn decode_virt(r: &mut R<'_>) -> Option<crate::virt_link::SavedVirt> {
    let (vq_primary, vi_primary) = (r.u16()?, r.u16()?);
    let n = r.u16()? as usize;
    if n > MAX_SECONDARIES {
        return None;
    }
    let mut secondaries = Vec::with_capacity(n);
    for _ in 0..n {
        secondaries.push(crate::virt_link::SavedSecondary {
            scid: r.u16()?,
            nvq: r.u16()?,
            nvi: r.u16()?,
            online: r.u8()? != 0,
        });
    }
    Some(crate::virt_link::SavedVirt {
        vq_primary,
        vi_primary,
        secondaries,
    })
}

impl Controller {
    pub(super) fn encode(&self, pending: Option<PendingAdmin>) -> Vec<u8> {
        let mut w = W::default();
        w.u32(VERSION);
        w.u32(self.regs.cc.0);
        w.u32(self.regs.csts.0);
        w.u32(self.regs.aqa.0);
        w.u64(self.regs.asq);
        w.u64(self.regs.acq);
        w.u32(self.regs.intms);
        w.u64(self.page_size);
        let f = &self.admin.features;
        w.u32(f.arbitration);
        w.u32(f.power_state);
        w.u16(f.temp_over);
        w.u16(f.temp_under);
        w.u32(f.error_recovery);
        w.u8(u8::from(f.write_cache));
        let (granted, (sqs, cqs)) = (f.queues.is_some(), f.queues.unwrap_or_default());
        w.u8(u8::from(granted));
        w.u16(sqs);
        w.u16(cqs);
        w.u16(f.max_queues);
        w.u32(f.coalescing);
        w.u8(u8::from(f.coalescing_adaptive));
        w.u16(f.vector_cd.len() as u16);
        for &b in &f.vector_cd {
            w.u8(u8::from(b));
        }
        w.u32(f.write_atomicity);
        w.u32(f.async_event_config);
        w.u32(f.keep_alive_ms);
        w.u32(f.lba_status_interval);
        w.bytes(&f.host_behavior);
        match &self.shadow {
            Some(s) => {
                w.u8(1);
                w.u64(s.shadow);
                w.u64(s.event_idx);
            }
            None => w.u8(0),
        }
        let cqs: Vec<&CompletionQueue> = self
            .queues
            .active_cqs
            .iter()
            .filter_map(|&id| self.queues.cq(id))
            .collect();
        w.u16(cqs.len() as u16);
        for c in cqs {
            w.u16(c.id);
            w.u64(c.base);
            w.u32(c.size);
            w.u16(c.vector);
            w.u8(u8::from(c.irq_enabled));
        }
        let sqs: Vec<&SubmissionQueue> = self
            .queues
            .active_sqs
            .iter()
            .filter_map(|&id| self.queues.sq(id))
            .collect();
        w.u16(sqs.len() as u16);
        for s in sqs {
            w.u16(s.id);
            w.u64(s.base);
            w.u32(s.size);
            w.u16(s.cqid);
        }
        match pending {
            Some(p) => {
                w.u8(1);
                w.u16(p.slot);
                w.u32(p.sq_pos);
                w.u32(p.cq_pos);
                w.u8(u8::from(p.phase));
                w.bytes(&p.cqe);
            }
            None => w.u8(0),
        }
        let q = self.qos_control.get();
        w.u64(q.iops.unwrap_or(0));
        w.u64(q.bytes_per_sec.unwrap_or(0));
        let s = &self.admin.smart;
        w.u64(s.bytes_read);
        w.u64(s.bytes_written);
        w.u64(s.reads);
        w.u64(s.writes);
        w.u64(s.power_on_secs());
        w.u64(self.admin.errors.count);
        w.u16(self.admin.errors.entries.len() as u16);
        for e in &self.admin.errors.entries {
            w.bytes(e.as_bytes());
        }
        let ev = &self.admin.events;
        w.u8(ev.masked);
        let queued = ev.queued.len().min(MAX_QUEUED_EVENTS);
        w.u8(queued as u8);
        for e in ev.queued.iter().take(queued) {
            w.u8(e.event_type);
            w.u8(e.info);
            w.u8(e.log_page);
        }
        let ch = &self.admin.changed_ns;
        w.u8(u8::from(ch.overflow));
        w.u16(ch.nsids.len() as u16);
        for &n in &ch.nsids {
            w.u32(n);
        }
        w.u8(u8::from(self.admin.pool_warning.is_some()));
        w.u8(self.admin.pool_warning.unwrap_or(0));
        if let Some(crate::virt_link::VirtRole::Primary(pools)) = &self.cfg.virt {
            w.u8(1);
            encode_virt(&mut w, &pools.save());
        } else {
            w.u8(0);
        }
        self.encode_stats(&mut w);
        w.0
    }

    #[allow(clippy::many_single_char_names)]
    pub(super) fn decode(&self, b: &[u8]) -> Option<Blob> {
        let mut r = R(b);
        let version = r.u32()?;
        if ![
            VERSION,
            VERSION_NO_QOS,
            VERSION_NO_LOGS,
            VERSION_NO_EVENTS,
            VERSION_NO_VIRT,
            VERSION_NO_STATS,
        ]
        .contains(&version)
        {
            return None;
        }
        let (cc, csts, aqa, asq, acq, intms, page_size) = (
            r.u32()?,
            r.u32()?,
            r.u32()?,
            r.u64()?,
            r.u64()?,
            r.u32()?,
            r.u64()?,
        );
        let mut f = Features::new(self.cfg.max_io_queues, self.cfg.irq_coalescing.dword());
        f.arbitration = r.u32()?;
        f.power_state = r.u32()?;
        f.temp_over = r.u16()?;
        f.temp_under = r.u16()?;
        f.error_recovery = r.u32()?;
        f.write_cache = r.u8()? != 0;
        let (has_q, a, bq) = (r.u8()?, r.u16()?, r.u16()?);
        f.queues = (has_q != 0).then_some((a, bq));
        f.max_queues = r.u16()?.min(self.cfg.max_io_queues.max(1));
        f.coalescing = r.u32()?;
        f.coalescing_adaptive = r.u8()? != 0;
        let n = r.u16()? as usize;
        let cd = r.take(n)?;
        for (i, &v) in cd.iter().enumerate().take(f.vector_cd.len()) {
            f.vector_cd[i] = v != 0;
        }
        f.write_atomicity = r.u32()?;
        f.async_event_config = r.u32()?;
        f.keep_alive_ms = r.u32()?;
        f.lba_status_interval = r.u32()?;
        f.host_behavior.copy_from_slice(r.take(512)?);
        let shadow = if r.u8()? != 0 {
            Some(ShadowDoorbells {
                shadow: r.u64()?,
                event_idx: r.u64()?,
            })
        } else {
            None
        };
        let cap = self.queues.capacity();
        let max_entries = u32::from(self.cfg.mqes) + 1;
        let ok_size = |s: u32| (2..=max_entries).contains(&s) && s as usize <= journal::SLOTS;
        let mut cqs = Vec::new();
        for _ in 0..r.u16()? {
            let q = (r.u16()?, r.u64()?, r.u32()?, r.u16()?, r.u8()? != 0);
            if (q.0 as usize) >= cap
                || !ok_size(q.2)
                || cqs.iter().any(|c: &(u16, _, _, _, _)| c.0 == q.0)
            {
                return None;
            }
            cqs.push(q);
        }
        let mut sqs = Vec::new();
        for _ in 0..r.u16()? {
            let q = (r.u16()?, r.u64()?, r.u32()?, r.u16()?);
            if (q.0 as usize) >= cap
                || !ok_size(q.2)
                || !cqs.iter().any(|c| c.0 == q.3)
                || sqs.iter().any(|s: &(u16, _, _, _)| s.0 == q.0)
            {
                return None;
            }
            sqs.push(q);
        }
        let pending = if r.u8()? != 0 {
            let (slot, sq_pos, cq_pos, phase) = (r.u16()?, r.u32()?, r.u32()?, r.u8()? != 0);
            let cqe: [u8; 16] = r.take(16)?.try_into().ok()?;
            Some(PendingAdmin {
                slot,
                sq_pos,
                cq_pos,
                phase,
                cqe,
            })
        } else {
            None
        };
        let qos = if version >= VERSION_NO_LOGS {
            let n = |v: u64| (v != 0).then_some(v);
            Some(crate::qos::QosLimits {
                iops: n(r.u64()?),
                bytes_per_sec: n(r.u64()?),
            })
        } else {
            None
        };
        let logs = if version >= VERSION_NO_EVENTS {
            let (bytes_read, bytes_written, reads, writes, power_on_secs, errors) =
                (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let n = r.u16()? as usize;
            if n > crate::state::logs::ERROR_LOG_ENTRIES {
                return None;
            }
            let mut entries = Vec::with_capacity(n);
            for _ in 0..n {
                entries
                    .push(nvme_spec::log_page::ErrorLogEntry::read_from_bytes(r.take(64)?).ok()?);
            }
            Some(SavedLogs {
                bytes_read,
                bytes_written,
                reads,
                writes,
                power_on_secs,
                errors,
                entries,
            })
        } else {
            None
        };
        let events = if version >= VERSION_NO_VIRT {
            let masked = r.u8()?;
            let n = r.u8()? as usize;
            if n > MAX_QUEUED_EVENTS {
                return None;
            }
            let mut queued = Vec::with_capacity(n);
            for _ in 0..n {
                queued.push(crate::state::async_events::AsyncEvent {
                    event_type: r.u8()?,
                    info: r.u8()?,
                    log_page: r.u8()?,
                });
            }
            let changed_overflow = r.u8()? != 0;
            let n = r.u16()? as usize;
            if n > crate::state::changed_namespaces::CHANGED_LIST_MAX {
                return None;
            }
            let mut changed = Vec::with_capacity(n);
            for _ in 0..n {
                changed.push(r.u32()?);
            }
            let (has_warning, warning) = (r.u8()? != 0, r.u8()?);
            Some(SavedEvents {
                masked,
                queued,
                changed_overflow,
                changed,
                pool_warning: has_warning.then_some(warning),
            })
        } else {
            None
        };
        let virt = if version >= VERSION_NO_STATS && r.u8()? != 0 {
            Some(decode_virt(&mut r)?)
        } else {
            None
        };
        let stats = if version >= VERSION {
            Some(super::snapshot_stats::decode(&mut r)?)
        } else {
            None
        };
        (page_size.is_power_of_two() && (4096..=1 << 16).contains(&page_size)).then_some(Blob {
            cc,
            csts,
            aqa,
            asq,
            acq,
            intms,
            page_size,
            features: f,
            shadow,
            cqs,
            sqs,
            pending,
            qos,
            logs,
            events,
            virt,
            stats,
        })
    }
}
