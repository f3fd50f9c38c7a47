//! The fast path of the levels without mirrors (raid0, concat): a read or write that lies
//! within one strip of one member goes to that member as it came (the guest's buffer list
//! passed through, no child record and no copy of the list) and its completion is handed to
//! the caller from inside the member's poll. A member that refuses it refuses the guest's
//! request: no other copy could serve it.

use device_model::backend::{IoOp, IoRequest};
use nvme_spec::Status;

use super::array::Array;
use super::layout::Extent;
use super::superblock::DATA_OFFSET;

impl Array {
    /// Send `req`, a read or write within extent `e` (the whole request), straight to the
    /// member of `e`'s leg.
    #[inline]
    pub(super) fn submit_direct(&mut self, req: &IoRequest<'_>, e: Extent) -> Result<(), Status> {
        let slot = self.layout.slots(e.leg).start;
        let read = req.op == IoOp::Read;
        let tag = self.directs.start(req.tag, read);
        let m = &mut self.members[slot];
        let r = match m.backend.as_mut() {
            Some(b) => b.submit(&IoRequest {
                tag,
                op: req.op,
                offset: DATA_OFFSET + e.member_off,
                iov: req.iov,
            }),
            None => Err(Status::INTERNAL_PATH_ERROR),
        };
        if r.is_ok() {
            m.outstanding += 1;
            self.in_flight += 1;
        } else {
            m.errors += 1;
            self.directs.finish(tag);
        }
        r
    }
}
