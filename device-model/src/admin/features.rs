//! Get / Set Features (NVMe base 2.0 §5.27): the features every controller implements
//! (01h-0Bh), Keep Alive Timer (0Fh), LBA Status Information Report Interval (15h, with Get
//! LBA Status) and Host Behavior Support (16h).
//!
//! Any other Feature Identifier is not supported and gets Invalid Field in Command (base 2.0
//! §5.27.1), as QEMU's controller answers: Autonomous Power State Transition (0Ch; Identify
//! APSTA is 0), Timestamp (0Eh; ONCS bit 6 is 0) and the vendor specific ones (C0h-FFh)
//! among them. No feature is saveable (ONCS bit 4 is 0): Set with SV is Feature Identifier
//! Not Saveable, and Get with Select = saved returns the default value.

use nvme_spec::features::{self as fid, select};
use nvme_spec::log_page::lid;
use nvme_spec::{Status, Submission};

use crate::admin::view::ControllerView;
use crate::controller::{Controller, Outcome};
use crate::memory::MemoryMap;
use crate::state::async_events::{AsyncEvent, event_type, smart_info};
use crate::state::features::Features;

/// What Get Features returns: completion dword 0 and, for the features with a data
/// structure (LBA Range Type, Host Behavior Support), the bytes for the host buffer.
#[derive(Debug)]
pub(crate) struct FeatureValue {
    pub dw0: u32,
    pub data: Option<Vec<u8>>,
}

impl FeatureValue {
    fn dw0(dw0: u32) -> Self {
        Self { dw0, data: None }
    }
}

/// Get Features (§5.27.1): the value `sqe` selects, from `current` or the defaults, read
/// from the controller's view.
pub(crate) fn get_features(
    view: ControllerView<'_>,
    current: &Features,
    sqe: &Submission,
) -> Result<FeatureValue, Status> {
    let cdw10 = sqe.cdw10.get();
    let id = cdw10 as u8;
    let sel = ((cdw10 >> 8) & 7) as u8;
    let defaults;
    let f = match sel {
        select::CURRENT => current,
        // nothing is saveable: the saved value is the default one
        select::DEFAULT | select::SAVED => {
            defaults = Features::new(view.cfg.max_io_queues, view.cfg.irq_coalescing.dword());
            &defaults
        }
        select::SUPPORTED_CAPABILITIES => {
            // changeable (bit 2); none saveable; LBA Range Type is namespace specific (bit 1)
            return match id {
                fid::ARBITRATION..=fid::ASYNC_EVENT_CONFIG
                | fid::KEEP_ALIVE_TIMER
                | fid::LBA_STATUS_INFO_REPORT_INTERVAL
                | fid::HOST_BEHAVIOR => {
                    let ns_specific =
                        u32::from(id == fid::LBA_RANGE_TYPE || id == fid::ERROR_RECOVERY) << 1;
                    let changeable = u32::from(id != fid::LBA_RANGE_TYPE) << 2;
                    Ok(FeatureValue::dw0(ns_specific | changeable))
                }
                _ => Err(Status::INVALID_FIELD),
            };
        }
        _ => return Err(Status::INVALID_FIELD),
    };
    let dw0 = match id {
        fid::ARBITRATION => f.arbitration,
        fid::POWER_MANAGEMENT => f.power_state,
        fid::LBA_RANGE_TYPE => {
            let nsid = sqe.nsid.get();
            let Some(i) = view
                .namespace_index(nsid)
                .or(if nsid == 0 || nsid == u32::MAX {
                    Some(0)
                } else {
                    None
                })
            else {
                return Err(Status::INVALID_NAMESPACE);
            };
            let Some(ns) = view.namespaces.get(i) else {
                return Err(Status::INVALID_NAMESPACE);
            };
            // one entry: general purpose, may be overwritten, covering the namespace
            let mut entry = [0u8; 64];
            entry[1] = 0x01;
            entry[16..24].copy_from_slice(&(ns.blocks() - 1).to_le_bytes());
            return Ok(FeatureValue {
                dw0: 0,
                data: Some(entry.to_vec()),
            });
        }
        fid::TEMPERATURE_THRESHOLD => {
            let cdw11 = sqe.cdw11.get();
            let tmpsel = (cdw11 >> 16) & 0xf;
            let thsel = (cdw11 >> 20) & 3;
            if thsel > 1 || (tmpsel != 0 && tmpsel != 0xf) {
                return Err(Status::INVALID_FIELD);
            }
            let v = if thsel == 0 {
                f.temp_over
            } else {
                f.temp_under
            };
            u32::from(v) | (cdw11 & 0x003f_0000)
        }
        fid::ERROR_RECOVERY => f.error_recovery,
        fid::VOLATILE_WRITE_CACHE => u32::from(f.write_cache),
        fid::NUMBER_OF_QUEUES => {
            let (sq, cq) = f.granted();
            u32::from(sq) | (u32::from(cq) << 16)
        }
        fid::INTERRUPT_COALESCING => f.coalescing,
        fid::INTERRUPT_VECTOR_CONFIG => {
            // any vector of the MSI-X table; the admin queue's (0) is never coalesced,
            // so it reads CD = 1 (as QEMU's controller reports it)
            let iv = sqe.cdw11.get() & 0xffff;
            match f.vector_cd.get(iv as usize) {
                Some(&cd) => iv | (u32::from(cd || iv == 0) << 16),
                None => return Err(Status::INVALID_FIELD),
            }
        }
        fid::WRITE_ATOMICITY => f.write_atomicity,
        fid::ASYNC_EVENT_CONFIG => f.async_event_config,
        fid::KEEP_ALIVE_TIMER => f.keep_alive_ms,
        fid::LBA_STATUS_INFO_REPORT_INTERVAL => f.lba_status_interval,
        fid::HOST_BEHAVIOR => {
            return Ok(FeatureValue {
                dw0: 0,
                data: Some(f.host_behavior.to_vec()),
            });
        }
        _ => return Err(Status::INVALID_FIELD),
    };
    Ok(FeatureValue::dw0(dw0))
}

