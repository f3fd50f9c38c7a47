//! Metadata I/O on the base backend, waited for in place. Completions of data requests
//! that arrive meanwhile are kept aside (`deferred`) and applied after the metadata
//! operation: the metadata state a commit writes is the state at its start, whose data
//! the commit's first flush made durable.

use std::time::{Duration, Instant};

use device_model::backend::{Backend, GuestBufferList, IoBuffer, IoOp, IoRequest};
use nvme_spec::Status;

use super::error::{LvolError, Result};

/// Tags of metadata requests have this bit; data requests (slab slots) never do. Low
/// enough for a base that keeps its own bits at the top (a shared backend uses the top byte).
pub const INTERNAL: u64 = 1 << 40;
/// A metadata request waiting this long is logged.
const SLOW: Duration = Duration::from_secs(10);
/// Largest single metadata transfer.
pub(crate) const CHUNK: u64 = 1 << 20;

/// Synchronous requests on a base, with the completions that were not theirs kept aside.
#[derive(Debug, Default)]
pub struct SyncIo {
    next: u64,
    /// Data completions seen while waiting.
    pub deferred: Vec<(u64, Status)>,
}

impl SyncIo {
    /// Run `op` over `[buf_off, buf_off + len)` of `buf` (none for Flush / Write Zeroes)
    /// at base offset `off`, in chunks of at most 1 MiB.
    pub fn run(
        &mut self,
        base: &mut dyn Backend,
        what: &'static str,
        op: IoOp,
        off: u64,
        buf: Option<(&IoBuffer, u64)>,
        len: u64,
    ) -> Result<()> {
        if matches!(op, IoOp::Flush) {
            return self.one(base, what, op, off, None);
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            let op = match op {
                IoOp::WriteZeroes { .. } => IoOp::WriteZeroes { len: n },
                IoOp::Deallocate { .. } => IoOp::Deallocate { len: n },
                o => o,
            };
            let list = buf.map(|(b, boff)| {
                let mut l = GuestBufferList::new();
                l.set_range(b.buffers(), boff + done, n);
                l
            });
            self.one(base, what, op, off + done, list.as_ref())?;
            done += n;
        }
        Ok(())
    }

    fn one(
        &mut self,
        base: &mut dyn Backend,
        what: &'static str,
        op: IoOp,
        offset: u64,
        list: Option<&GuestBufferList>,
    ) -> Result<()> {
        self.next += 1;
        let tag = INTERNAL | self.next;
        let iov = list.map(GuestBufferList::as_buffers).unwrap_or_default();
        base.submit(&IoRequest {
            tag,
            op,
            offset,
            iov,
        })
        .map_err(|s| LvolError::Io {
            what,
            status: s.raw(),
        })?;
        let t = Instant::now();
        let mut got = None;
        let mut warned = false;
        loop {
            let deferred = &mut self.deferred;
            base.poll(&mut |t, s| {
                if t == tag {
                    got = Some(s);
                } else {
                    deferred.push((t, s));
                }
            });
            if let Some(s) = got {
                return if s.is_success() {
                    Ok(())
                } else {
                    Err(LvolError::Io {
                        what,
                        status: s.raw(),
                    })
                };
            }
            // no time limit: the buffer must outlive the request, and a base that never
            // answers stalls its store like it would stall a plain namespace; say so
            if t.elapsed() > SLOW && !warned {
                log::warn!("volume store: {what} has waited {SLOW:?} for the base backend");
                warned = true;
            }
            std::thread::yield_now();
        }
    }
}
