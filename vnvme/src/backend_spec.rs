//! Namespace backend specs as users write them: `null:1G`, `malloc:256M`,
//! `file:/path/to/img[:SIZE]`, `nvme:vfio-user:/path/to.sock[@NSID[:OFFSET+LENGTH]]` or
//! `nvme:pci:DDDD:BB:DD.F[@NSID[:OFFSET+LENGTH]]` (a namespace of another NVMe controller,
//! or a byte range of one, through the user-space host driver; several namespaces may share
//! one device, each on its own range), or `nvme-tcp://HOST:PORT[,HOST:PORT]/NQN[/NSID][?OPTS]`
//! (a namespace of a remote NVMe/TCP subsystem; see `nvmeof::initiator::TcpUrl`).

use std::path::PathBuf;

use device_model::backend::{Backend, FileBackend, MallocBackend, NullBackend};
use std::sync::Arc;

use device_model::GuestMemory;
use host_driver::controller::HIGH_DMA_IOVA_BASE;
use pcie_p2p::{DeviceRegistry, NvmeBackend, TransferStats};

use crate::device_address::DeviceAddress;

/// DMA memory of an `nvme:` backend device: queues and bounce buffers for the namespaces
/// that share it.
const NVME_BACKEND_DMA: u64 = 256 << 20;
/// I/O queue pairs asked of an `nvme:` backend device: one per namespace backend on it.
const NVME_BACKEND_QUEUES: u16 = 64;

/// A parsed backend spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendSpec {
    Null {
        size: u64,
    },
    Malloc {
        size: u64,
        /// Under a supervisor, `malloc:SIZE@KEY`: the RAM is the memfd the supervisor keeps
        /// as `KEY` and hands to every worker (its data outlives each of them).
        kept: Option<String>,
    },
    File {
        path: PathBuf,
        size: Option<u64>,
    },
    Nvme {
        target: DeviceAddress,
        nsid: u32,
        /// Byte offset and length within the namespace; the whole namespace when `None`.
        range: Option<(u64, u64)>,
    },
    NvmeTcp(nvmeof::initiator::TcpUrl),
    /// A RAID array or concat the daemon assembled (`[[array]]`, `raid_create`).
    Array {
        name: String,
    },
    /// A logical volume of a volume store the daemon loaded (`[[lvstore]]`, `lvs_create`):
    /// `lvol:STORE/NAME`.
    Lvol {
        store: String,
        volume: String,
    },
}

/// Why a spec was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "'{0}': expected null:SIZE, malloc:SIZE, file:PATH[:SIZE] or \
         nvme:TARGET[@NSID[:OFFSET+LENGTH]] (TARGET vfio-user:/path.sock or pci:DDDD:BB:DD.F) \
         or nvme-tcp://HOST:PORT/NQN[/NSID] or array:NAME or lvol:STORE/NAME"
    )]
    Syntax(String),
    #[error("'{0}': bad size (a number with an optional K, M, G or T suffix, at least 1M)")]
    Size(String),
    #[error("'{0}': {1}")]
    Url(String, nvmeof::initiator::UrlError),
}

/// `Err` naming `what` when its backend `spec` keeps its data in the process's own memory
/// (`malloc:` without kept RAM, `malloc:SIZE@KEY`, which a supervisor names for every
/// `malloc:` spec it sees): a supervised worker (`serve --supervised`) that is killed or
/// replaced under its hosts would take that data with it, while they see no power loss.
pub fn refuse_in_worker(what: &str, spec: &str) -> Result<(), String> {
    if spec.starts_with("malloc:") && !spec.contains('@') {
        return Err(format!(
            "{what} on {spec}: its data would die with the worker (serve --supervised); use file:"
        ));
    }
    Ok(())
}

/// A kept RAM key as the supervisor makes them: `c` (configured) or `r` (run time) and a
/// number.
fn is_ram_key(key: &str) -> bool {
    key.len() > 1
        && key.len() <= 12
        && key.starts_with(['c', 'r'])
        && key[1..].bytes().all(|b| b.is_ascii_digit())
}

/// `spec` with its RAM kept as `key` (`malloc:SIZE@KEY`), when it is a `malloc:` spec that
/// names no kept RAM yet; `None` otherwise.
pub fn keep_ram(spec: &str, key: &str) -> Option<String> {
    match spec.parse() {
        Ok(BackendSpec::Malloc { kept: None, .. }) => Some(format!("{}@{key}", spec.trim())),
        _ => None,
    }
}

/// Parse `512`, `64K`, `256M`, `1G`, `2T` (binary multiples).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1u64 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        (i, 'T' | 't') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

