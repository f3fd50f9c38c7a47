//! Namespaces: a backend plus the identity the guest sees (NVMe base 2.0 §3.2.1).

use nvme_spec::Status;

use crate::backend::Backend;

/// A namespace attached to a controller.
pub struct Namespace {
    /// Namespace ID (1-based).
    pub nsid: u32,
    /// Where the blocks live.
    pub backend: Box<dyn Backend>,
    /// log2 of the LBA data size (9 = 512 bytes, 12 = 4 KiB).
    pub lba_shift: u8,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// UUID.
    pub uuid: [u8; 16],
    /// May be attached to more than one controller (Identify Namespace NMIC bit 0).
    pub shared: bool,
    /// Blocks marked by Write Uncorrectable (this controller's view of the namespace).
    pub uncorrectable: crate::uncorrectable::Uncorrectable,
    /// Commands on this namespace as this controller saw them (listed for readers in
    /// [`crate::ControllerStats::namespaces`] while attached).
    pub stats: std::sync::Arc<crate::stats::IoStats>,
    /// Bytes its backend takes in one request (a remote target's MDTS, a device's limit;
    /// `u64::MAX`: no limit). A larger read or write is sent in pieces.
    pub max_request: u64,
    /// The size in blocks the host was last told of: a backend that grows or shrinks (a
    /// resized logical volume) is announced with a Namespace Attribute Changed notice.
    pub reported_blocks: u64,
    /// The backend's size in bytes, read once ([`Backend::size`] is fixed) unless the backend
    /// keeps a cell that follows it ([`Backend::live_size`]): no call per command.
    size: u64,
    live_size: Option<std::sync::Arc<std::sync::atomic::AtomicU64>>,
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("nsid", &self.nsid)
            .field("backend", &self.backend.describe())
            .finish()
    }
}

/// A namespace's unique identifiers (Identify Namespace NGUID / EUI64, descriptor UUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NsIds {
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
}

impl NsIds {
    /// Identifiers derived from `seed` (stable for a given config) and `nsid`.
    pub fn derive(nsid: u32, seed: &str) -> Self {
        let h = stable_hash(seed.as_bytes(), u64::from(nsid));
        let h2 = stable_hash(seed.as_bytes(), u64::from(nsid) ^ 0x5a5a_5a5a);
        let mut nguid = [0u8; 16];
        nguid[..8].copy_from_slice(&h.to_be_bytes());
        nguid[8..].copy_from_slice(&h2.to_be_bytes());
        let mut uuid = nguid;
        uuid[6] = (uuid[6] & 0x0f) | 0x50; // version 5 style, name-based
        uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
        let mut eui64 = h2.to_be_bytes();
        eui64[0] = 0x02; // locally administered
        Self { nguid, eui64, uuid }
    }
}

impl Namespace {
    /// A namespace with identifiers derived from `seed` (stable for a given config) and `nsid`.
    pub fn new(nsid: u32, backend: Box<dyn Backend>, lba_shift: u8, seed: &str) -> Self {
        let NsIds { nguid, eui64, uuid } = NsIds::derive(nsid, seed);
        let backend_max = backend.max_transfer().unwrap_or(u64::MAX);
        let size = backend.size();
        let live_size = backend.live_size();
        let reported_blocks = size >> lba_shift;
        Self {
            nsid,
            backend,
            lba_shift,
            nguid,
            eui64,
            uuid,
            shared: false,
            uncorrectable: crate::uncorrectable::Uncorrectable::default(),
            stats: std::sync::Arc::default(),
            max_request: backend_max,
            reported_blocks,
            size,
            live_size,
        }
    }

    /// Capacity in logical blocks.
    #[inline]
    pub fn blocks(&self) -> u64 {
        let bytes = match &self.live_size {
            Some(cell) => cell.load(std::sync::atomic::Ordering::Relaxed),
            None => self.size,
        };
        bytes >> self.lba_shift
    }

    /// Byte offset and length of the LBA range in CDW10-12 (NVM command set 1.0 §3.2.4),
    /// checked against the namespace's size.
    #[inline]
    pub fn lba_range(&self, sqe: &nvme_spec::Submission) -> Result<(u64, u64), Status> {
        let slba = u64::from(sqe.cdw10.get()) | (u64::from(sqe.cdw11.get()) << 32);
        let nlb = u64::from(sqe.cdw12.get() & 0xffff) + 1;
        match slba.checked_add(nlb) {
            Some(end) if end <= self.blocks() => {
                Ok((slba << self.lba_shift, nlb << self.lba_shift))
            }
            _ => Err(Status::LBA_OUT_OF_RANGE),
        }
    }

    /// True when a block of byte range `offset..offset + len` is uncorrectable (a read of it
    /// fails with Unrecovered Read Error). One branch while none is.
    #[inline]
    pub fn is_uncorrectable(&self, offset: u64, len: u64) -> bool {
        !self.uncorrectable.is_empty()
            && self
                .uncorrectable
                .overlaps(offset >> self.lba_shift, len >> self.lba_shift)
    }

    /// The blocks of byte range `offset..offset + len` are being written or deallocated: no
    /// longer uncorrectable. One branch while none is.
    #[inline]
    pub fn clear_uncorrectable(&mut self, offset: u64, len: u64, serial: &str) {
        if self.uncorrectable.is_empty() {
            return;
        }
        let (slba, nlb) = (offset >> self.lba_shift, len >> self.lba_shift);
        if self.uncorrectable.clear(slba, nlb) {
            crate::warn_limited!(
                "{serial}: namespace {}: {} uncorrectable ranges: a write split one, its \
                 shorter piece reads again",
                self.nsid,
                crate::uncorrectable::MAX_RANGES
            );
        }
    }
}

/// FNV-1a over `data` with `salt`: stable across runs and platforms (identifiers must not
/// change when the daemon restarts with the same config).
pub fn stable_hash(data: &[u8], salt: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt.wrapping_mul(0x100_0000_01b3);
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// The index of the namespace with `nsid` in `namespaces` (sorted by NSID), if attached.
pub fn index_of(namespaces: &[Namespace], nsid: u32) -> Option<usize> {
    match namespaces {
        [only] => (only.nsid == nsid).then_some(0),
        all => all.binary_search_by_key(&nsid, |n| n.nsid).ok(),
    }
}
