//! The array's status, published to the shared copy its handle reads (`raid_list`).
use super::array::Array;
use super::status::{ArrayStatus, MemberStatus};
use super::superblock::SlotState;
use std::time::Instant;

impl Array {
    /// Publish, waiting for a reader to let go of the status if one holds it.
    pub(super) fn publish_now(&mut self, now: Instant) {
        self.publish(now);
        if self.status_dirty {
            drop(self.shared.status.lock());
            self.publish(now);
        }
    }

    pub(super) fn publish(&mut self, now: Instant) {
        let dt = now.duration_since(self.last_publish).as_secs_f64();
        let iops = if dt > 0.0 {
            (self.ops - self.last_ops) as f64 / dt
        } else {
            0.0
        };
        let rebuild = self.rebuild.as_ref().map(|rb| {
            let mut p = rb.progress.clone();
            p.elapsed = now.duration_since(rb.started);
            p
        });
        let st = ArrayStatus {
            name: self.name.clone(),
            uuid: nvme_spec::uuid::format(&self.uuid),
            level: self.layout.level.name(),
            strip: self.layout.strip,
            size: self.layout.size(),
            state: self.state_name(),
            generation: self.generation,
            region_size: self.bitmap.region(),
            dirty_regions: self.bitmap.count_set(),
            ops: self.ops,
            iops,
            members: self
                .members
                .iter()
                .enumerate()
                .map(|(slot, m)| MemberStatus {
                    slot,
                    describe: m.describe.clone(),
                    state: match m.state {
                        SlotState::Active => "active",
                        SlotState::Rebuilding => "rebuilding",
                        SlotState::Missing => "missing",
                    },
                    reads: m.reads,
                    writes: m.writes,
                    errors: m.errors,
                    outstanding: m.outstanding,
                })
                .collect(),
            rebuild,
            last_rebuild: self.last_rebuild.clone(),
            rate: self.rate.bytes_per_sec,
        };
        if let Ok(mut g) = self.shared.status.try_lock() {
            *g = st;
            self.last_publish = now;
            self.last_ops = self.ops;
            self.status_dirty = false;
            self.publish_pending = false;
        }
    }
}
