//! What a commit is made of, planned at its start (`commit.rs` runs it): the metadata
//! requests in order, the buffers they write from, and what the core changes when they are
//! all done.

use std::collections::VecDeque;

use device_model::backend::{GuestBufferList, IoBuffer, IoOp};

use super::superblock::Superblock;
use super::syncio::CHUNK;

/// Tags of commit steps have this bit as well as `syncio::INTERNAL` (the synchronous requests of
/// `syncio` count from 1 and never reach it).
pub(crate) const COMMIT: u64 = 1 << 39;

/// One metadata request of a commit.
#[derive(Debug)]
pub(super) struct Step {
    pub(super) what: &'static str,
    pub(super) op: IoOp,
    pub(super) off: u64,
    /// Bytes `[from, from + len)` of the commit's buffer `buf` (none for a Flush).
    pub(super) data: Option<(usize, u64, u64)>,
}

/// What a commit changes in the core once all its steps are done.
#[derive(Debug)]
pub(super) enum End {
    /// Data flushed, no records.
    Data,
    /// Records appended to the journal.
    Journal { bytes: u64, records: u64 },
    /// A checkpoint written and both superblock copies pointing at it.
    Checkpoint(Box<Superblock>),
}

/// A commit in progress.
#[derive(Debug)]
pub(crate) struct Commit {
    pub(super) steps: VecDeque<Step>,
    pub(super) bufs: Vec<IoBuffer>,
    /// The list the step in flight lends the base (kept until its completion).
    pub(super) list: GuestBufferList,
    /// The step in flight: its tag and what it does.
    pub(super) tag: u64,
    pub(super) what: &'static str,
    pub(super) end: End,
    /// Clusters freed by the records this commit writes.
    pub(super) released: Vec<u32>,
    /// Guest requests completed when the commit is durable.
    pub(super) waiters: Vec<u32>,
}

impl Commit {
    pub(super) fn new(waiters: Vec<u32>, released: Vec<u32>) -> Box<Self> {
        Box::new(Self {
            steps: VecDeque::new(),
            bufs: Vec::new(),
            list: GuestBufferList::new(),
            tag: 0,
            what: "",
            end: End::Data,
            released,
            waiters,
        })
    }

    pub(super) fn flush(&mut self, what: &'static str) {
        self.steps.push_back(Step {
            what,
            op: IoOp::Flush,
            off: 0,
            data: None,
        });
    }

    /// Write `bytes` (padded with zeroes to `len`) at `off`, in chunks the base takes.
    pub(super) fn write(&mut self, what: &'static str, off: u64, bytes: &[u8], len: u64) {
        let buf = IoBuffer::new(len as usize);
        buf.write_at(0, bytes);
        let b = self.bufs.len();
        self.bufs.push(buf);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.steps.push_back(Step {
                what,
                op: IoOp::Write { fua: false },
                off: off + done,
                data: Some((b, done, n)),
            });
            done += n;
        }
    }
}
