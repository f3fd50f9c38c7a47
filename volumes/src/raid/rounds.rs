//! Superblock and write-intent bitmap rounds: the bitmap blocks and superblocks a round
//! needs, written to every member present, and the requests and retirements waiting for
//! them.
use super::array::Array;
use super::bitmap::BLOCK;
use super::records::MetaOp;
use super::superblock::{BITMAP_OFFSET, SlotState};
use super::tags::{KIND_META, KIND_SHIFT};
use device_model::backend::{GuestBufferList, IoOp, IoRequest};
use nvme_spec::Status;

impl Array {
    pub(super) fn maybe_round(&mut self) {
        if self.meta_pending > 0 {
            return;
        }
        if !(self.bitmap.round_due() || self.sb_dirty) {
            return;
        }
        let mut blocks = std::mem::take(&mut self.round_blocks);
        self.meta_round = self.bitmap.issue(&mut blocks);
        self.meta_used = 0;
        let mut block = vec![0u8; BLOCK as usize];
        for &b in &blocks {
            self.bitmap.block_bytes(b, &mut block);
            self.bm_buf.write_at((b * BLOCK) as usize, &block);
        }
        let sb = std::mem::take(&mut self.sb_dirty);
        self.round_sb = sb;
        for slot in 0..self.members.len() {
            if self.members[slot].state == SlotState::Missing
                || self.members[slot].backend.is_none()
            {
                continue;
            }
            if self.mirrored() {
                for &b in &blocks {
                    self.meta_op_bm(slot, b);
                }
            }
            if sb {
                let enc = self.superblock(slot).encode();
                self.sb_bufs[slot].write_at(0, &enc);
                self.meta_op_sb(slot);
            }
        }
        self.round_blocks = blocks;
        if self.meta_pending == 0 {
            let r = self.meta_round;
            self.bitmap.round_done(r);
        }
    }

    pub(super) fn meta_op_bm(&mut self, slot: usize, b: u64) {
        let k = self.meta_slot();
        self.meta[k]
            .iov
            .set_range(self.bm_buf.buffers(), b * BLOCK, BLOCK);
        self.submit_meta(slot, k, BITMAP_OFFSET + b * BLOCK);
    }

    pub(super) fn meta_op_sb(&mut self, slot: usize) {
        let k = self.meta_slot();
        self.meta[k].iov.set(self.sb_bufs[slot].buffers());
        self.submit_meta(slot, k, 0);
    }

    /// A record for one superblock or bitmap write of this round (reused round to round).
    pub(super) fn meta_slot(&mut self) -> usize {
        if self.meta_used == self.meta.len() {
            self.meta.push(MetaOp {
                iov: GuestBufferList::new(),
            });
        }
        self.meta_used += 1;
        self.meta_used - 1
    }

    pub(super) fn submit_meta(&mut self, slot: usize, k: usize, offset: u64) {
        let tag = (KIND_META << KIND_SHIFT) | k as u64;
        let m = &mut self.members[slot];
        let Some(b) = m.backend.as_mut() else {
            return;
        };
        m.outstanding += 1;
        self.meta_pending += 1;
        let r = b.submit(&IoRequest {
            tag,
            op: IoOp::Write { fua: true },
            offset,
            iov: self.meta[k].iov.as_buffers(),
        });
        if let Err(s) = r {
            self.events.push((slot, tag, s));
        }
    }

    pub(super) fn on_meta(&mut self, slot: usize, status: Status) {
        let m = &mut self.members[slot];
        m.outstanding = m.outstanding.saturating_sub(1);
        if m.state == SlotState::Missing && m.outstanding == 0 {
            m.backend = None;
        }
        if !status.is_success() {
            m.errors += 1;
            let leg = self.layout.leg_of(slot);
            let others = self
                .layout
                .slots(leg)
                .any(|s| s != slot && self.members[s].state == SlotState::Active);
            if others {
                self.retire(slot, &format!("superblock/bitmap write failed: {status:?}"));
            } else {
                // the last copy of its leg could not record this round (a member's loss, a
                // write's bits): what waits for it is not acknowledged, and its superblock
                // is written again next round (after a crash, a member this round retired
                // could otherwise come back as if in sync)
                self.round_failed = true;
                device_model::warn_limited!(
                    "array {}: superblock/bitmap write to member {slot}, the last copy of its leg, failed: {status:?}",
                    self.name
                );
            }
        }
        self.meta_pending -= 1;
        if self.meta_pending == 0 {
            if std::mem::take(&mut self.round_failed) {
                let held: Vec<u32> = self.held.iter().copied().collect();
                for pi in held {
                    self.fail(pi, Status::INTERNAL_PATH_ERROR);
                }
                self.sb_dirty |= self.round_sb;
            }
            let r = self.meta_round;
            self.bitmap.round_done(r);
            self.status_dirty = true;
        }
    }
}
