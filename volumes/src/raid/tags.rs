//! The requests an array sends its members: how large one may be, and the kind of request a
//! member's completion tag names (guest child, metadata round, rebuild chunk) in its top bits.

/// Largest data transfer sent to a member: members may refuse more (an NVMe/TCP target's
/// MDTS, 128 KiB for vnvme's own), so larger parts are sent as several requests.
pub const MAX_CHILD: u64 = 128 << 10;

/// Where a tag's kind starts (two bits); below it, the record's index. Member tags stay
/// below 2^56: a member may be a shared backend, which folds its user index into the top byte.
pub(super) const KIND_SHIFT: u32 = 54;
/// A part of a guest request.
pub(super) const KIND_CHILD: u64 = 0;
/// A superblock or bitmap write.
pub(super) const KIND_META: u64 = 1;
/// A rebuild chunk's read or write.
pub(super) const KIND_REBUILD: u64 = 2;
/// A request of the fast path (see [`super::direct`]).
pub(super) const KIND_DIRECT: u64 = 3;
/// In a fast-path tag: the caller's tag is carried in the bits below [`DIRECT_READ`] (it
/// fits there), with no record; without it, the bits below are a record's index.
pub(super) const DIRECT_CARRIED: u64 = 1 << 53;
/// In a fast-path tag that carries the caller's tag: the request is a read.
pub(super) const DIRECT_READ: u64 = 1 << 52;
