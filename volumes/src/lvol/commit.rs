//! Commits that do not hold up the data path.
//!
//! A commit is a short list of metadata writes on the base (see `store.rs` for their
//! order: flush the data, append the records, flush; or a whole checkpoint and the two
//! superblock copies when the journal is full), planned in one go from the state at its
//! start and then run one step at a time: each step is submitted when the one before
//! completed, found by the same poll that routes the data path's completions. A guest
//! Flush, a FUA write or a write whose mapping must be durable before its ack
//! ([`super::Store::set_mappings_before_ack`]) waits in `commit_waiting`; the waiters of
//! one poll share one commit (group commit), and those arriving during a commit share
//! the next one. So the reactor that polls a volume never waits for the base; a store's
//! metadata writes cost its own volumes latency and nothing else.
//!
//! Management operations (and load, format, close) still want the outcome before they
//! return: [`Core::commit`] plans the same steps and drives the base until they are done.

use std::time::{Duration, Instant};

use device_model::backend::IoRequest;
use nvme_spec::Status;

use super::checkpoint;
use super::commit_plan::{COMMIT, Commit, End};
use super::error::{LvolError, Result};
use super::records;
use super::store::{Core, salt};
use super::superblock::{SB_OFFSETS, SB_SIZE};
use super::syncio::INTERNAL;

/// A commit step waiting this long for the base is logged by a synchronous waiter.
const SLOW: Duration = Duration::from_secs(10);

impl Core {
    /// Start a commit for the requests waiting for one, unless a commit is running (they
    /// get the next).
    pub(crate) fn kick_commit(&mut self) {
        if self.job.is_none() && (self.commit_wanted || !self.dp.commit_waiting.is_empty()) {
            self.commit_wanted = false;
            let waiters = std::mem::take(&mut self.dp.commit_waiting);
            self.start_commit(waiters);
        }
    }

    /// Make every change so far durable, waiting for it (management, close): a commit in
    /// progress is finished first, its changes predating ours.
    pub(crate) fn commit(&mut self) -> Result<()> {
        self.check_alive()?;
        self.drive();
        self.check_alive()?;
        let waiters = std::mem::take(&mut self.dp.commit_waiting);
        self.start_commit(waiters);
        self.drive();
        self.commit_error.take().map_or(Ok(()), Err)
    }

