//! The superblock every member carries at its start: which array it belongs to (uuid,
//! name), the geometry (level, strip size, member count, data sizes), this member's slot,
//! the array's generation and what the array knew of every slot when it was written. A
//! CRC32C guards it. The reserved area that follows holds the write-intent bitmap; data
//! starts at [`DATA_OFFSET`].
//!
//! Layout (little endian): magic 8 | version 4 | crc32c 4 | uuid 16 | name 32 | level 1 |
//! members 1 | slot 1 | pad 1 | strip 4 | generation 8 | region size 8 | data offset 8 |
//! per slot (24): state 1, pad 7, data bytes 8, generation when lost 8; from version 2, at
//! 512, per slot (896): the member's spec as the user gave it, length 2 and UTF-8 bytes
//! (empty: unknown), so that a member added at run time is found again after a restart
//! from a configuration that still names the one it replaced. Version 1 blocks still load.

use crate::raid::layout::{Level, MAX_MEMBERS};

/// Bytes of the superblock (one block at member offset 0).
pub const SB_SIZE: usize = 4096;
/// Where the write-intent bitmap starts on a member.
pub const BITMAP_OFFSET: u64 = SB_SIZE as u64;
/// Where array data starts on a member: 1 MiB reserved for the superblock and bitmap.
pub const DATA_OFFSET: u64 = 1 << 20;
/// Most bytes of bitmap (one bit per region).
pub const BITMAP_BYTES: u64 = DATA_OFFSET - BITMAP_OFFSET;

const MAGIC: [u8; 8] = *b"VNVMRAID";
const VERSION: u32 = 2;
/// Version 1: without the member specs.
const VERSION_NO_SPECS: u32 = 1;
const NAME_LEN: usize = 32;
const SLOTS_AT: usize = 96;
const SLOT_LEN: usize = 24;
const SPECS_AT: usize = 512;
const SPEC_LEN: usize = (SB_SIZE - SPECS_AT) / MAX_MEMBERS;
/// Longest member spec recorded (a longer one is recorded as unknown).
pub const MAX_SPEC: usize = SPEC_LEN - 2;

/// What an array knew of a member slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// In sync, serving.
    Active,
    /// Receiving a rebuild: written, not read.
    Rebuilding,
    /// Failed or removed; out of sync since generation `lost_gen`.
    Missing,
}

impl SlotState {
    fn code(self) -> u8 {
        match self {
            SlotState::Active => 1,
            SlotState::Rebuilding => 2,
            SlotState::Missing => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => SlotState::Active,
            2 => SlotState::Rebuilding,
            3 => SlotState::Missing,
            _ => return None,
        })
    }
}

/// One slot as a superblock records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub state: SlotState,
    /// Data bytes of the member in this slot.
    pub data_size: u64,
    /// The generation the member last had in sync (when it went missing).
    pub lost_gen: u64,
}

/// A decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub name: String,
    pub level: Level,
    pub strip: u32,
    /// This member's slot.
    pub slot: u8,
    /// Bumped on every change of the array's membership.
    pub generation: u64,
    /// Bytes one bitmap bit covers (0: no bitmap).
    pub region_size: u64,
    pub data_offset: u64,
    pub slots: Vec<SlotInfo>,
    /// Per slot, the member's spec as the user gave it ("": unknown).
    pub specs: Vec<String>,
}

/// Why a superblock was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("no array superblock (blank or not a vnvme array member)")]
    NoMagic,
    #[error("superblock version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    #[error("superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc { stored: u32, computed: u32 },
    #[error("superblock field {0} is invalid")]
    Invalid(&'static str),
}

