//! Where namespaces created at run time (NVMe Namespace Management, `vnvme ns create`) get
//! their blocks: `malloc:SIZE` (memory, lost at exit) or `dir:PATH:SIZE` (a sparse file per
//! namespace in PATH, removed when the namespace is deleted). SIZE caps the total.
//!
//! Created namespaces live as long as the daemon: the configuration file stays the source
//! of truth at the next start.

use std::path::PathBuf;

use device_model::backend::{Backend, FileBackend};
use sriov::{MemoryPool, NamespacePool};

use crate::backend_spec::parse_size;

/// A parsed `namespace_pool` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolSpec {
    Malloc { capacity: u64 },
    Dir { path: PathBuf, capacity: u64 },
}

/// What a `namespace_pool` value must look like.
pub const POOL_SYNTAX: &str = "malloc:SIZE or dir:PATH:SIZE (SIZE at least 1M, e.g. 4G)";

impl std::str::FromStr for PoolSpec {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let size = |v: &str| parse_size(v).filter(|&n| n >= 1 << 20).ok_or(POOL_SYNTAX);
        if let Some(v) = s.strip_prefix("malloc:") {
            return Ok(PoolSpec::Malloc { capacity: size(v)? });
        }
        if let Some(v) = s.strip_prefix("dir:") {
            let (path, cap) = v.rsplit_once(':').ok_or(POOL_SYNTAX)?;
            if path.is_empty() {
                return Err(POOL_SYNTAX);
            }
            return Ok(PoolSpec::Dir {
                path: path.into(),
                capacity: size(cap)?,
            });
        }
        Err(POOL_SYNTAX)
    }
}

impl PoolSpec {
    /// The pool of subsystem `nqn` (its files are named after it).
    pub fn open(&self, nqn: &str) -> Box<dyn NamespacePool> {
        match self {
            PoolSpec::Malloc { capacity } => Box::new(MemoryPool {
                capacity: *capacity,
            }),
            PoolSpec::Dir { path, capacity } => Box::new(DirPool {
                dir: path.clone(),
                prefix: nqn
                    .chars()
                    .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                    .collect(),
                capacity: *capacity,
            }),
        }
    }
}

struct DirPool {
    dir: PathBuf,
    prefix: String,
    capacity: u64,
}

impl DirPool {
    fn path(&self, nsid: u32) -> PathBuf {
        self.dir.join(format!("{}.ns{nsid}.img", self.prefix))
    }
}

impl NamespacePool for DirPool {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn create(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        let path = self.path(nsid);
        // a new namespace starts zeroed: drop whatever an earlier run left there
        let _ = std::fs::remove_file(&path);
        let b = FileBackend::open(&path, Some(size)).map_err(|e| e.to_string())?;
        Ok(Box::new(b))
    }

    fn delete(&mut self, nsid: u32) {
        let path = self.path(nsid);
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("{}: {e}", path.display());
        }
    }

    fn describe(&self) -> String {
        format!("files in {}, {} bytes", self.dir.display(), self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "malloc:1G".parse(),
            Ok(PoolSpec::Malloc { capacity: 1 << 30 })
        );
        assert_eq!(
            "dir:/var/lib/x:2G".parse(),
            Ok(PoolSpec::Dir {
                path: "/var/lib/x".into(),
                capacity: 2 << 30
            })
        );
        for bad in [
            "",
            "malloc:",
            "malloc:12",
            "dir:/x",
            "dir::1G",
            "file:/x:1G",
            "malloc:1Q",
        ] {
            assert!(bad.parse::<PoolSpec>().is_err(), "{bad}");
        }
    }

    #[test]
    fn dir_pool_makes_and_removes_files() {
        let dir = std::env::temp_dir().join(format!("vnvme-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = PoolSpec::Dir {
            path: dir.clone(),
            capacity: 1 << 30,
        };
        let mut p = spec.open("nqn.x:y");
        let b = p.create(3, 1 << 20).unwrap();
        assert_eq!(b.size(), 1 << 20);
        let f = dir.join("nqn_x_y.ns3.img");
        assert!(f.exists());
        drop(b);
        p.delete(3);
        assert!(!f.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
