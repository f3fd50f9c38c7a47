//! NVMe/TCP PDUs (transport spec 1.0 §3.6): validation and decoding of what the peer sent,
//! encoding of what we send.
//!
//! A receiver reads the 8-byte common header, calls [`check_common`] (which bounds the PDU
//! length before anything more is read), reads the rest and calls [`decode`]. Every field
//! is untrusted: an error carries the Fatal Error Status and the offending field's offset
//! (FES/FEI) for the termination request the receiver sends before closing the connection.
//! A data digest mismatch is not fatal: it fails only the command it belongs to.

use nvme_spec::tcp::{
    CommonHeader, DIGEST_LEN, DataHeader, InitConnection, TERM_REQ_MAX_DATA, TermReq, fes, flags,
    hlen, pdu_type,
};
use nvme_spec::{Completion, Submission};
use zerocopy::{FromBytes, IntoBytes};

/// Which side receives the PDUs being decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Host to controller: what a target receives.
    ToController,
    /// Controller to host: what an initiator receives.
    ToHost,
}

/// Connection parameters agreed by ICReq/ICResp.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Most data bytes one PDU may carry (in-capsule data, MAXH2CDATA, our C2H chunks).
    pub max_data: u32,
}

impl Default for Negotiated {
    /// Before the connection is initialized: no digests, no data.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_data: 0,
        }
    }
}

/// A decoded PDU; data slices borrow the receive buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pdu<'a> {
    IcReq {
        pfv: u16,
        hpda: u8,
        dgst: u8,
        maxr2t: u32,
    },
    IcResp {
        pfv: u16,
        cpda: u8,
        dgst: u8,
        maxh2cdata: u32,
    },
    /// A termination request from the peer (H2C or C2H by direction).
    TermReq {
        fes: u16,
        fei: u32,
        header: &'a [u8],
    },
    CapsuleCmd {
        sqe: Submission,
        data: &'a [u8],
    },
    CapsuleResp {
        cqe: Completion,
    },
    H2CData {
        cccid: u16,
        ttag: u16,
        offset: u32,
        data: &'a [u8],
        last: bool,
    },
    C2HData {
        cccid: u16,
        offset: u32,
        data: &'a [u8],
        last: bool,
        success: bool,
    },
    R2T {
        cccid: u16,
        ttag: u16,
        offset: u32,
        length: u32,
    },
}

/// Why a PDU was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    /// Fatal to the connection: send a termination request with `fes`/`fei`, then close.
    #[error("fatal PDU error (FES {fes:#x}, FEI {fei}): {what}")]
    Fatal {
        fes: u16,
        fei: u32,
        what: &'static str,
    },
    /// The data digest of a data-carrying PDU did not match: its data is not to be used,
    /// and its command fails (the header, covered by its own checks, says which).
    #[error("data digest mismatch for command {}", .0.cccid)]
    DataDigest(DigestFailure),
}

/// The header of a PDU whose data failed its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DigestFailure {
    pub pdu_type: u8,
    pub cccid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub length: u32,
    pub last: bool,
    pub success: bool,
}

const fn fatal(fes: u16, fei: u32, what: &'static str) -> PduError {
    PduError::Fatal { fes, fei, what }
}

/// Offsets of common header fields, reported as FEI.
const FEI_TYPE: u32 = 0;
const FEI_FLAGS: u32 = 1;
const FEI_HLEN: u32 = 2;
const FEI_PDO: u32 = 3;
const FEI_PLEN: u32 = 4;

fn expected_hlen(t: u8) -> Option<u8> {
    Some(match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => hlen::IC,
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => hlen::TERM_REQ,
        pdu_type::CAPSULE_CMD => hlen::CAPSULE_CMD,
        pdu_type::CAPSULE_RESP => hlen::CAPSULE_RESP,
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => hlen::DATA,
        pdu_type::R2T => hlen::R2T,
        _ => return None,
    })
}

fn received_by(t: u8) -> Direction {
    match t {
        pdu_type::IC_REQ | pdu_type::H2C_TERM_REQ | pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA => {
            Direction::ToController
        }
        _ => Direction::ToHost,
    }
}

