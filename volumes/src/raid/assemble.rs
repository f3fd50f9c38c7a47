//! Creating an array on fresh members, and assembling one from its members' superblocks
//! (after a restart). Both run on the caller's thread, before any reactor owns the array,
//! driving the members' own `submit`/`poll`.
//!
//! Crash-consistent order: creation writes every member's (zeroed) bitmap first and its
//! superblock last (FUA), so a member with a valid superblock always has a valid bitmap;
//! membership changes bump the generation and rewrite the superblocks, and the requests a
//! lost member was absorbed from complete only once that is on disk.

use std::collections::HashMap;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::array::{Array, Member, Parts};
use super::bitmap::{Bitmap, region_size};
use super::control::ArrayHandle;
use super::layout::{Layout, Level};
use super::rebuild::RebuildKind;
use super::status::Shared;
use super::superblock::{
    BITMAP_BYTES, BITMAP_OFFSET, DATA_OFFSET, SB_SIZE, SlotInfo, SlotState, Superblock,
    SuperblockError, new_uuid,
};

/// A member handed to [`create`] or [`assemble`]: its backend and how users named it.
pub struct MemberIn {
    pub describe: String,
    pub backend: Box<dyn Backend>,
}

/// Why an array or a member was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    #[error("{0}")]
    Invalid(String),
    #[error("member {member}: {source}")]
    Superblock {
        member: String,
        source: SuperblockError,
    },
    #[error("member {member} belongs to array {name} ({uuid}), not this one")]
    ForeignArray {
        member: String,
        name: String,
        uuid: String,
    },
    #[error(
        "member {member} is stale: generation {has}, the array is at {want} and lost it at \
         {lost} (re-add it with raid_add_member for a rebuild)"
    )]
    StaleGeneration {
        member: String,
        has: u64,
        want: u64,
        lost: u64,
    },
    #[error("member {member} claims slot {slot}, which another member holds")]
    DuplicateSlot { member: String, slot: usize },
    #[error("member {member} already carries array {name} ({uuid}); delete or wipe it first")]
    InUse {
        member: String,
        name: String,
        uuid: String,
    },
    #[error("member {member}: {size} bytes, at least {need} needed")]
    TooSmall {
        member: String,
        size: u64,
        need: u64,
    },
    #[error("member {member}: I/O failed: {status:?}")]
    Io { member: String, status: Status },
    #[error("array {name}: leg {leg} has no in-sync member; cannot start")]
    Incomplete { name: String, leg: usize },
}

/// How long one synchronous member request may take.
const SYNC_IO: Duration = Duration::from_secs(30);