/// A new random array uuid (version 4).
pub fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut u))
        .is_err()
    {
        // no urandom: time and pid, mixed
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let a = t ^ (u64::from(std::process::id()) << 32);
        u[..8].copy_from_slice(&a.to_le_bytes());
        u[8..].copy_from_slice(&a.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

impl Superblock {
    /// The block as written to a member.
    pub fn encode(&self) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_LEN);
        b[32..32 + n].copy_from_slice(&name[..n]);
        b[64] = self.level.code();
        b[65] = self.slots.len() as u8;
        b[66] = self.slot;
        b[68..72].copy_from_slice(&self.strip.to_le_bytes());
        b[72..80].copy_from_slice(&self.generation.to_le_bytes());
        b[80..88].copy_from_slice(&self.region_size.to_le_bytes());
        b[88..96].copy_from_slice(&self.data_offset.to_le_bytes());
        for (i, s) in self.slots.iter().enumerate().take(MAX_MEMBERS) {
            let at = SLOTS_AT + i * SLOT_LEN;
            b[at] = s.state.code();
            b[at + 8..at + 16].copy_from_slice(&s.data_size.to_le_bytes());
            b[at + 16..at + 24].copy_from_slice(&s.lost_gen.to_le_bytes());
        }
        for (i, spec) in self.specs.iter().enumerate().take(MAX_MEMBERS) {
            let at = SPECS_AT + i * SPEC_LEN;
            let spec = if spec.len() <= MAX_SPEC {
                spec.as_bytes()
            } else {
                &[]
            };
            b[at..at + 2].copy_from_slice(&(spec.len() as u16).to_le_bytes());
            b[at + 2..at + 2 + spec.len()].copy_from_slice(spec);
        }
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and check a member's first block.
    pub fn decode(b: &[u8]) -> Result<Self, SuperblockError> {
        if b.len() < SB_SIZE || b[0..8] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != VERSION && version != VERSION_NO_SPECS {
            return Err(SuperblockError::Version(version));
        }
        let stored = u32_at(12);
        let mut copy = [0u8; SB_SIZE];
        copy.copy_from_slice(&b[..SB_SIZE]);
        copy[12..16].fill(0);
        let computed = crc32c::crc32c(&copy);
        if stored != computed {
            return Err(SuperblockError::BadCrc { stored, computed });
        }
        let level = Level::from_code(b[64]).ok_or(SuperblockError::Invalid("level"))?;
        let members = b[65] as usize;
        level
            .check_members(members)
            .map_err(|_| SuperblockError::Invalid("member count"))?;
        let slot = b[66];
        if slot as usize >= members {
            return Err(SuperblockError::Invalid("slot"));
        }
        let name_raw = &b[32..32 + NAME_LEN];
        let end = name_raw.iter().position(|&c| c == 0).unwrap_or(NAME_LEN);
        let name = std::str::from_utf8(&name_raw[..end])
            .map_err(|_| SuperblockError::Invalid("name"))?
            .to_owned();
        let strip = u32_at(68);
        if level.striped() && (strip < 4096 || !strip.is_power_of_two()) {
            return Err(SuperblockError::Invalid("strip size"));
        }
        let mut slots = Vec::with_capacity(members);
        for i in 0..members {
            let at = SLOTS_AT + i * SLOT_LEN;
            slots.push(SlotInfo {
                state: SlotState::from_code(b[at]).ok_or(SuperblockError::Invalid("slot state"))?,
                data_size: u64_at(at + 8),
                lost_gen: u64_at(at + 16),
            });
        }
        let data_offset = u64_at(88);
        if data_offset != DATA_OFFSET {
            return Err(SuperblockError::Invalid("data offset"));
        }
        let mut specs = vec![String::new(); members];
        if version >= VERSION {
            for (i, spec) in specs.iter_mut().enumerate() {
                let at = SPECS_AT + i * SPEC_LEN;
                let n = u16::from_le_bytes([b[at], b[at + 1]]) as usize;
                if n > MAX_SPEC {
                    return Err(SuperblockError::Invalid("member spec length"));
                }
                std::str::from_utf8(&b[at + 2..at + 2 + n])
                    .map_err(|_| SuperblockError::Invalid("member spec"))?
                    .clone_into(spec);
            }
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        Ok(Self {
            uuid,
            name,
            level,
            strip,
            slot,
            generation: u64_at(72),
            region_size: u64_at(80),
            data_offset,
            slots,
            specs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            uuid: new_uuid(),
            name: "vol0".into(),
            level: Level::Raid10,
            strip: 65536,
            slot: 2,
            generation: 7,
            region_size: 1 << 20,
            data_offset: DATA_OFFSET,
            slots: (0..4)
                .map(|i| SlotInfo {
                    state: if i == 1 {
                        SlotState::Missing
                    } else {
                        SlotState::Active
                    },
                    data_size: 1 << 30,
                    lost_gen: if i == 1 { 5 } else { 0 },
                })
                .collect(),
            specs: vec![
                "file:/srv/a.img".into(),
                String::new(),
                "nvme-tcp://192.0.2.7:4420/nqn.2026-12.io.example:b/1?fast_io_fail_tmo=5".into(),
                "nvme:pci:0000:3b:00.0/1".into(),
            ],
        }
    }

    /// A version 1 block (no specs) still loads, its specs unknown; a spec longer than the
    /// slot's room is recorded as unknown.
    #[test]
    fn version_1_loads_and_long_specs_are_unknown() {
        let mut s = sample();
        let mut b = s.encode();
        b[8..12].copy_from_slice(&VERSION_NO_SPECS.to_le_bytes());
        b[SPECS_AT..].fill(0);
        b[12..16].fill(0);
        let crc = crc32c::crc32c(&b);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        let old = Superblock::decode(&b).unwrap();
        assert_eq!(old.specs, vec![String::new(); 4]);
        s.specs = old.specs.clone();
        assert_eq!(old, s);
        s.specs[0] = "x".repeat(MAX_SPEC + 1);
        s.specs[3] = "y".repeat(MAX_SPEC);
        let back = Superblock::decode(&s.encode()).unwrap();
        assert_eq!(
            (back.specs[0].as_str(), back.specs[3].len()),
            ("", MAX_SPEC)
        );
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Superblock::decode(&s.encode()), Ok(s));
    }

    #[test]
    fn corruption_is_detected() {
        let s = sample();
        let good = s.encode();
        // every single-bit flip anywhere in the block is caught (by magic, version or CRC)
        for byte in (0..SB_SIZE).step_by(7) {
            for bit in [0u8, 3, 7] {
                let mut b = good;
                b[byte] ^= 1 << bit;
                assert!(Superblock::decode(&b).is_err(), "flip at {byte}.{bit}");
            }
        }
        let mut b = good;
        b[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&b),
            Err(SuperblockError::BadCrc { .. })
        ));
        assert_eq!(
            Superblock::decode(&[0u8; SB_SIZE]),
            Err(SuperblockError::NoMagic)
        );
        let mut b = good;
        b[8] = 9;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::Version(9)));
    }

    #[test]
    fn uuids_differ_and_print() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        assert_eq!(nvme_spec::uuid::format(&a).len(), 36);
    }
}