/// PDU types that may carry data (and so digests and a PDO).
fn carries_data(t: u8) -> bool {
    matches!(
        t,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    )
}

/// Initialization and termination PDUs never carry digests.
fn digestible(t: u8) -> bool {
    !matches!(
        t,
        pdu_type::IC_REQ | pdu_type::IC_RESP | pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ
    )
}

/// Check the common header (the first 8 bytes) of a PDU received in direction `dir` before
/// reading the rest; returns it, its `plen` bounded by what `neg` allows.
pub fn check_common(
    bytes: &[u8; 8],
    dir: Direction,
    neg: &Negotiated,
) -> Result<CommonHeader, PduError> {
    let ch = CommonHeader::read_from_bytes(bytes).expect("8 bytes");
    let t = ch.pdu_type;
    let Some(want_hlen) = expected_hlen(t) else {
        return Err(fatal(
            fes::INVALID_HEADER_FIELD,
            FEI_TYPE,
            "unknown PDU type",
        ));
    };
    if received_by(t) != dir {
        return Err(fatal(
            fes::INVALID_HEADER_FIELD,
            FEI_TYPE,
            "PDU type sent in the wrong direction",
        ));
    }
    if ch.hlen != want_hlen {
        return Err(fatal(fes::INVALID_HEADER_FIELD, FEI_HLEN, "wrong HLEN"));
    }
    let hd = digestible(t) && neg.header_digest;
    let dd_allowed = carries_data(t) && neg.data_digest;
    let known = flags::HDGSTF
        | flags::DDGSTF
        | if matches!(t, pdu_type::H2C_DATA | pdu_type::C2H_DATA) {
            flags::LAST_PDU
        } else {
            0
        }
        | if t == pdu_type::C2H_DATA {
            flags::SUCCESS
        } else {
            0
        };
    if ch.flags & !known != 0
        || (ch.flags & flags::HDGSTF != 0) != hd
        || (ch.flags & flags::DDGSTF != 0 && !dd_allowed)
    {
        return Err(fatal(
            fes::INVALID_HEADER_FIELD,
            FEI_FLAGS,
            "flags do not match the PDU type or the negotiated digests",
        ));
    }
    let header = u32::from(ch.hlen) + if hd { DIGEST_LEN as u32 } else { 0 };
    let plen = ch.plen.get();
    let pdo = u32::from(ch.pdo);
    match t {
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => {
            if plen < header || plen > header + TERM_REQ_MAX_DATA as u32 {
                return Err(fatal(fes::INVALID_HEADER_FIELD, FEI_PLEN, "bad PLEN"));
            }
        }
        _ if !carries_data(t) => {
            if pdo != 0 {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PDO,
                    "PDO on a PDU without data",
                ));
            }
            if plen != header {
                return Err(fatal(fes::INVALID_HEADER_FIELD, FEI_PLEN, "bad PLEN"));
            }
        }
        _ => {
            if plen < header {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PLEN,
                    "PLEN shorter than the header",
                ));
            }
            let has_data = plen > header;
            if has_data && (pdo < header || pdo > plen) {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PDO,
                    "PDO outside the PDU",
                ));
            }
            // we ask for no padding (PDA 0): data starts on a dword (TCP transport §3.6.2)
            if has_data && pdo % 4 != 0 {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PDO,
                    "PDO not a multiple of 4",
                ));
            }

            if !has_data && (pdo != 0 || ch.flags & flags::DDGSTF != 0) {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PDO,
                    "PDO or data digest without data",
                ));
            }
            if has_data && (ch.flags & flags::DDGSTF != 0) != neg.data_digest {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_FLAGS,
                    "data digest flag",
                ));
            }
            let dd = if has_data && neg.data_digest {
                DIGEST_LEN as u32
            } else {
                0
            };
            let data = if has_data { plen - pdo } else { 0 };
            if data < dd {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    FEI_PLEN,
                    "PLEN cuts the data digest",
                ));
            }
            if data - dd > neg.max_data {
                return Err(fatal(
                    fes::DATA_OUT_OF_RANGE,
                    FEI_PLEN,
                    "more data in one PDU than negotiated",
                ));
            }
        }
    }
    Ok(ch)
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

fn digest_at(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + DIGEST_LEN].try_into().expect("4 bytes"))
}

