//! Journal records: every metadata change is one record, applied in sequence order at
//! load. A record is framed as magic 4 | payload length 4 | sequence 8 | crc32c 4 |
//! payload, the CRC covering the length, the sequence and the payload. A batch of records
//! starts on a fresh 4 KiB block, so writing it never rewrites a block that holds
//! records already committed.

use super::codec::{Reader, Writer};
use super::error::{LvolError, Result};
use super::map::Entry;

const MAGIC: u32 = 0x524a_564c; // "LVJR"
/// Bytes of a record's frame header.
pub const HEADER: usize = 20;
/// Journal block: batches start on these boundaries.
pub const BLOCK: usize = 4096;

/// One metadata change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A new, empty volume (a thick one is then mapped by [`Record::MapRun`]s).
    Create {
        id: u32,
        name: String,
        size: u64,
        thin: bool,
    },
    /// A volume is gone (its clones' parent becomes its parent).
    Delete { id: u32 },
    /// New size (a shrink drops the map beyond it).
    Resize { id: u32, size: u64 },
    /// New name.
    Rename { id: u32, name: String },
    /// Volume `id` (read-only) is a snapshot of `src`: a copy of its map; `src`'s parent
    /// becomes the snapshot.
    Snapshot { src: u32, id: u32, name: String },
    /// Volume `id` (writable, thin) is a clone of snapshot `snap`: a copy of its map.
    Clone { snap: u32, id: u32, name: String },
    /// A logical cluster's new mapping.
    SetEntry {
        id: u32,
        lcluster: u32,
        entry: Entry,
    },
    /// `count` logical clusters from `lcluster` map in full to physical clusters from
    /// `pcluster`.
    MapRun {
        id: u32,
        lcluster: u32,
        pcluster: u32,
        count: u32,
    },
    /// The volume no longer depends on a parent (inflate or decouple); `thick` when
    /// inflated.
    Decouple { id: u32, thick: bool },
}

impl Record {
    /// The payload.
    pub fn encode(&self, w: &mut Writer) {
        match self {
            Record::Create {
                id,
                name,
                size,
                thin,
            } => {
                w.u8(1);
                w.u32(*id);
                w.str(name);
                w.u64(*size);
                w.u8(u8::from(*thin));
            }
            Record::Delete { id } => {
                w.u8(2);
                w.u32(*id);
            }
            Record::Resize { id, size } => {
                w.u8(3);
                w.u32(*id);
                w.u64(*size);
            }
            Record::Rename { id, name } => {
                w.u8(4);
                w.u32(*id);
                w.str(name);
            }
            Record::Snapshot { src, id, name } => {
                w.u8(5);
                w.u32(*src);
                w.u32(*id);
                w.str(name);
            }
            Record::Clone { snap, id, name } => {
                w.u8(6);
                w.u32(*snap);
                w.u32(*id);
                w.str(name);
            }
            Record::SetEntry {
                id,
                lcluster,
                entry,
            } => {
                w.u8(7);
                w.u32(*id);
                w.u32(*lcluster);
                entry.encode(w);
            }
            Record::MapRun {
                id,
                lcluster,
                pcluster,
                count,
            } => {
                w.u8(8);
                w.u32(*id);
                w.u32(*lcluster);
                w.u32(*pcluster);
                w.u32(*count);
            }
            Record::Decouple { id, thick } => {
                w.u8(9);
                w.u32(*id);
                w.u8(u8::from(*thick));
            }
        }
    }

    /// Parse a payload (clusters and bitmaps checked against the geometry).
    pub fn decode(r: &mut Reader<'_>, clusters: u64, granules: u32) -> Result<Self> {
        Ok(match r.u8()? {
            1 => Record::Create {
                id: r.u32()?,
                name: r.str()?,
                size: r.u64()?,
                thin: r.u8()? != 0,
            },
            2 => Record::Delete { id: r.u32()? },
            3 => Record::Resize {
                id: r.u32()?,
                size: r.u64()?,
            },
            4 => Record::Rename {
                id: r.u32()?,
                name: r.str()?,
            },
            5 => Record::Snapshot {
                src: r.u32()?,
                id: r.u32()?,
                name: r.str()?,
            },
            6 => Record::Clone {
                snap: r.u32()?,
                id: r.u32()?,
                name: r.str()?,
            },
            7 => Record::SetEntry {
                id: r.u32()?,
                lcluster: r.u32()?,
                entry: Entry::decode(r, clusters, granules)?,
            },
            8 => Record::MapRun {
                id: r.u32()?,
                lcluster: r.u32()?,
                pcluster: r.u32()?,
                count: r.u32()?,
            },
            9 => Record::Decouple {
                id: r.u32()?,
                thick: r.u8()? != 0,
            },
            t => return Err(LvolError::corrupt(format!("journal record type {t}"))),
        })
    }
}