impl std::str::FromStr for BackendSpec {
    type Err = SpecError;
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        if nvmeof::initiator::is_fabrics_url(spec) {
            return spec
                .parse()
                .map(BackendSpec::NvmeTcp)
                .map_err(|e| SpecError::Url(spec.into(), e));
        }
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| SpecError::Syntax(spec.into()))?;
        let size = |s: &str| {
            parse_size(s)
                .filter(|&n| n >= 1 << 20 && n % 4096 == 0)
                .ok_or_else(|| SpecError::Size(spec.into()))
        };
        match kind {
            "array" if !rest.is_empty() => Ok(BackendSpec::Array { name: rest.into() }),
            "lvol" => match rest.split_once('/') {
                Some((store, volume)) if !store.is_empty() && !volume.is_empty() => {
                    Ok(BackendSpec::Lvol {
                        store: store.into(),
                        volume: volume.into(),
                    })
                }
                _ => Err(SpecError::Syntax(spec.into())),
            },
            "null" => Ok(BackendSpec::Null { size: size(rest)? }),
            "malloc" => {
                let (sz, kept) = match rest.split_once('@') {
                    Some((sz, key)) if is_ram_key(key) => (sz, Some(key.to_owned())),
                    Some(_) => return Err(SpecError::Syntax(spec.into())),
                    None => (rest, None),
                };
                Ok(BackendSpec::Malloc {
                    size: size(sz)?,
                    kept,
                })
            }
            "file" if !rest.is_empty() => {
                // file:/path or file:/path:SIZE (a trailing :SIZE only if it parses as one)
                if let Some((path, sz)) = rest.rsplit_once(':')
                    && let Some(n) = parse_size(sz)
                {
                    size(sz)?;
                    return Ok(BackendSpec::File {
                        path: path.into(),
                        size: Some(n),
                    });
                }
                Ok(BackendSpec::File {
                    path: rest.into(),
                    size: None,
                })
            }
            "nvme" => {
                let syntax = || SpecError::Syntax(spec.into());
                let (target, nsid, range) = match rest.rsplit_once('@') {
                    Some((t, n)) => {
                        let (n, range) = match n.split_once(':') {
                            Some((n, r)) => {
                                let (off, len) = r.split_once('+').ok_or_else(syntax)?;
                                let off = parse_size(off).ok_or_else(syntax)?;
                                let len = parse_size(len).filter(|&l| l > 0).ok_or_else(syntax)?;
                                (n, Some((off, len)))
                            }
                            None => (n, None),
                        };
                        let nsid = n
                            .parse::<u32>()
                            .ok()
                            .filter(|&n| n != 0 && n != u32::MAX)
                            .ok_or_else(syntax)?;
                        (t, nsid, range)
                    }
                    None => (rest, 1, None),
                };
                let target = target.parse::<DeviceAddress>().map_err(|_| syntax())?;
                Ok(BackendSpec::Nvme {
                    target,
                    nsid,
                    range,
                })
            }
            _ => Err(SpecError::Syntax(spec.into())),
        }
    }
}