/// Decode a whole PDU (exactly `plen` bytes) received in direction `dir`.
pub fn decode<'a>(buf: &'a [u8], dir: Direction, neg: &Negotiated) -> Result<Pdu<'a>, PduError> {
    let Some(first) = buf.first_chunk::<8>() else {
        return Err(fatal(
            fes::INVALID_HEADER_FIELD,
            FEI_PLEN,
            "shorter than a header",
        ));
    };
    let ch = check_common(first, dir, neg)?;
    if buf.len() != ch.plen.get() as usize {
        return Err(fatal(
            fes::INVALID_HEADER_FIELD,
            FEI_PLEN,
            "PLEN differs from the PDU read",
        ));
    }
    let t = ch.pdu_type;
    let hl = usize::from(ch.hlen);
    let hd = digestible(t) && neg.header_digest;
    if hd && crc(&buf[..hl]) != digest_at(buf, hl) {
        return Err(fatal(fes::HEADER_DIGEST_ERROR, 0, "header digest mismatch"));
    }
    let header = &buf[..hl];
    // data between PDO and the data digest
    let data = if carries_data(t) && ch.pdo != 0 {
        let end = buf.len() - if neg.data_digest { DIGEST_LEN } else { 0 };
        &buf[usize::from(ch.pdo)..end]
    } else {
        &[][..]
    };
    let data_digest_ok =
        !neg.data_digest || data.is_empty() || crc(data) == digest_at(buf, buf.len() - DIGEST_LEN);
    match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => {
            let ic = InitConnection::read_from_bytes(header).expect("HLEN checked");
            if ic.pfv.get() != 0 {
                return Err(fatal(fes::UNSUPPORTED_PARAMETER, 8, "PDU format version"));
            }
            if ic.pda > 31 {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    10,
                    "PDU data alignment above 31",
                ));
            }
            if ic.dgst & !3 != 0 {
                return Err(fatal(fes::INVALID_HEADER_FIELD, 11, "unknown digest bits"));
            }
            let v = ic.maxr2t_or_maxh2cdata.get();
            Ok(if t == pdu_type::IC_REQ {
                Pdu::IcReq {
                    pfv: 0,
                    hpda: ic.pda,
                    dgst: ic.dgst,
                    maxr2t: v,
                }
            } else {
                if v < 4096 || v % 4 != 0 {
                    return Err(fatal(
                        fes::INVALID_HEADER_FIELD,
                        12,
                        "MAXH2CDATA below 4096 or unaligned",
                    ));
                }
                Pdu::IcResp {
                    pfv: 0,
                    cpda: ic.pda,
                    dgst: ic.dgst,
                    maxh2cdata: v,
                }
            })
        }
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => {
            let tr = TermReq::read_from_bytes(header).expect("HLEN checked");
            Ok(Pdu::TermReq {
                fes: tr.fes.get(),
                fei: tr.fei.get(),
                header: &buf[hl..],
            })
        }
        pdu_type::CAPSULE_CMD => {
            let sqe = Submission::read_from_bytes(&header[8..]).expect("HLEN checked");
            if !data_digest_ok {
                return Err(PduError::DataDigest(DigestFailure {
                    pdu_type: t,
                    cccid: sqe.cid.get(),
                    ttag: 0,
                    offset: 0,
                    length: data.len() as u32,
                    last: true,
                    success: false,
                }));
            }
            Ok(Pdu::CapsuleCmd { sqe, data })
        }
        pdu_type::CAPSULE_RESP => Ok(Pdu::CapsuleResp {
            cqe: Completion::read_from_bytes(&header[8..]).expect("HLEN checked"),
        }),
        _ => {
            let dh = DataHeader::read_from_bytes(header).expect("HLEN checked");
            let cccid = dh.cccid.get();
            if t != pdu_type::R2T && dh.length.get() as usize != data.len() {
                return Err(fatal(
                    fes::INVALID_HEADER_FIELD,
                    16,
                    "DATAL differs from the data carried",
                ));
            }
            if dh.offset.get().checked_add(dh.length.get()).is_none() {
                return Err(fatal(
                    fes::DATA_OUT_OF_RANGE,
                    12,
                    "data offset + length overflows",
                ));
            }
            let last = ch.flags & flags::LAST_PDU != 0;
            if !data_digest_ok {
                return Err(PduError::DataDigest(DigestFailure {
                    pdu_type: t,
                    cccid,
                    ttag: dh.ttag.get(),
                    offset: dh.offset.get(),
                    length: dh.length.get(),
                    last,
                    success: ch.flags & flags::SUCCESS != 0 && last,
                }));
            }
            Ok(match t {
                pdu_type::H2C_DATA => Pdu::H2CData {
                    cccid,
                    ttag: dh.ttag.get(),
                    offset: dh.offset.get(),
                    data,
                    last,
                },
                pdu_type::C2H_DATA => {
                    let success = ch.flags & flags::SUCCESS != 0;
                    if success && !last {
                        return Err(fatal(
                            fes::INVALID_HEADER_FIELD,
                            FEI_FLAGS,
                            "SUCCESS without LAST_PDU",
                        ));
                    }
                    Pdu::C2HData {
                        cccid,
                        offset: dh.offset.get(),
                        data,
                        last,
                        success,
                    }
                }
                _ => {
                    if dh.length.get() == 0 {
                        return Err(fatal(fes::INVALID_HEADER_FIELD, 16, "R2T for no data"));
                    }
                    Pdu::R2T {
                        cccid,
                        ttag: dh.ttag.get(),
                        offset: dh.offset.get(),
                        length: dh.length.get(),
                    }
                }
            })
        }
    }
}