    /// Write all metadata to the inactive checkpoint slot and point both superblock
    /// copies at it, waiting for it (format and load).
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        self.drive();
        let mut c = Commit::new(Vec::new(), Vec::new());
        self.plan_checkpoint(&mut c)?;
        self.job = Some(c);
        self.next_step();
        self.drive();
        self.commit_error.take().map_or(Ok(()), Err)
    }

    fn start_commit(&mut self, waiters: Vec<u32>) {
        if self.failed.is_some() {
            self.answer(waiters, Status::INTERNAL_ERROR);
            return;
        }
        self.drain_dirty();
        let released = std::mem::take(&mut self.pending_free);
        let mut c = Commit::new(waiters, released);
        if !self.faults.records_before_data || self.records.is_empty() {
            c.flush("flush data");
        }
        if !self.records.is_empty() {
            let recs = std::mem::take(&mut self.records);
            let img = records::frame(&recs, self.next_seq, salt(&self.sb.uuid));
            let bytes = img.len() as u64;
            if self.journal_pos + bytes > self.geo.journal_len {
                // the metadata in memory includes these records already
                if let Err(e) = self.plan_checkpoint(&mut c) {
                    self.job = Some(c);
                    self.finish(Err(e));
                    return;
                }
            } else {
                let off = self.geo.journal_off + self.journal_pos;
                c.write("write the journal", off, &img, bytes);
                c.flush("flush the journal");
                c.end = End::Journal {
                    bytes,
                    records: recs.len() as u64,
                };
            }
        }
        self.job = Some(c);
        self.next_step();
    }

    /// Add a checkpoint's steps to `c`: the image to the inactive slot, then each
    /// superblock copy in turn, each write flushed. The journal starts over after it (with
    /// a gap in sequence numbers, so records a crash left behind the tail can never be
    /// taken for new ones).
    fn plan_checkpoint(&mut self, c: &mut Commit) -> Result<()> {
        self.records.clear();
        let img = checkpoint::encode(&self.meta);
        if img.len() as u64 > self.geo.ckpt_len {
            return Err(LvolError::MetadataFull(format!(
                "a checkpoint of {} bytes, slots of {}",
                img.len(),
                self.geo.ckpt_len
            )));
        }
        let slot = 1 - self.sb.active;
        let len = (img.len() as u64).div_ceil(4096) * 4096;
        c.write(
            "write a checkpoint",
            self.geo.ckpt_off[slot as usize],
            &img,
            len,
        );
        c.flush("flush the checkpoint");
        let mut sb = self.sb.clone();
        sb.generation += 1;
        sb.active = slot;
        sb.ckpt_bytes = img.len() as u64;
        sb.ckpt_crc = crc32c::crc32c(&img);
        sb.journal_seq = self.next_seq + self.geo.journal_len;
        let block = sb.encode();
        for off in SB_OFFSETS {
            c.write("write a superblock", off, &block, SB_SIZE as u64);
            c.flush("flush a superblock");
        }
        c.end = End::Checkpoint(Box::new(sb));
        Ok(())
    }

    /// Submit the running commit's next step, or end the commit when none is left.
    fn next_step(&mut self) {
        let Some(c) = self.job.as_mut() else {
            return;
        };
        let Some(step) = c.steps.pop_front() else {
            self.finish(Ok(()));
            return;
        };
        self.commit_seq += 1;
        c.tag = INTERNAL | COMMIT | (self.commit_seq & (COMMIT - 1));
        c.what = step.what;
        c.list.clear();
        if let Some((b, from, n)) = step.data {
            c.list.set_range(c.bufs[b].buffers(), from, n);
        }
        let req = IoRequest {
            tag: c.tag,
            op: step.op,
            offset: step.off,
            iov: c.list.as_buffers(),
        };
        if let Err(s) = self.base.submit(&req) {
            let what = step.what;
            self.finish(Err(LvolError::Io {
                what,
                status: s.raw(),
            }));
        }
    }

    /// The base completed a commit step.
    pub(crate) fn commit_step_done(&mut self, tag: u64, status: Status) {
        let Some(c) = self.job.as_ref() else {
            log::warn!(
                "volume store {}: a metadata completion with no commit running ({tag:#x})",
                self.sb.name
            );
            return;
        };
        if c.tag != tag {
            log::warn!(
                "volume store {}: a metadata completion for {tag:#x}, {:#x} expected",
                self.sb.name,
                c.tag
            );
            return;
        }
        if status.is_success() {
            self.next_step();
        } else {
            let what = c.what;
            self.finish(Err(LvolError::Io {
                what,
                status: status.raw(),
            }));
        }
    }

    /// The running commit is done (or failed): apply its end, answer its waiters.
    fn finish(&mut self, result: Result<()>) {
        let Some(c) = self.job.take() else {
            return;
        };
        let status = match result {
            Ok(()) => {
                match c.end {
                    End::Data => {}
                    End::Journal { bytes, records } => {
                        self.journal_pos += bytes;
                        self.next_seq += records;
                    }
                    End::Checkpoint(sb) => {
                        self.next_seq = sb.journal_seq;
                        self.sb = *sb;
                        self.journal_pos = 0;
                    }
                }
                self.quarantine.extend(c.released);
                self.release_quarantine();
                Status::SUCCESS
            }
            Err(e) => {
                let e = self.fail(e);
                self.commit_error = Some(e);
                Status::INTERNAL_ERROR
            }
        };
        // parked writes learn whether the commit freed enough (or that the store failed)
        self.space_due |= !self.parked.is_empty();
        self.answer(c.waiters, status);
    }

    /// Complete guest requests that waited for a commit.
    fn answer(&mut self, waiters: Vec<u32>, status: Status) {
        for r in waiters {
            let q = &self.dp.reqs[r as usize];
            let (user, tag) = (q.user, q.tag);
            self.dp.push_done(user, tag, status);
            self.dp.free_reqs.push(r);
        }
    }

    /// Poll the base until no commit is running; data completions seen meanwhile are
    /// kept aside (`apply_deferred`).
    fn drive(&mut self) {
        let t = Instant::now();
        let mut warned = false;
        while self.job.is_some() {
            let mut got = std::mem::take(&mut self.dp.scratch);
            self.base.poll(&mut |t, s| got.push((t, s)));
            let idle = got.is_empty();
            for (t, s) in got.drain(..) {
                if t & (INTERNAL | COMMIT) == INTERNAL | COMMIT {
                    self.commit_step_done(t, s);
                } else {
                    self.sync.deferred.push((t, s));
                }
            }
            self.dp.scratch = got;
            if idle {
                if t.elapsed() > SLOW && !warned {
                    log::warn!(
                        "volume store {}: a commit has waited {SLOW:?} for the base backend",
                        self.sb.name
                    );
                    warned = true;
                }
                std::thread::yield_now();
            }
        }
    }
}
