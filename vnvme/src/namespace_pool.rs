//! Where namespaces created at run time (NVMe Namespace Management, `vnvme ns create`) get
//! their blocks: `malloc:SIZE` (memory, lost at exit), `dir:PATH:SIZE` (a sparse file per
//! namespace in PATH, removed when the namespace is deleted; SIZE caps the total) or
//! `lvs:STORE` (a thin volume of a volume store per namespace).
//!
//! Created namespaces live as long as the daemon: the configuration file stays the source
//! of truth at the next start. Under a supervisor they outlive each worker: the next one
//! reopens a `dir:` namespace's file or an `lvs:` namespace's volume with its data
//! ([`NamespacePool::reopen`]); a `malloc:` pool is refused there.

use std::path::PathBuf;

use device_model::backend::{Backend, FileBackend};
use sriov::{MemoryPool, NamespacePool};

use crate::pool_spec::PoolSpec;

impl PoolSpec {
    /// The pool of subsystem `nqn` (its files and volumes are named after it; an `lvs:`
    /// pool takes its store from `stores`).
    pub fn open(
        &self,
        nqn: &str,
        stores: &crate::lvstores::Lvstores,
    ) -> Result<Box<dyn NamespacePool>, String> {
        let prefix: String = nqn
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        Ok(match self {
            PoolSpec::Malloc {
                capacity,
                kept: None,
            } => Box::new(MemoryPool {
                capacity: *capacity,
            }),
            PoolSpec::Malloc {
                capacity,
                kept: Some(key),
            } => Box::new(KeptMemoryPool {
                ram: crate::supervisor::handover::kept_ram(key)
                    .ok_or_else(|| format!("no kept RAM {key} for the pool (no supervisor?)"))?,
                capacity: *capacity,
            }),
            PoolSpec::Dir { path, capacity } => Box::new(DirPool {
                dir: path.clone(),
                prefix,
                capacity: *capacity,
            }),
            PoolSpec::Lvs { store } => Box::new(LvsPool {
                store: stores.store(store)?,
                // volume names have at most 128 characters: the NQN's end is kept
                prefix: prefix[prefix.len().saturating_sub(100)..].to_owned(),
                doomed: Vec::new(),
            }),
        })
    }
}

/// A `malloc:` pool under a supervisor: one sparse memfd the supervisor keeps, NSID `n`'s
/// namespace at `(n - 1)` slots ([`crate::pool_spec::kept_pool_slot`]), so the next worker
/// reopens each with its data.
struct KeptMemoryPool {
    ram: std::os::fd::OwnedFd,
    capacity: u64,
}

impl KeptMemoryPool {
    /// Where namespace `nsid` of `size` bytes lives; refused beyond its slot.
    fn range(&self, nsid: u32, size: u64) -> Result<(u64, u64), String> {
        let slot = crate::pool_spec::kept_pool_slot(self.capacity);
        if nsid == 0 || nsid > sriov::MAX_NAMESPACES || size > slot {
            return Err(format!(
                "namespace {nsid} of {size} bytes does not fit the pool"
            ));
        }
        Ok((u64::from(nsid - 1) * slot, slot))
    }
}

impl NamespacePool for KeptMemoryPool {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn create(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        use std::os::fd::AsFd;
        let (at, slot) = self.range(nsid, size)?;
        // a new namespace starts zeroed: what an earlier one of this NSID left goes
        sys_util::kept_ram::punch(self.ram.as_fd(), at, slot).map_err(|e| e.to_string())?;
        let b = device_model::backend::MallocBackend::kept_range(self.ram.as_fd(), at, size)
            .map_err(|e| e.to_string())?;
        Ok(Box::new(b))
    }

    fn reopen(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        use std::os::fd::AsFd;
        let (at, _) = self.range(nsid, size)?;
        let b = device_model::backend::MallocBackend::kept_range(self.ram.as_fd(), at, size)
            .map_err(|e| e.to_string())?;
        Ok(Box::new(b))
    }

    fn delete(&mut self, nsid: u32) {
        use std::os::fd::AsFd;
        // its memory goes back (the backend's mapping, if still open, reads zeroes)
        if let Ok((at, slot)) = self.range(nsid, 0)
            && let Err(e) = sys_util::kept_ram::punch(self.ram.as_fd(), at, slot)
        {
            log::warn!("namespace {nsid}: its kept RAM not given back: {e}");
        }
    }