/// Frame `records` with sequence numbers from `seq` (CRCs seeded with the store's `salt`) into whole blocks (zero padded).
pub fn frame(records: &[Record], seq: u64, salt: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut payload = Writer::default();
    for (i, r) in records.iter().enumerate() {
        payload.0.clear();
        r.encode(&mut payload);
        let len = payload.0.len() as u32;
        let s = seq + i as u64;
        let mut crc = crc32c::crc32c_append(salt, &len.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &s.to_le_bytes());
        crc = crc32c::crc32c_append(crc, &payload.0);
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(&payload.0);
    }
    out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    out
}

/// Why a journal scan stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScanEnd {
    /// The journal area ended.
    AreaEnd,
    /// No valid record with the expected sequence number: the end of what was committed
    /// (a torn last batch ends here too).
    Tail,
}

/// Records of a journal area `area` from sequence `seq` on: the valid prefix of the
/// sequence. Returns the records, the byte offset where the next batch goes (a block
/// boundary) and why the scan stopped. A record that is not valid where one is expected
/// sends the scan to the next block boundary (a batch's padding); there, anything but
/// the expected sequence number ends the journal.
pub fn scan(
    area: &[u8],
    mut seq: u64,
    salt: u32,
    clusters: u64,
    granules: u32,
) -> Result<(Vec<Record>, u64, ScanEnd)> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut at_boundary = true;
    let mut end_of_valid = 0usize;
    loop {
        if pos + HEADER > area.len() {
            return Ok((out, round_block(end_of_valid), ScanEnd::AreaEnd));
        }
        let h = &area[pos..pos + HEADER];
        let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut s = [0u8; 8];
        s.copy_from_slice(&h[8..16]);
        let rseq = u64::from_le_bytes(s);
        let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        let fits = pos + HEADER + len <= area.len();
        let valid = magic == MAGIC && fits && {
            let payload = &area[pos + HEADER..pos + HEADER + len];
            let mut c = crc32c::crc32c_append(salt, &(len as u32).to_le_bytes());
            c = crc32c::crc32c_append(c, &rseq.to_le_bytes());
            c = crc32c::crc32c_append(c, payload);
            c == crc
        };
        if valid && rseq == seq {
            let payload = &area[pos + HEADER..pos + HEADER + len];
            let mut r = Reader::new(payload);
            // a record whose CRC holds but whose contents do not parse was written so:
            // that is corruption, not a torn tail
            out.push(Record::decode(&mut r, clusters, granules)?);
            seq += 1;
            pos += HEADER + len;
            end_of_valid = pos;
            at_boundary = pos.is_multiple_of(BLOCK);
            continue;
        }
        if at_boundary {
            return Ok((out, round_block(end_of_valid), ScanEnd::Tail));
        }
        pos = round_block(pos) as usize;
        at_boundary = true;
    }
}

fn round_block(pos: usize) -> u64 {
    (pos.div_ceil(BLOCK) * BLOCK) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: u32) -> Vec<Record> {
        (0..n)
            .map(|i| Record::MapRun {
                id: i,
                lcluster: i,
                pcluster: i,
                count: 1,
            })
            .collect()
    }

    #[test]
    fn batches_scan_back_in_order_and_a_torn_batch_ends_the_journal() {
        let mut area = vec![0u8; 8 * BLOCK];
        let a = frame(&sample(3), 10, 7);
        let b = frame(&sample(300), 13, 7); // spans blocks
        area[..a.len()].copy_from_slice(&a);
        area[a.len()..a.len() + b.len()].copy_from_slice(&b);
        let (recs, next, end) = scan(&area, 10, 7, 1000, 16).unwrap();
        assert_eq!(recs.len(), 303);
        assert_eq!(next as usize, a.len() + b.len());
        assert_eq!(end, ScanEnd::Tail);
        // another store's records (another salt) are not taken
        assert!(scan(&area, 10, 8, 1000, 16).unwrap().0.is_empty());
        // a stale record (older sequence) after the tail is not taken
        let (recs, ..) = scan(&area, 11, 7, 1000, 16).unwrap();
        assert!(recs.is_empty());
        // tear the second batch's third record: its first two remain, nothing after
        // (the next block starts with a later sequence number)
        area[a.len() + 100] ^= 0xff;
        let (recs, next, _) = scan(&area, 10, 7, 1000, 16).unwrap();
        assert_eq!((recs.len(), next as usize), (5, a.len() + BLOCK));
        // tear its first record: only the first batch remains
        area[a.len() + 5] ^= 0xff;
        let (recs, next, _) = scan(&area, 10, 7, 1000, 16).unwrap();
        assert_eq!((recs.len(), next as usize), (3, a.len()));
    }
}
