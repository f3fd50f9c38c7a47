//! Management commands from the array's handle ([`super::control::ArrayHandle`]), run from a
//! step: member removal and addition (with the rebuild it queues), rebuild rate.
use super::array::Array;
use super::rebuild::RebuildKind;
use super::status::{AddOutcome, Command};
use super::superblock::{DATA_OFFSET, SlotState, Superblock};
use device_model::backend::Backend;
use std::time::Instant;

impl Array {
    pub(super) fn run_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            self.shared.command_taken();
            self.command(cmd, now);
            self.status_dirty = true;
        }
    }

    pub(crate) fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::SetRate(r) => {
                self.rate.set(r, now);
                if let Some(rb) = self.rebuild.as_mut() {
                    rb.progress.rate = r;
                }
            }
            // the status is published before the answer: a listing right after shows it
            Command::Remove { slot, reply } => {
                let r = self.remove_member(slot);
                self.publish_now(now);
                let _ = reply.send(r);
            }
            Command::Add {
                backend,
                describe,
                sb,
                reply,
            } => {
                let r = self.add_member(backend, describe, sb.as_ref());
                self.publish_now(now);
                let _ = reply.send(r);
            }
        }
    }

    pub(super) fn remove_member(&mut self, slot: usize) -> Result<(), String> {
        if slot >= self.members.len() {
            return Err(format!("no member slot {slot}"));
        }
        if !self.mirrored() {
            return Err(format!(
                "{} has no redundancy: removing a member would lose data",
                self.layout.level.name()
            ));
        }
        if self.members[slot].state == SlotState::Missing {
            return Err(format!("member slot {slot} is already missing"));
        }
        let leg = self.layout.leg_of(slot);
        let others = self
            .layout
            .slots(leg)
            .any(|s| s != slot && self.members[s].state == SlotState::Active);
        if !others {
            return Err(format!(
                "member slot {slot} is the last in-sync copy of its data"
            ));
        }
        self.retire(slot, "removed by request");
        Ok(())
    }

    pub(super) fn add_member(
        &mut self,
        backend: Box<dyn Backend>,
        describe: String,
        sb: Option<&Superblock>,
    ) -> Result<AddOutcome, String> {
        if !self.mirrored() {
            return Err(format!(
                "{} has no redundancy to rebuild a member from",
                self.layout.level.name()
            ));
        }
        let need = self.layout.leg_size(0) + DATA_OFFSET;
        if backend.size() < need {
            return Err(format!(
                "{describe}: {} bytes, the array's members need {need}",
                backend.size()
            ));
        }
        // a returning member goes back to its slot; otherwise the first missing one
        let returning = sb.filter(|s| {
            s.uuid == self.uuid
                && (s.slot as usize) < self.members.len()
                && self.members[s.slot as usize].state == SlotState::Missing
                && self.members[s.slot as usize].backend.is_none()
        });
        if let Some(s) = sb
            && s.uuid != self.uuid
        {
            return Err(format!(
                "{describe} belongs to another array ({} {}); wipe it first",
                s.name,
                nvme_spec::uuid::format(&s.uuid)
            ));
        }
        let slot = match returning {
            Some(s) => s.slot as usize,
            None => self
                .members
                .iter()
                .position(|m| m.state == SlotState::Missing && m.backend.is_none())
                .ok_or_else(|| "no missing member slot to fill".to_string())?,
        };
        let partial = returning.is_some_and(|s| s.generation >= self.members[slot].lost_gen);
        let mut backend = backend;
        if let Some(g) = &self.guest {
            backend.use_guest_memory(g);
        }
        let m = &mut self.members[slot];
        m.backend = Some(backend);
        m.spec.clone_from(&describe);
        m.describe = describe;
        m.state = SlotState::Rebuilding;
        m.outstanding = 0;
        m.data_size = self.layout.leg_size(0);
        self.bump_generation();
        self.queue_rebuild(RebuildKind::Recover { slot, partial });
        Ok(AddOutcome { slot, partial })
    }
}