/// Errors creating a backend.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Malloc(#[from] device_model::backend::MallocError),
    #[error(transparent)]
    File(#[from] device_model::backend::FileError),
    #[error("{0}")]
    Nvme(String),
    #[error(transparent)]
    NvmeTcp(#[from] nvmeof::initiator::SessionError),
    #[error("array {0}: {1}")]
    Array(String, String),
    #[error("lvol {0}: {1}")]
    Lvol(String, String),
    #[error("kept RAM {0}: {1}")]
    KeptRam(String, String),
}

/// An opened backend, with the transfer counters of an `nvme:` one.
pub struct Opened {
    pub backend: Box<dyn Backend>,
    pub transfer: Option<Arc<TransferStats>>,
}

impl BackendSpec {
    /// Create the backend for a namespace of a controller whose guest memory is `guest`
    /// (an `nvme:` backend mirrors it into the backend device for zero copy; `nvme:`
    /// backends on the same target share the device opened in `devices`).
    pub fn open(
        &self,
        guest: &Arc<GuestMemory>,
        devices: &mut DeviceRegistry,
    ) -> Result<Opened, OpenError> {
        let backend: Box<dyn Backend> = match self {
            BackendSpec::Null { size } => Box::new(NullBackend::new(*size)),
            BackendSpec::Malloc { size, kept: None } => Box::new(MallocBackend::new(*size)?),
            BackendSpec::Malloc {
                size,
                kept: Some(key),
            } => {
                let fd = crate::supervisor::handover::kept_ram(key).ok_or_else(|| {
                    OpenError::KeptRam(key.clone(), "no supervisor handed it over".into())
                })?;
                Box::new(MallocBackend::kept(fd, *size)?)
            }
            BackendSpec::File { path, size } => Box::new(FileBackend::open(path, *size)?),
            BackendSpec::Nvme {
                target,
                nsid,
                range,
            } => {
                // DMA memory above user space, so guest memory can be mirrored at its host
                // address; an IOMMU with a narrower aperture gets the usual base (and then
                // guest I/O bounces, counted)
                let dev = devices
                    .get_or_open(&target.to_string(), || {
                        target
                            .open_with_dma_base(
                                NVME_BACKEND_DMA,
                                NVME_BACKEND_QUEUES,
                                HIGH_DMA_IOVA_BASE,
                            )
                            .or_else(|e| {
                                log::warn!(
                                    "{target}: DMA memory at {HIGH_DMA_IOVA_BASE:#x}: {e:#}; retrying lower"
                                );
                                target.open(NVME_BACKEND_DMA, NVME_BACKEND_QUEUES)
                            })
                    })
                    .map_err(|e| OpenError::Nvme(format!("{e:#}")))?;
                let b = NvmeBackend::new(dev, *nsid, *range, Some(Arc::clone(guest)))
                    .map_err(|e| OpenError::Nvme(e.to_string()))?;
                let transfer = Some(b.stats());
                return Ok(Opened {
                    backend: Box::new(b),
                    transfer,
                });
            }
            BackendSpec::NvmeTcp(url) => {
                let mut b = nvmeof::initiator::TcpBackend::connect(url)?;
                b.set_guest_memory(Arc::clone(guest));
                Box::new(b)
            }
            BackendSpec::Array { name } => {
                return Err(OpenError::Array(
                    name.clone(),
                    "arrays are taken from the daemon's array list, not opened".into(),
                ));
            }
            BackendSpec::Lvol { store, volume } => {
                return Err(OpenError::Lvol(
                    format!("{store}/{volume}"),
                    "volumes are opened from the daemon's volume stores".into(),
                ));
            }
        };
        Ok(Opened {
            backend,
            transfer: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_refuses_garbage() {
        assert_eq!("null:1G".parse(), Ok(BackendSpec::Null { size: 1 << 30 }));
        assert_eq!(
            "malloc:256M".parse(),
            Ok(BackendSpec::Malloc {
                size: 256 << 20,
                kept: None
            })
        );
        assert_eq!(
            "malloc:64M@r12".parse(),
            Ok(BackendSpec::Malloc {
                size: 64 << 20,
                kept: Some("r12".into())
            })
        );
        for bad in [
            "malloc:64M@",
            "malloc:64M@x1",
            "malloc:64M@r",
            "malloc:64M@r1@r2",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
        assert_eq!(
            keep_ram("malloc:64M", "c0").as_deref(),
            Some("malloc:64M@c0")
        );
        assert_eq!(keep_ram("malloc:64M@c0", "c1"), None);
        assert_eq!(keep_ram("null:64M", "c1"), None);
        assert_eq!(
            "file:/tmp/a.img".parse(),
            Ok(BackendSpec::File {
                path: "/tmp/a.img".into(),
                size: None
            })
        );
        assert_eq!(
            "file:/tmp/a.img:2G".parse(),
            Ok(BackendSpec::File {
                path: "/tmp/a.img".into(),
                size: Some(2 << 30)
            })
        );
        assert_eq!(
            "file:/odd:name".parse(),
            Ok(BackendSpec::File {
                path: "/odd:name".into(),
                size: None
            })
        );
        assert!(matches!(
            "malloc".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
        assert_eq!(
            "nvme:vfio-user:/tmp/b.sock@2".parse(),
            Ok(BackendSpec::Nvme {
                target: DeviceAddress::VfioUser("/tmp/b.sock".into()),
                nsid: 2,
                range: None
            })
        );
        assert_eq!(
            "nvme:pci:0000:01:00.0@1:512M+256M".parse(),
            Ok(BackendSpec::Nvme {
                target: DeviceAddress::Pci("0000:01:00.0".into()),
                nsid: 1,
                range: Some((512 << 20, 256 << 20))
            })
        );
        assert_eq!(
            "nvme:pci:0000:01:00.0".parse(),
            Ok(BackendSpec::Nvme {
                target: DeviceAddress::Pci("0000:01:00.0".into()),
                nsid: 1,
                range: None
            })
        );
        for bad in [
            "nvme:",
            "nvme:vfio-user:/x@0",
            "nvme:pci:1:2",
            "nvme:tcp:x@1",
            "nvme:pci:0000:01:00.0@1:0",
            "nvme:pci:0000:01:00.0@1:0+0",
            "nvme:pci:0000:01:00.0@1:x+1M",
            "nvme:pci:0000:01:00.0@:0+1M",
            "nvme-tcp://h/nqn",
            "nvme-tcp://h:4420/nqn/0",
        ] {
            assert!(bad.parse::<BackendSpec>().is_err(), "{bad}");
        }
        assert!(matches!(
            "nvme-tcp://127.0.0.1:4420/nqn.2014-08.org.x:y/3?ddgst".parse::<BackendSpec>(),
            Ok(BackendSpec::NvmeTcp(u)) if u.nsid == 3 && u.data_digest
        ));
        assert!(matches!(
            "malloc:lots".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "malloc:100".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert!(matches!(
            "malloc:99999999999999999999T".parse::<BackendSpec>(),
            Err(SpecError::Size(_))
        ));
        assert_eq!(
            "array:vol0".parse(),
            Ok(BackendSpec::Array {
                name: "vol0".into()
            })
        );
        assert!("array:".parse::<BackendSpec>().is_err());
        assert!(matches!(
            "tape:1G".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
        assert!(matches!(
            "file:".parse::<BackendSpec>(),
            Err(SpecError::Syntax(_))
        ));
    }
}