impl Controller {
    pub(crate) fn set_features(&mut self, sqe: &Submission, mem: &MemoryMap) -> Outcome {
        let cdw10 = sqe.cdw10.get();
        let cdw11 = sqe.cdw11.get();
        let id = cdw10 as u8;
        if cdw10 >> 31 != 0 {
            return Outcome::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let f = &mut self.admin.features;
        match id {
            fid::ARBITRATION => f.arbitration = cdw11,
            fid::POWER_MANAGEMENT => {
                if cdw11 & 0x1f != 0 {
                    return Outcome::status(Status::INVALID_FIELD); // only power state 0 exists
                }
                f.power_state = cdw11 & 0xff;
            }
            fid::LBA_RANGE_TYPE => return Outcome::status(Status::FEATURE_NOT_CHANGEABLE),
            fid::TEMPERATURE_THRESHOLD => {
                let tmpsel = (cdw11 >> 16) & 0xf;
                let thsel = (cdw11 >> 20) & 3;
                if thsel > 1 || (tmpsel != 0 && tmpsel != 0xf) {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                if thsel == 0 {
                    f.temp_over = cdw11 as u16;
                } else {
                    f.temp_under = cdw11 as u16;
                }
            }
            fid::ERROR_RECOVERY => {
                if cdw11 & (1 << 16) != 0 {
                    return Outcome::status(Status::INVALID_FIELD); // DULBE not supported
                }
                f.error_recovery = cdw11 & 0xffff;
            }
            fid::VOLATILE_WRITE_CACHE => f.write_cache = cdw11 & 1 != 0,
            fid::NUMBER_OF_QUEUES => {
                let nsq = cdw11 & 0xffff;
                let ncq = cdw11 >> 16;
                if nsq == 0xffff || ncq == 0xffff {
                    return Outcome::status(Status::INVALID_FIELD);
                }
                if self.queues.has_io_queues() {
                    // §5.27.1.5: only valid before any I/O queue exists
                    return Outcome::status(Status::COMMAND_SEQUENCE_ERROR);
                }
                let max = u32::from(f.max_queues - 1);
                let granted = (nsq.min(max) as u16, ncq.min(max) as u16);
                f.queues = Some(granted);
                return Outcome::Done(
                    Status::SUCCESS,
                    u32::from(granted.0) | (u32::from(granted.1) << 16),
                );
            }
            fid::INTERRUPT_COALESCING => {
                f.coalescing = cdw11 & 0xffff;
                f.coalescing_adaptive = false;
            }
            fid::INTERRUPT_VECTOR_CONFIG => {
                // §5.27.1.10: IV is any vector of the MSI-X table (Get Features reads back
                // CD); the admin queue's vector is never coalesced, so IV 0 is Invalid Field
                let iv = (cdw11 & 0xffff) as usize;
                match f.vector_cd.get_mut(iv) {
                    Some(cd) if iv != 0 => *cd = cdw11 & (1 << 16) != 0,
                    _ => return Outcome::status(Status::INVALID_FIELD),
                }
            }
            fid::WRITE_ATOMICITY => f.write_atomicity = cdw11 & 1,
            fid::ASYNC_EVENT_CONFIG => f.async_event_config = cdw11,
            fid::KEEP_ALIVE_TIMER => {
                // rounded up to the Keep Alive granularity; Get Features reports the result
                let g = crate::admin::keep_alive::KEEP_ALIVE_GRANULARITY_MS;
                f.keep_alive_ms = cdw11.div_ceil(g).saturating_mul(g);
                self.admin.keep_alive_since = None;
            }
            // LSIRI and LSIPI: kept and read back; no LBA Status Information Alert is sent
            // (the set of uncorrectable blocks changes only by the host's own commands)
            fid::LBA_STATUS_INFO_REPORT_INTERVAL => f.lba_status_interval = cdw11,
            fid::HOST_BEHAVIOR => {
                let s = self.copy_from_host(sqe, 512, mem, false);
                if !s.is_success() {
                    return Outcome::status(s);
                }
                let mut hb = [0u8; 512];
                hb.copy_from_slice(&self.bounce[..512]);
                self.admin.features.host_behavior = hb;
            }
            _ => return Outcome::status(Status::INVALID_FIELD),
        }
        if matches!(id, fid::TEMPERATURE_THRESHOLD | fid::ASYNC_EVENT_CONFIG) {
            self.check_temperature(mem);
        }
        Outcome::status(Status::SUCCESS)
    }

    fn check_temperature(&mut self, mem: &MemoryMap) {
        const TEMPERATURE_WARNING: u32 = 1 << 1;
        if self.admin.features.temperature_warning()
            && self.admin.features.async_event_config & TEMPERATURE_WARNING != 0
        {
            self.raise_event(
                AsyncEvent {
                    event_type: event_type::SMART,
                    info: smart_info::TEMPERATURE_THRESHOLD,
                    log_page: lid::SMART_HEALTH,
                },
                mem,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use nvme_spec::Status;

    use crate::test_harness::{DATA, Harness, sqe};

    const GET_LOG_PAGE: u8 = 0x02;
    const SET_FEATURES: u8 = 0x09;
    const GET_FEATURES: u8 = 0x0a;
    const OUT: u64 = DATA + 0x20000;

    fn admin_run(h: &mut Harness, s: [u8; 64]) -> Status {
        let c = h.admin(s);
        h.admin_wait(c)
    }

    /// Features a stock OS probes: Interrupt Vector Configuration for any vector of the
    /// MSI-X table but the admin one, Get after Set, saved = default; Autonomous Power State
    /// Transition (0Ch) and vendor specific features and log pages are not supported.
    #[test]
    fn feature_and_log_identifiers_a_stock_os_probes() {
        let mut h = Harness::new(vec![]);
        let set = |h: &mut Harness, fid: u32, cdw11: u32| {
            admin_run(h, sqe(SET_FEATURES, 0, 0, &[fid, cdw11]))
        };
        let get = |h: &mut Harness, cdw10: u32, cdw11: u32| {
            admin_run(h, sqe(GET_FEATURES, 0, 0, &[cdw10, cdw11]))
        };
        assert_eq!(set(&mut h, 9, 1 | (1 << 16)), Status::SUCCESS, "IV 1, CD");
        assert!(h.ctrl.admin.features.vector_cd[1]);
        let last = u32::from(crate::pci::MSIX_VECTORS - 1);
        assert_eq!(
            set(&mut h, 9, last),
            Status::SUCCESS,
            "the last MSI-X vector"
        );
        assert_eq!(
            set(&mut h, 9, last + 1),
            Status::INVALID_FIELD,
            "past the table"
        );
        assert_eq!(
            set(&mut h, 9, 1 << 16),
            Status::INVALID_FIELD,
            "the admin vector"
        );
        assert_eq!(get(&mut h, 9, last + 1), Status::INVALID_FIELD);
        assert_eq!(set(&mut h, 8, 0x0a03), Status::SUCCESS);
        for fid in [0x0c, 0x0e, 0xc0, 0xff] {
            assert_eq!(get(&mut h, fid, 0), Status::INVALID_FIELD, "Get {fid:#x}");
            assert_eq!(get(&mut h, fid | (3 << 8), 0), Status::INVALID_FIELD);
            assert_eq!(set(&mut h, fid, 1), Status::INVALID_FIELD, "Set {fid:#x}");
        }
        for lid in [0x0c_u32, 0xc0, 0xca, 0xff] {
            let st = admin_run(&mut h, sqe(GET_LOG_PAGE, 0, OUT, &[lid | (127 << 16)]));
            assert_eq!(st, Status::INVALID_LOG_PAGE, "log {lid:#x}");
        }
        assert_eq!(set(&mut h, 0x15, 0x0005_0003), Status::SUCCESS);
        assert_eq!(h.ctrl.admin.features.lba_status_interval, 0x0005_0003);
    }
}
