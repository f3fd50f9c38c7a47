//! Get Log Page (NVMe base 2.0 §5.16): Error Information (01h), SMART / Health (02h),
//! Firmware Slot (03h), Changed Namespace List (04h), Commands Supported and Effects (05h),
//! LBA Status Information (0Eh, [`crate::admin::lba_status`]). Any other identifier, the
//! vendor specific ones (C0h-FFh) included, is Invalid Log Page. The log page offset is
//! honoured.

use nvme_spec::log_page::{CommandsEffectsLog, FirmwareSlotLog, SmartLog, effects, lid};
use nvme_spec::opcode::{admin, nvm};
use nvme_spec::{Status, Submission};
use zerocopy::IntoBytes;

use crate::admin::view::ControllerView;
use crate::state::AdminState;
use crate::state::logs::ERROR_LOG_ENTRIES;

fn u128_le(v: u64) -> [u8; 16] {
    u128::from(v).to_le_bytes()
}

/// A Get Log Page command's fields (§5.16, Figures 197-199).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogRequest {
    pub id: u8,
    pub nsid: u32,
    /// Bytes to return (NUMD, at most 1 MiB).
    pub len: u64,
    /// Byte offset into the page (dword aligned).
    pub offset: u64,
    /// RAE: keep the event of this log page masked.
    pub retain_event: bool,
}

impl LogRequest {
    /// The request `sqe` makes, or Invalid Field for an unaligned offset or a length over
    /// 1 MiB.
    pub(crate) fn parse(sqe: &Submission) -> Result<Self, Status> {
        let cdw10 = sqe.cdw10.get();
        let id = cdw10 as u8;
        let numd = ((cdw10 >> 16) | ((sqe.cdw11.get() & 0xffff) << 16)) as u64 + 1;
        let len = numd * 4;
        let offset = u64::from(sqe.cdw12.get()) | (u64::from(sqe.cdw13.get()) << 32);
        if offset & 3 != 0 {
            return Err(Status::INVALID_FIELD);
        }
        if len > 1 << 20 {
            return Err(Status::INVALID_FIELD);
        }
        Ok(Self {
            id,
            nsid: sqe.nsid.get(),
            len,
            offset,
            retain_event: cdw10 & (1 << 15) != 0,
        })
    }
}

/// The bytes Get Log Page returns for `req` (its `len`, zero padded past the page's end),
/// read from the controller's view and its admin state (reading the Changed Namespace List
/// clears it). The caller unmasks the page's event once the data reached the host.
pub(crate) fn log_page(
    view: ControllerView<'_>,
    admin: &mut AdminState,
    req: &LogRequest,
) -> Result<Vec<u8>, Status> {
    let LogRequest {
        id,
        nsid,
        len,
        offset,
        retain_event,
    } = *req;
    let page: Vec<u8> = match id {
        lid::ERROR_INFORMATION => {
            let mut v = vec![0u8; ERROR_LOG_ENTRIES * 64];
            for (i, e) in admin.errors.entries.iter().enumerate() {
                v[i * 64..(i + 1) * 64].copy_from_slice(e.as_bytes());
            }
            v
        }
        lid::SMART_HEALTH => {
            if nsid != 0 && nsid != u32::MAX && view.namespace_index(nsid).is_none() {
                return Err(Status::INVALID_NAMESPACE);
            }
            smart_log(admin).as_bytes().to_vec()
        }
        lid::CHANGED_NS_LIST => admin.changed_ns.page(retain_event),
        lid::LBA_STATUS_INFO => view.lba_status_log(offset.saturating_add(len)),
        lid::FIRMWARE_SLOT => {
            let mut fw = FirmwareSlotLog::default();
            fw.afi = 1;
            let r = view.cfg.firmware.as_bytes();
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
            if view.cfg.namespace_management {
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
        _ => return Err(Status::INVALID_LOG_PAGE),
    };
    if offset >= page.len() as u64 && offset != 0 {
        return Err(Status::INVALID_FIELD);
    }
    let mut out = vec![0u8; len as usize];
    let src = &page[offset as usize..];
    let n = src.len().min(out.len());
    out[..n].copy_from_slice(&src[..n]);
    Ok(out)
}

/// SMART / Health Information (§5.16.1.3) from the controller's counters.
fn smart_log(admin: &AdminState) -> SmartLog {
    let s = &admin.smart;
    let mut log = SmartLog::default();
    log.temperature = crate::state::features::TEMPERATURE_K.to_le_bytes();
    // a thin pool over its warning threshold shows as spare below threshold (bit 0)
    log.avail_spare = admin.pool_warning.map_or(100, |free| free.min(9));
    log.critical_warning = u8::from(admin.features.temperature_warning()) << 1
        | u8::from(admin.pool_warning.is_some());
    log.spare_thresh = 10;
    // data units are thousands of 512-byte units, rounded up (§5.16.1.3)
    log.data_units_read = u128_le((s.bytes_read / 512).div_ceil(1000));
    log.data_units_written = u128_le((s.bytes_written / 512).div_ceil(1000));
    log.host_read_commands = u128_le(s.reads);
    log.host_write_commands = u128_le(s.writes);
    log.power_cycles = u128_le(1);
    log.power_on_hours = u128_le(s.power_on_secs() / 3600);
    log.num_err_log_entries = u128_le(admin.errors.count());
    log.temp_sensor[0] = crate::state::features::TEMPERATURE_K.into();
    log
}