    fn describe(&self) -> String {
        format!("memory kept by the supervisor, {} bytes", self.capacity)
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

    fn reopen(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        let path = self.path(nsid);
        let b = FileBackend::open(&path, None).map_err(|e| format!("{}: {e}", path.display()))?;
        if b.size() != size {
            return Err(format!(
                "{} holds {} bytes, not {size}",
                path.display(),
                b.size()
            ));
        }
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

/// Namespaces as thin volumes `PREFIX.nsN` of a volume store: the guest's Namespace
/// Management makes thin namespaces.
struct LvsPool {
    store: volumes::lvol::Store,
    prefix: String,
    /// Volumes of deleted namespaces whose backend was still open: deleted later.
    doomed: Vec<String>,
}

impl LvsPool {
    fn name(&self, nsid: u32) -> String {
        format!("{}.ns{nsid}", self.prefix)
    }

    fn retry(&mut self) {
        let store = &self.store;
        self.doomed.retain(|n| store.delete(n).is_err());
    }
}

impl NamespacePool for LvsPool {
    fn capacity(&self) -> u64 {
        self.store.status().capacity
    }

    fn create(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        self.retry();
        let name = self.name(nsid);
        if !size.is_multiple_of(4096) {
            return Err("a namespace in a volume store is a multiple of 4 KiB".into());
        }
        if self.store.list().iter().any(|v| v.name == name) {
            // left by an earlier run (namespaces made at run time do not outlive the daemon)
            self.store.delete(&name).map_err(|e| e.to_string())?;
        }
        self.store
            .create(&name, size, true)
            .map_err(|e| e.to_string())?;
        let b = self.store.open(&name).map_err(|e| e.to_string())?;
        Ok(Box::new(b))
    }

    fn reopen(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        let name = self.name(nsid);
        let b = self.store.open(&name).map_err(|e| format!("{name}: {e}"))?;
        if b.size() != size {
            return Err(format!("{name} holds {} bytes, not {size}", b.size()));
        }
        Ok(Box::new(b))
    }

    fn delete(&mut self, nsid: u32) {
        let name = self.name(nsid);
        if self.store.delete(&name).is_err() {
            self.doomed.push(name);
        }
    }

    fn describe(&self) -> String {
        format!("thin volumes in volume store {}", self.store.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_refused() {
        assert_eq!(
            "malloc:1G".parse(),
            Ok(PoolSpec::Malloc {
                capacity: 1 << 30,
                kept: None
            })
        );
        assert_eq!(
            "dir:/var/lib/x:2G".parse(),
            Ok(PoolSpec::Dir {
                path: "/var/lib/x".into(),
                capacity: 2 << 30
            })
        );
        assert_eq!(
            "lvs:pool".parse(),
            Ok(PoolSpec::Lvs {
                store: "pool".into()
            })
        );
        for bad in [
            "",
            "lvs:",
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

    /// A kept `malloc:` pool: NSID n's namespace is its own range of one sparse memfd;
    /// reopened it keeps its data, created anew or deleted it is zeroes.
    #[test]
    fn kept_ram_pool_ranges_by_nsid() {
        use std::os::unix::fs::FileExt;
        let cap = 8 << 20;
        let fd = sys_util::kept_ram::create(c"test-pool", crate::pool_spec::kept_pool_bytes(cap))
            .unwrap();
        let file = std::fs::File::from(fd.try_clone().unwrap());
        let mut p = KeptMemoryPool {
            ram: fd,
            capacity: cap,
        };
        let slot = crate::pool_spec::kept_pool_slot(cap);
        let at = 2 * slot + 4096; // NSID 3
        let read = || {
            let mut b = [0u8; 4];
            file.read_exact_at(&mut b, at).unwrap();
            b
        };
        drop(p.create(3, 4 << 20).unwrap());
        file.write_all_at(b"data", at).unwrap();
        let again = p.reopen(3, 4 << 20).unwrap();
        assert_eq!(again.size(), 4 << 20);
        drop(again);
        assert_eq!(&read(), b"data", "reopened with its data");
        drop(p.create(3, 4 << 20).unwrap());
        assert_eq!(read(), [0; 4], "a new namespace starts zeroed");
        file.write_all_at(b"data", at).unwrap();
        p.delete(3);
        assert_eq!(read(), [0; 4], "deleted: its RAM given back");
        assert!(p.create(3, slot + 4096).is_err(), "larger than a slot");
        assert!(p.create(0, 4096).is_err());
        assert!(p.create(sriov::MAX_NAMESPACES + 1, 4096).is_err());
        assert!(
            p.reopen(sriov::MAX_NAMESPACES, 4096).is_ok(),
            "the last NSID fits"
        );
    }

    #[test]
    fn dir_pool_makes_and_removes_files() {
        let dir = std::env::temp_dir().join(format!("vnvme-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = PoolSpec::Dir {
            path: dir.clone(),
            capacity: 1 << 30,
        };
        let mut p = spec
            .open("nqn.x:y", &crate::lvstores::Lvstores::default())
            .unwrap();
        let b = p.create(3, 1 << 20).unwrap();
        assert_eq!(b.size(), 1 << 20);
        let f = dir.join("nqn_x_y.ns3.img");
        assert!(f.exists());
        drop(b);
        std::fs::write(&f, vec![7u8; 1 << 20]).unwrap();
        // a supervised worker's successor: the same file, its data kept
        let again = p.reopen(3, 1 << 20).unwrap();
        assert_eq!(again.size(), 1 << 20);
        drop(again);
        assert_eq!(std::fs::read(&f).unwrap()[4096], 7);
        assert!(p.reopen(3, 2 << 20).is_err(), "another size");
        p.delete(3);
        assert!(!f.exists());
        assert!(p.reopen(3, 1 << 20).is_err(), "deleted");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
