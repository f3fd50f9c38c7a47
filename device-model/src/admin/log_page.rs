//! Get Log Page (NVMe base 2.0 §5.16): Error Information (01h), SMART / Health (02h),
//! Firmware Slot (03h), Changed Namespace List (04h), Commands Supported and Effects (05h),
//! LBA Status Information (0Eh, [`crate::admin::lba_status`]). Any other identifier, the
//! vendor specific ones (C0h-FFh) included, is Invalid Log Page. The log page offset is
//! honoured.

use nvme_spec::log_page::{CommandsEffectsLog, FirmwareSlotLog, SmartLog, effects, lid};
use nvme_spec::opcode::{admin, nvm};
use nvme_spec::{Status, Submission};
use zerocopy::IntoBytes;

use crate::controller::Controller;
use crate::memory::MemoryMap;
use crate::state::logs::ERROR_LOG_ENTRIES;

fn u128_le(v: u64) -> [u8; 16] {
    u128::from(v).to_le_bytes()
}

impl Controller {
    pub(crate) fn get_log_page(&mut self, sqe: &Submission, mem: &MemoryMap) -> Status {
        let cdw10 = sqe.cdw10.get();
        let id = cdw10 as u8;
        let numd = ((cdw10 >> 16) | ((sqe.cdw11.get() & 0xffff) << 16)) as u64 + 1;
        let len = numd * 4;
        let offset = u64::from(sqe.cdw12.get()) | (u64::from(sqe.cdw13.get()) << 32);
        if offset & 3 != 0 {
            return Status::INVALID_FIELD;
        }
        if len > 1 << 20 {
            return Status::INVALID_FIELD;
        }
        let nsid = sqe.nsid.get();
        let retain_event = cdw10 & (1 << 15) != 0;
        let page: Vec<u8> = match id {
            lid::ERROR_INFORMATION => {
                let mut v = vec![0u8; ERROR_LOG_ENTRIES * 64];
                for (i, e) in self.admin.errors.entries.iter().enumerate() {
                    v[i * 64..(i + 1) * 64].copy_from_slice(e.as_bytes());
                }
                v
            }
            lid::SMART_HEALTH => {
                if nsid != 0 && nsid != u32::MAX && self.namespace_index(nsid).is_none() {
                    return Status::INVALID_NAMESPACE;
                }
                self.smart_log().as_bytes().to_vec()
            }
            lid::CHANGED_NS_LIST => self.admin.changed_ns.page(retain_event),
            lid::LBA_STATUS_INFO => self.lba_status_log(offset.saturating_add(len)),
            lid::FIRMWARE_SLOT => {
                let mut fw = FirmwareSlotLog::default();
                fw.afi = 1;
                let r = self.cfg.firmware.as_bytes();
                fw.frs[0] = [b' '; 8];
                fw.frs[0][..r.len().min(8)].copy_from_slice(&r[..r.len().min(8)]);
                fw.as_bytes().to_vec()
            }
            lid::COMMANDS_EFFECTS => {
                let mut e = CommandsEffectsLog::default();
                for op in [
                    admin::DELETE_IO_SQ,
                    admin::CREATE_IO_SQ,
                    admin::GET_LOG_PAGE,
                    admin::DELETE_IO_CQ,
                    admin::CREATE_IO_CQ,
                    admin::IDENTIFY,
                    admin::ABORT,
                    admin::SET_FEATURES,
                    admin::GET_FEATURES,
                    admin::ASYNC_EVENT_REQUEST,
                    admin::KEEP_ALIVE,
                    admin::DOORBELL_BUFFER_CONFIG,
                    admin::GET_LBA_STATUS,
                ] {
                    e.acs[op as usize] = effects::CSUPP.into();
                }
                e.acs[admin::FORMAT_NVM as usize] =
                    (effects::CSUPP | effects::LBCC | effects::NCC).into();
                if self.cfg.namespace_management {
                    for op in [admin::NS_MANAGEMENT, admin::NS_ATTACHMENT] {
                        e.acs[op as usize] = (effects::CSUPP | effects::NCC | effects::NIC).into();
                    }
                }
                for op in [nvm::FLUSH, nvm::READ, nvm::COMPARE, nvm::VERIFY] {
                    e.iocs[op as usize] = effects::CSUPP.into();
                }
                for op in [
                    nvm::WRITE,
                    nvm::WRITE_ZEROES,
                    nvm::DATASET_MANAGEMENT,
                    nvm::WRITE_UNCORRECTABLE,
                ] {
                    e.iocs[op as usize] = (effects::CSUPP | effects::LBCC).into();
                }
                e.as_bytes().to_vec()
            }
            _ => return Status::INVALID_LOG_PAGE,
        };
        if offset >= page.len() as u64 && offset != 0 {
            return Status::INVALID_FIELD;
        }
        let mut out = vec![0u8; len as usize];
        let src = &page[offset as usize..];
        let n = src.len().min(out.len());
        out[..n].copy_from_slice(&src[..n]);
        let s = self.admin_to_host(sqe, &out, mem);
        if s.is_success() {
            self.log_page_read(id, retain_event);
        }
        s
    }

    fn smart_log(&self) -> SmartLog {
        let s = &self.admin.smart;
        let mut log = SmartLog::default();
        log.temperature = crate::state::features::TEMPERATURE_K.to_le_bytes();
        log.avail_spare = 100;
        log.critical_warning = u8::from(self.temperature_warning()) << 1;
        log.spare_thresh = 10;
        // data units are thousands of 512-byte units, rounded up (§5.16.1.3)
        log.data_units_read = u128_le((s.bytes_read / 512).div_ceil(1000));
        log.data_units_written = u128_le((s.bytes_written / 512).div_ceil(1000));
        log.host_read_commands = u128_le(s.reads);
        log.host_write_commands = u128_le(s.writes);
        log.power_cycles = u128_le(1);
        log.power_on_hours = u128_le(s.started.elapsed().as_secs() / 3600);
        log.num_err_log_entries = u128_le(self.admin.errors.count());
        log.temp_sensor[0] = crate::state::features::TEMPERATURE_K.into();
        log
    }
}