/// Encode `pdu` for sending with the parameters `neg` (digests as negotiated; data placed
/// right after the header) into `out`, replacing its contents.
pub fn encode(pdu: &Pdu<'_>, neg: &Negotiated, out: &mut Vec<u8>) {
    out.clear();
    encode_append(pdu, neg, out);
}

/// Encode `pdu` like [`encode`], appending to `out` (a send buffer with PDUs queued).
pub fn encode_append(pdu: &Pdu<'_>, neg: &Negotiated, out: &mut Vec<u8>) {
    let data = pdu_data(pdu);
    if encode_header(pdu, data.len(), neg, out) {
        out.extend_from_slice(data);
        out.extend_from_slice(&crc(data).to_le_bytes());
    } else {
        out.extend_from_slice(data);
    }
}

/// The data a PDU value carries.
fn pdu_data<'a>(pdu: &Pdu<'a>) -> &'a [u8] {
    match *pdu {
        Pdu::TermReq { header, .. } => &header[..header.len().min(TERM_REQ_MAX_DATA)],
        Pdu::CapsuleCmd { data, .. } | Pdu::H2CData { data, .. } | Pdu::C2HData { data, .. } => {
            data
        }
        _ => &[],
    }
}

/// Append the header of `pdu` (and its header digest) to `out` for a PDU that carries
/// `data_len` bytes of data; the data slice inside `pdu` is ignored, so data can come from
/// scattered buffers. The caller appends the data next and, when this returns true, its
/// CRC32C data digest (see [`data_digest`]).
pub fn encode_header(pdu: &Pdu<'_>, data_len: usize, neg: &Negotiated, out: &mut Vec<u8>) -> bool {
    let base = out.len();
    let (t, mut fl): (u8, u8) = match *pdu {
        Pdu::IcReq { .. } => (pdu_type::IC_REQ, 0),
        Pdu::IcResp { .. } => (pdu_type::IC_RESP, 0),
        // a term request goes the other way from what we receive; callers pick by role
        Pdu::TermReq { .. } => (pdu_type::C2H_TERM_REQ, 0),
        Pdu::CapsuleCmd { .. } => (pdu_type::CAPSULE_CMD, 0),
        Pdu::CapsuleResp { .. } => (pdu_type::CAPSULE_RESP, 0),
        Pdu::H2CData { last, .. } => (pdu_type::H2C_DATA, if last { flags::LAST_PDU } else { 0 }),
        Pdu::C2HData { last, success, .. } => (
            pdu_type::C2H_DATA,
            (if last { flags::LAST_PDU } else { 0 }) | if success { flags::SUCCESS } else { 0 },
        ),
        Pdu::R2T { .. } => (pdu_type::R2T, 0),
    };
    let hl = expected_hlen(t).expect("known type");
    let hd = digestible(t) && neg.header_digest;
    let dd = carries_data(t) && neg.data_digest && data_len > 0;
    if hd {
        fl |= flags::HDGSTF;
    }
    if dd {
        fl |= flags::DDGSTF;
    }
    let header_len = usize::from(hl) + if hd { DIGEST_LEN } else { 0 };
    let pdo = if carries_data(t) && data_len > 0 {
        header_len as u8
    } else {
        0
    };
    let plen = header_len + data_len + if dd { DIGEST_LEN } else { 0 };
    out.resize(base + usize::from(hl), 0);
    let hdr = &mut out[base..];
    let ch = CommonHeader {
        pdu_type: t,
        flags: fl,
        hlen: hl,
        pdo,
        plen: (plen as u32).into(),
    };
    hdr[..8].copy_from_slice(ch.as_bytes());
    match *pdu {
        Pdu::IcReq {
            pfv,
            hpda,
            dgst,
            maxr2t,
        } => {
            write_ic(hdr, pfv, hpda, dgst, maxr2t);
        }
        Pdu::IcResp {
            pfv,
            cpda,
            dgst,
            maxh2cdata,
        } => {
            write_ic(hdr, pfv, cpda, dgst, maxh2cdata);
        }
        Pdu::TermReq { fes, fei, .. } => {
            hdr[8..10].copy_from_slice(&fes.to_le_bytes());
            hdr[10..14].copy_from_slice(&fei.to_le_bytes());
        }
        Pdu::CapsuleCmd { sqe, .. } => hdr[8..72].copy_from_slice(sqe.as_bytes()),
        Pdu::CapsuleResp { cqe } => hdr[8..24].copy_from_slice(cqe.as_bytes()),
        Pdu::H2CData {
            cccid,
            ttag,
            offset,
            ..
        } => {
            write_data_header(hdr, cccid, ttag, offset, data_len as u32);
        }
        Pdu::C2HData { cccid, offset, .. } => {
            write_data_header(hdr, cccid, 0, offset, data_len as u32);
        }
        Pdu::R2T {
            cccid,
            ttag,
            offset,
            length,
        } => {
            write_data_header(hdr, cccid, ttag, offset, length);
        }
    }
    if hd {
        let c = crc(&out[base..base + usize::from(hl)]);
        out.extend_from_slice(&c.to_le_bytes());
    }
    dd
}

