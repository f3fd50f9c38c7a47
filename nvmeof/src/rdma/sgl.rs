//! The data pointer of a command capsule on an RDMA queue (NVMe/RDMA 1.0 §3.3, base spec
//! SGL descriptors): in-capsule data (Data Block, Offset subtype) or one Keyed SGL Data
//! Block naming the host's buffer by remote address and key. Decoded from untrusted bytes;
//! the length is checked by the caller against what the command may move, and the address
//! and key by the host's adapter when the target reads or writes them.

use nvme_spec::fabrics::sgl_id;
use nvme_spec::{Status, Submission};
use zerocopy::FromBytes;

/// Where a command's data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPointer {
    /// No data.
    None,
    /// `len` bytes in the capsule, right after the command.
    InCapsule { len: usize },
    /// `len` bytes of the host's memory at `addr` under `key`.
    Keyed { addr: u64, len: usize, key: u32 },
}

/// A Keyed SGL Data Block's fields from a command's data pointer (SGL1: bytes 24..39).
pub fn keyed(sqe: &Submission) -> (u64, usize, u32) {
    let raw = sqe.prp2.get();
    (
        sqe.prp1.get(),
        (raw & 0x00ff_ffff) as usize,
        (raw >> 24) as u32,
    )
}

/// The host's key to invalidate with the response to `sqe`: a Keyed SGL Data Block of the
/// Invalidate Key subtype (§3.3: the controller invalidates it by Send with Invalidate).
pub fn invalidate_key(sqe: &Submission) -> Option<u32> {
    let (_, len, key) = keyed(sqe);
    ((sqe.prp2.get() >> 56) as u8 == sgl_id::KEYED_INVALIDATE && sqe.flags >> 6 == 1 && len > 0)
        .then_some(key)
}

/// Decode `sqe`'s data pointer; `in_capsule` is how many bytes followed the command.
pub fn data_pointer(sqe: &Submission, in_capsule: usize) -> Result<DataPointer, Status> {
    if sqe.flags >> 6 != 1 {
        // PRPs (or reserved PSDT) have no meaning over a fabric
        return Err(Status::INVALID_FIELD);
    }
    let raw = sqe.prp2.get();
    match (raw >> 56) as u8 {
        sgl_id::INCAPSULE => {
            let len = raw as u32 as usize;
            if sqe.prp1.get() != 0 {
                return Err(Status::SGL_OFFSET_INVALID);
            }
            if len != in_capsule {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            Ok(DataPointer::InCapsule { len })
        }
        sgl_id::KEYED | sgl_id::KEYED_INVALIDATE if in_capsule == 0 => {
            let (addr, len, key) = keyed(sqe);
            if len == 0 {
                return Ok(DataPointer::None);
            }
            Ok(DataPointer::Keyed { addr, len, key })
        }
        sgl_id::KEYED | sgl_id::KEYED_INVALIDATE => Err(Status::DATA_SGL_LENGTH_INVALID),
        0 if raw as u32 == 0 && in_capsule == 0 => Ok(DataPointer::None),
        _ => Err(Status::INVALID_SGL_TYPE),
    }
}

/// Split a received command capsule into its command and in-capsule data; `None` when it is
/// not one (shorter than a command, or longer than `max` bytes, the receive buffer).
pub fn split_capsule(capsule: &[u8], max: usize) -> Option<(Submission, &[u8])> {
    if !(64..=max).contains(&capsule.len()) {
        return None;
    }
    let (sqe, data) = Submission::read_from_prefix(capsule).ok()?;
    Some((sqe, data))
}

/// Point `sqe`'s data pointer at its `len` bytes of in-capsule data (what the target does
/// once it has read a Fabrics command's data from the host: the command then goes the way
/// of any in-capsule command).
pub fn set_in_capsule(sqe: &mut Submission, len: usize) {
    sqe.flags = (sqe.flags & 0x3f) | nvme_spec::fabrics::PSDT_SGL;
    sqe.prp1 = 0.into();
    sqe.prp2 = ((u64::from(sgl_id::INCAPSULE) << 56) | (len as u32 as u64)).into();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(id: u8, addr: u64, len: u32, key: u32) -> Submission {
        let mut s = Submission::default();
        s.flags = 0x40;
        s.prp1 = addr.into();
        s.prp2 =
            ((u64::from(id) << 56) | (u64::from(key) << 24) | u64::from(len & 0xff_ffff)).into();
        s
    }

    #[test]
    fn keyed_descriptors() {
        let s = cmd(sgl_id::KEYED_INVALIDATE, 0xdead_b000, 0x2_0000, 0x1234_5678);
        assert_eq!(
            data_pointer(&s, 0),
            Ok(DataPointer::Keyed {
                addr: 0xdead_b000,
                len: 0x2_0000,
                key: 0x1234_5678
            })
        );
        assert_eq!(invalidate_key(&s), Some(0x1234_5678));
        assert_eq!(invalidate_key(&cmd(sgl_id::KEYED, 1, 4096, 9)), None);
        // keyed with in-capsule bytes beside it: the lengths disagree
        assert_eq!(data_pointer(&s, 8), Err(Status::DATA_SGL_LENGTH_INVALID));
        assert_eq!(
            data_pointer(&cmd(sgl_id::KEYED, 1, 0, 9), 0),
            Ok(DataPointer::None)
        );
    }

    #[test]
    fn capsules_are_a_command_and_its_data() {
        assert!(split_capsule(&[0; 63], 8256).is_none());
        assert!(split_capsule(&[0; 8257], 8256).is_none());
        let (sqe, data) = split_capsule(&[1; 100], 8256).unwrap();
        assert_eq!((sqe.opcode, data.len()), (1, 36));
    }

    #[test]
    fn in_capsule_and_refusals() {
        let mut s = cmd(sgl_id::INCAPSULE, 0, 512, 0);
        s.prp2 = ((u64::from(sgl_id::INCAPSULE) << 56) | 512).into();
        assert_eq!(
            data_pointer(&s, 512),
            Ok(DataPointer::InCapsule { len: 512 })
        );
        assert_eq!(data_pointer(&s, 511), Err(Status::DATA_SGL_LENGTH_INVALID));
        s.prp1 = 64.into();
        assert_eq!(data_pointer(&s, 512), Err(Status::SGL_OFFSET_INVALID));
        // TCP's transport data block means nothing here
        assert_eq!(
            data_pointer(&cmd(sgl_id::TRANSPORT, 0, 4096, 0), 0),
            Err(Status::INVALID_SGL_TYPE)
        );
        let mut prp = cmd(sgl_id::KEYED, 0, 4096, 1);
        prp.flags = 0;
        assert_eq!(data_pointer(&prp, 0), Err(Status::INVALID_FIELD));
        let mut back = cmd(sgl_id::KEYED, 7, 1024, 3);
        set_in_capsule(&mut back, 1024);
        assert_eq!(
            data_pointer(&back, 1024),
            Ok(DataPointer::InCapsule { len: 1024 })
        );
    }
}