/// Run one request on `b` over `len` bytes of `buf` and wait for it. A request that does
/// not finish in time leaks `buf` (the backend may still use it).
pub(crate) fn sync_io(
    b: &mut dyn Backend,
    op: IoOp,
    offset: u64,
    buf: IoBuffer,
    len: u64,
) -> (Status, Option<IoBuffer>) {
    let mut list = GuestBufferList::new();
    if matches!(op, IoOp::Read | IoOp::Write { .. }) {
        list.set_range(buf.buffers(), 0, len);
    }
    if let Err(s) = b.submit(&IoRequest {
        tag: 1,
        op,
        offset,
        iov: list.as_buffers(),
    }) {
        return (s, Some(buf));
    }
    let t = Instant::now();
    let mut got = None;
    while got.is_none() {
        b.poll(&mut |_, s| got = Some(s));
        if got.is_none() {
            if t.elapsed() > SYNC_IO {
                std::mem::forget(buf);
                return (Status::INTERNAL_ERROR, None);
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    (got.unwrap_or(Status::INTERNAL_ERROR), Some(buf))
}

fn io_err(member: &str, status: Status) -> ArrayError {
    ArrayError::Io {
        member: member.into(),
        status,
    }
}

/// Read a member's superblock.
pub fn read_superblock(describe: &str, b: &mut dyn Backend) -> Result<Superblock, ArrayError> {
    let (s, buf) = sync_io(b, IoOp::Read, 0, IoBuffer::new(SB_SIZE), SB_SIZE as u64);
    if !s.is_success() {
        return Err(io_err(describe, s));
    }
    let mut raw = vec![0u8; SB_SIZE];
    if let Some(buf) = buf {
        buf.read_at(0, &mut raw);
    }
    Superblock::decode(&raw).map_err(|source| ArrayError::Superblock {
        member: describe.into(),
        source,
    })
}

/// Zero a member's superblock (it no longer belongs to any array).
pub fn wipe(describe: &str, b: &mut dyn Backend) -> Result<(), ArrayError> {
    let (s, _) = sync_io(
        b,
        IoOp::Write { fua: true },
        0,
        IoBuffer::new(SB_SIZE),
        SB_SIZE as u64,
    );
    if s.is_success() {
        Ok(())
    } else {
        Err(io_err(describe, s))
    }
}

fn write_block(
    describe: &str,
    b: &mut dyn Backend,
    offset: u64,
    data: &[u8],
) -> Result<(), ArrayError> {
    let buf = IoBuffer::new(data.len());
    buf.write_at(0, data);
    let (s, _) = sync_io(b, IoOp::Write { fua: true }, offset, buf, data.len() as u64);
    if s.is_success() {
        Ok(())
    } else {
        Err(io_err(describe, s))
    }
}

/// An array with its handle, and the members assembly refused.
pub struct Assembled {
    pub array: Array,
    pub handle: ArrayHandle,
    pub refused: Vec<ArrayError>,
}

fn finish(parts: Parts, rate: u64) -> (Array, ArrayHandle) {
    let (tx, rx) = channel();
    let shared = Shared::new(rate);
    let array = Array::from_parts(parts, rx, shared.clone());
    (array, ArrayHandle { tx, shared })
}

/// Create array `name` of `level` on `members` (strip size in bytes for raid0/raid10),
/// writing a superblock on each. Members that already carry a superblock are refused.
pub fn create(
    name: &str,
    level: Level,
    strip: u64,
    mut members: Vec<MemberIn>,
    rate: u64,
) -> Result<(Array, ArrayHandle), ArrayError> {
    level
        .check_members(members.len())
        .map_err(ArrayError::Invalid)?;
    if name.is_empty() || name.len() > 32 {
        return Err(ArrayError::Invalid(format!(
            "'{name}': an array name is 1 to 32 bytes"
        )));
    }
    if level.striped() && (strip < 4096 || !strip.is_power_of_two() || strip > 16 << 20) {
        return Err(ArrayError::Invalid(format!(
            "strip size {strip}: a power of two from 4 KiB to 16 MiB"
        )));
    }
    let need = DATA_OFFSET + strip.max(1 << 20);
    for m in &mut members {
        let size = m.backend.size();
        if size < need {
            return Err(ArrayError::TooSmall {
                member: m.describe.clone(),
                size,
                need,
            });
        }
        if let Ok(sb) = read_superblock(&m.describe, m.backend.as_mut()) {
            return Err(ArrayError::InUse {
                member: m.describe.clone(),
                name: sb.name,
                uuid: nvme_spec::uuid::format(&sb.uuid),
            });
        }
    }
    // whole 4 KiB blocks of data per member
    let data: Vec<u64> = members
        .iter()
        .map(|m| (m.backend.size() - DATA_OFFSET) & !4095)
        .collect();
    let layout = Layout::new(level, strip, &data);
    let min = data.iter().copied().min().unwrap_or(0);
    let bitmap = Bitmap::new(min, region_size(min, BITMAP_BYTES));
    let slots: Vec<SlotInfo> = (0..members.len())
        .map(|i| SlotInfo {
            state: SlotState::Active,
            data_size: if level == Level::Concat {
                data[i]
            } else {
                layout.leg_size(0)
            },
            lost_gen: 0,
        })
        .collect();
    let mut sb = Superblock {
        uuid: new_uuid(),
        name: name.into(),
        level,
        strip: strip as u32,
        slot: 0,
        generation: 1,
        region_size: bitmap.region(),
        data_offset: DATA_OFFSET,
        slots: slots.clone(),
        specs: members.iter().map(|m| m.describe.clone()).collect(),
    };
    // bitmaps first, superblocks last
    let zero = vec![0u8; bitmap.disk_bytes() as usize];
    if level.mirrored() {
        for m in &mut members {
            write_block(&m.describe, m.backend.as_mut(), BITMAP_OFFSET, &zero)?;
        }
    }
    for (i, m) in members.iter_mut().enumerate() {
        sb.slot = i as u8;
        write_block(&m.describe, m.backend.as_mut(), 0, &sb.encode())?;
    }
    log::info!(
        "array {name}: created, {} over {} members, {} MiB, uuid {}",
        level.name(),
        members.len(),
        layout.size() >> 20,
        nvme_spec::uuid::format(&sb.uuid)
    );
    let members = members
        .into_iter()
        .zip(slots)
        .map(|(m, info)| Member::new(m.describe, Some(m.backend), info))
        .collect();
    Ok(finish(
        Parts {
            name: name.into(),
            uuid: sb.uuid,
            layout,
            generation: 1,
            bitmap,
            members,
        },
        rate,
    ))
}

/// Assemble the array `members` carry (named `name`, if given). Members that are blank,
/// corrupt, from another array, stale or duplicates are refused (listed in the result);
/// the array starts if every leg has an in-sync member, degraded if some are missing, and
/// resynchronizes the regions its bitmap marks dirty in the background.
pub fn assemble(
    name: Option<&str>,
    mut members: Vec<MemberIn>,
    rate: u64,
) -> Result<Assembled, ArrayError> {
    let mut refused = Vec::new();
    let mut found: Vec<(Superblock, MemberIn)> = Vec::new();
    for mut m in members.drain(..) {
        match read_superblock(&m.describe, m.backend.as_mut()) {
            Ok(sb) => found.push((sb, m)),
            Err(e) => refused.push(e),
        }
    }
    // the array: the named one, else the uuid most members carry; its newest superblock
    let mut count: HashMap<[u8; 16], usize> = HashMap::new();
    for (sb, _) in &found {
        if name.is_none_or(|n| n == sb.name) {
            *count.entry(sb.uuid).or_default() += 1;
        }
    }
    let Some((&uuid, _)) = count.iter().max_by_key(|(_, n)| **n) else {
        let why = refused
            .iter()
            .map(ToString::to_string)
            .chain(found.iter().map(|(sb, m)| {
                format!(
                    "member {} belongs to array {} ({})",
                    m.describe,
                    sb.name,
                    nvme_spec::uuid::format(&sb.uuid)
                )
            }))
            .collect::<Vec<_>>()
            .join("; ");
        return Err(ArrayError::Invalid(format!(
            "no member carries array {}: {why}",
            name.unwrap_or("(any)")
        )));
    };
    let newest = found
        .iter()
        .filter(|(sb, _)| sb.uuid == uuid)
        .map(|(sb, _)| sb.clone())
        .max_by_key(|sb| sb.generation)
        .expect("one member at least");
    let n = newest.slots.len();
    let mut slots: Vec<Option<(Superblock, MemberIn)>> = (0..n).map(|_| None).collect();
    for (sb, m) in found {
        if sb.uuid != uuid {
            refused.push(ArrayError::ForeignArray {
                member: m.describe,
                name: sb.name,
                uuid: nvme_spec::uuid::format(&sb.uuid),
            });
            continue;
        }
        let slot = sb.slot as usize;
        let info = newest.slots[slot];
        // stale: behind while its slot is not in sync, or its slot missing, or written last
        // before its slot was lost (the slot in sync now is a member added since)
        if sb.generation < newest.generation && info.state != SlotState::Active
            || info.state == SlotState::Missing
            || info.lost_gen > 0 && sb.generation <= info.lost_gen
        {
            refused.push(ArrayError::StaleGeneration {
                member: m.describe,
                has: sb.generation,
                want: newest.generation,
                lost: info.lost_gen,
            });
            continue;
        }
        match &slots[slot] {
            Some((other, _)) if other.generation >= sb.generation => {
                refused.push(ArrayError::DuplicateSlot {
                    member: m.describe,
                    slot,
                });
            }
            _ => {
                if let Some((_, old)) = slots[slot].take() {
                    refused.push(ArrayError::DuplicateSlot {
                        member: old.describe,
                        slot,
                    });
                }
                slots[slot] = Some((sb, m));
            }
        }
    }
    let data: Vec<u64> = newest.slots.iter().map(|s| s.data_size).collect();
    let layout = Layout::new(newest.level, u64::from(newest.strip), &data);
    let min = data.iter().copied().min().unwrap_or(0);
    let mut bitmap = Bitmap::new(min, newest.region_size.max(1 << 20));
    let mut members = Vec::with_capacity(n);
    let mut recover = Vec::new();
    for (slot, entry) in slots.into_iter().enumerate() {
        let mut info = newest.slots[slot];
        let Some((_, mut m)) = entry else {
            if info.state != SlotState::Missing {
                info.state = SlotState::Missing;
                info.lost_gen = newest.generation;
            }
            let mut missing = Member::new(format!("(slot {slot})"), None, info);
            // keep what the array knows of how to reach it
            missing.spec.clone_from(&newest.specs[slot]);
            members.push(missing);
            continue;
        };
        if newest.level.mirrored() {
            let bytes = bitmap.disk_bytes() as usize;
            let (s, buf) = sync_io(
                m.backend.as_mut(),
                IoOp::Read,
                BITMAP_OFFSET,
                IoBuffer::new(bytes),
                bytes as u64,
            );
            if !s.is_success() {
                refused.push(io_err(&m.describe, s));
                info.state = SlotState::Missing;
                info.lost_gen = newest.generation;
                members.push(Member::new(m.describe, None, info));
                continue;
            }
            let mut raw = vec![0u8; bytes];
            if let Some(buf) = buf {
                buf.read_at(0, &mut raw);
            }
            bitmap.load(&raw);
        }
        if info.state == SlotState::Rebuilding {
            recover.push(slot);
        }
        members.push(Member::new(m.describe, Some(m.backend), info));
    }
    for leg in 0..layout.legs() {
        if !layout
            .slots(leg)
            .any(|s| members[s].state == SlotState::Active && members[s].backend.is_some())
        {
            return Err(ArrayError::Incomplete {
                name: newest.name.clone(),
                leg,
            });
        }
    }
    let (mut array, handle) = finish(
        Parts {
            name: newest.name.clone(),
            uuid,
            layout,
            generation: newest.generation,
            bitmap,
            members,
        },
        rate,
    );
    // a new generation for this assembly, written before any I/O
    array.bump_generation();
    array.poll_until(SYNC_IO, |a| !a.meta_busy());
    if newest.level.mirrored() {
        if array.bitmap.count_set() > 0 {
            log::info!(
                "array {}: {} dirty regions after an unclean stop: resync",
                newest.name,
                array.bitmap.count_set()
            );
            array.queue_rebuild(RebuildKind::Resync);
        }
        for slot in recover {
            array.queue_rebuild(RebuildKind::Recover {
                slot,
                partial: false,
            });
        }
    }
    for e in &refused {
        log::warn!("array {}: {e}", newest.name);
    }
    Ok(Assembled {
        array,
        handle,
        refused,
    })
}