/// CRC32C data digest over data in several pieces (in order).
pub fn data_digest<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> u32 {
    pieces.into_iter().fold(0, crc32c::crc32c_append)
}

fn write_ic(out: &mut [u8], pfv: u16, pda: u8, dgst: u8, v: u32) {
    out[8..10].copy_from_slice(&pfv.to_le_bytes());
    out[10] = pda;
    out[11] = dgst;
    out[12..16].copy_from_slice(&v.to_le_bytes());
}

fn write_data_header(out: &mut [u8], cccid: u16, ttag: u16, offset: u32, length: u32) {
    out[8..10].copy_from_slice(&cccid.to_le_bytes());
    out[10..12].copy_from_slice(&ttag.to_le_bytes());
    out[12..16].copy_from_slice(&offset.to_le_bytes());
    out[16..20].copy_from_slice(&length.to_le_bytes());
}

/// The termination request to send for a fatal error on a PDU whose header starts `bad`
/// (up to 152 bytes of it are echoed). `to_host` picks C2HTermReq (a target answering a
/// host) over H2CTermReq.
pub fn encode_term_req(fes: u16, fei: u32, bad: &[u8], to_host: bool, out: &mut Vec<u8>) {
    encode(
        &Pdu::TermReq {
            fes,
            fei,
            header: bad,
        },
        &Negotiated::default(),
        out,
    );
    if !to_host {
        out[0] = pdu_type::H2C_TERM_REQ;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Negotiated = Negotiated {
        header_digest: false,
        data_digest: false,
        max_data: 8192,
    };
    const DIGESTS: Negotiated = Negotiated {
        header_digest: true,
        data_digest: true,
        max_data: 8192,
    };

    fn sqe(cid: u16) -> Submission {
        let mut s = Submission::default();
        s.opcode = 0x01;
        s.cid = cid.into();
        s.nsid = 1.into();
        s
    }

    fn roundtrip(p: &Pdu<'_>, dir: Direction, neg: Negotiated) -> Vec<u8> {
        let mut out = Vec::new();
        encode(p, &neg, &mut out);
        let back = decode(&out, dir, &neg).unwrap_or_else(|e| panic!("{p:?}: {e}"));
        assert_eq!(&back, p);
        out
    }

    #[test]
    fn every_pdu_round_trips_with_and_without_digests() {
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut cqe = Completion::default();
        cqe.cid = 7.into();
        for neg in [PLAIN, DIGESTS] {
            use Direction::{ToController as C, ToHost as H};
            let ic = Pdu::IcReq {
                pfv: 0,
                hpda: 0,
                dgst: 3,
                maxr2t: 0,
            };
            roundtrip(&ic, C, neg);
            let icr = Pdu::IcResp {
                pfv: 0,
                cpda: 0,
                dgst: 3,
                maxh2cdata: 131_072,
            };
            roundtrip(&icr, H, neg);
            roundtrip(
                &Pdu::CapsuleCmd {
                    sqe: sqe(3),
                    data: &[],
                },
                C,
                neg,
            );
            let out = roundtrip(
                &Pdu::CapsuleCmd {
                    sqe: sqe(3),
                    data: &data,
                },
                C,
                neg,
            );
            let extra = if neg.header_digest { 8 } else { 0 };
            assert_eq!(out.len(), 72 + 4096 + extra);
            roundtrip(&Pdu::CapsuleResp { cqe }, H, neg);
            let h2c = Pdu::H2CData {
                cccid: 3,
                ttag: 9,
                offset: 4096,
                data: &data,
                last: true,
            };
            roundtrip(&h2c, C, neg);
            let c2h = Pdu::C2HData {
                cccid: 3,
                offset: 0,
                data: &data,
                last: true,
                success: true,
            };
            roundtrip(&c2h, H, neg);
            let r2t = Pdu::R2T {
                cccid: 3,
                ttag: 9,
                offset: 0,
                length: 8192,
            };
            roundtrip(&r2t, H, neg);
        }
        let mut out = Vec::new();
        encode_term_req(fes::HEADER_DIGEST_ERROR, 0, &[0xee; 200], false, &mut out);
        match decode(&out, Direction::ToController, &PLAIN).unwrap() {
            Pdu::TermReq { fes, header, .. } => {
                assert_eq!((fes, header.len()), (fes::HEADER_DIGEST_ERROR, 128));
            }
            p => panic!("{p:?}"),
        }
    }

    fn fatal_of(buf: &[u8], dir: Direction, neg: Negotiated) -> (u16, u32) {
        match decode(buf, dir, &neg) {
            Err(PduError::Fatal { fes, fei, .. }) => (fes, fei),
            r => panic!("expected a fatal error, got {r:?}"),
        }
    }

    #[test]
    fn malformed_pdus_are_fatal_with_the_offending_field() {
        use Direction::{ToController as C, ToHost as H};
        let data = [0x5au8; 512];
        let mut cmd = Vec::new();
        encode(
            &Pdu::CapsuleCmd {
                sqe: sqe(1),
                data: &data,
            },
            &PLAIN,
            &mut cmd,
        );
        let inv = fes::INVALID_HEADER_FIELD;

        let mut b = cmd.clone();
        b[0] = 0x08; // no such type
        assert_eq!(fatal_of(&b, C, PLAIN), (inv, 0));
        // a command capsule sent to a host
        assert_eq!(fatal_of(&cmd, H, PLAIN), (inv, 0));
        let mut b = cmd.clone();
        b[2] = 71;
        assert_eq!(fatal_of(&b, C, PLAIN), (inv, 2));
        // header digest flag without the negotiation, and missing with it
        let mut b = cmd.clone();
        b[1] |= flags::HDGSTF;
        assert_eq!(fatal_of(&b, C, PLAIN), (inv, 1));
        assert_eq!(fatal_of(&cmd, C, DIGESTS), (inv, 1));
        // PDO inside the header, PDO past the end
        let mut b = cmd.clone();
        b[3] = 8;
        assert_eq!(fatal_of(&b, C, PLAIN), (inv, 3));
        // PLEN bigger than what was read, smaller than the header, too much data
        let mut b = cmd.clone();
        b[4..8].copy_from_slice(&10_000u32.to_le_bytes());
        assert_eq!(fatal_of(&b, C, PLAIN).1, 4);
        let mut b = cmd.clone();
        b[4..8].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(fatal_of(&b, C, PLAIN), (inv, 4));
        let small = Negotiated {
            max_data: 256,
            ..PLAIN
        };
        assert_eq!(fatal_of(&cmd, C, small), (fes::DATA_OUT_OF_RANGE, 4));
        // truncated anywhere
        for n in [0, 3, 8, 71, 72, 200] {
            assert!(decode(&cmd[..n], C, &PLAIN).is_err(), "{n} bytes");
        }
        // H2CData whose DATAL disagrees with the data carried
        let mut h2c = Vec::new();
        let p = Pdu::H2CData {
            cccid: 1,
            ttag: 1,
            offset: 0,
            data: &data,
            last: true,
        };
        encode(&p, &PLAIN, &mut h2c);
        h2c[16..20].copy_from_slice(&511u32.to_le_bytes());
        assert_eq!(fatal_of(&h2c, C, PLAIN), (inv, 16));
        // offset + length overflowing
        encode(&p, &PLAIN, &mut h2c);
        h2c[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(fatal_of(&h2c, C, PLAIN), (fes::DATA_OUT_OF_RANGE, 12));
        // SUCCESS without LAST_PDU
        let mut c2h = Vec::new();
        let p = Pdu::C2HData {
            cccid: 1,
            offset: 0,
            data: &data,
            last: true,
            success: true,
        };
        encode(&p, &PLAIN, &mut c2h);
        c2h[1] &= !flags::LAST_PDU;
        assert_eq!(fatal_of(&c2h, H, PLAIN), (inv, 1));
        // ICReq: a PDU format version we do not speak, unknown digest bits
        let mut ic = Vec::new();
        encode(
            &Pdu::IcReq {
                pfv: 1,
                hpda: 0,
                dgst: 0,
                maxr2t: 0,
            },
            &PLAIN,
            &mut ic,
        );
        assert_eq!(fatal_of(&ic, C, PLAIN), (fes::UNSUPPORTED_PARAMETER, 8));
        encode(
            &Pdu::IcReq {
                pfv: 0,
                hpda: 0,
                dgst: 4,
                maxr2t: 0,
            },
            &PLAIN,
            &mut ic,
        );
        assert_eq!(fatal_of(&ic, C, PLAIN), (inv, 11));
        // ICResp promising less than 4 KiB per H2CData
        encode(
            &Pdu::IcResp {
                pfv: 0,
                cpda: 0,
                dgst: 0,
                maxh2cdata: 512,
            },
            &PLAIN,
            &mut ic,
        );
        assert_eq!(fatal_of(&ic, H, PLAIN), (inv, 12));
    }

    #[test]
    fn digest_errors_header_fatal_data_per_command() {
        let data = [1u8; 1024];
        let mut cmd = Vec::new();
        encode(
            &Pdu::CapsuleCmd {
                sqe: sqe(42),
                data: &data,
            },
            &DIGESTS,
            &mut cmd,
        );
        let mut b = cmd.clone();
        b[20] ^= 1; // inside the SQE: the header digest no longer matches
        assert_eq!(
            fatal_of(&b, Direction::ToController, DIGESTS),
            (fes::HEADER_DIGEST_ERROR, 0)
        );
        let mut b = cmd.clone();
        b[100] ^= 1; // inside the data
        assert_eq!(
            decode(&b, Direction::ToController, &DIGESTS),
            Err(PduError::DataDigest(DigestFailure {
                pdu_type: pdu_type::CAPSULE_CMD,
                cccid: 42,
                ttag: 0,
                offset: 0,
                length: (b.len() - 72 - 8) as u32,
                last: true,
                success: false,
            }))
        );
        // the known CRC32C check value: "123456789" -> 0xe3069283
        assert_eq!(crc(b"123456789"), 0xe306_9283);
    }
}
