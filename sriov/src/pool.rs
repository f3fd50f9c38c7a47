//! Where Namespace Management gets the blocks of a new namespace.

use device_model::backend::{Backend, MallocBackend};

/// A source of backends for namespaces created at run time.
pub trait NamespacePool: Send {
    /// Bytes the pool can hand out in total.
    fn capacity(&self) -> u64;
    /// A backend of `size` bytes for new namespace `nsid`.
    fn create(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String>;
    /// The backend of namespace `nsid` of `size` bytes, created by an earlier process (a
    /// supervised worker's predecessor), with its data. Pools whose blocks die with the
    /// process cannot.
    fn reopen(&mut self, nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        let _ = (nsid, size);
        Err(format!(
            "{}: its namespaces die with the process",
            self.describe()
        ))
    }
    /// Namespace `nsid` was deleted; its backend is (or will soon be) dropped.
    fn delete(&mut self, nsid: u32);
    /// What the pool is, for logs and listings.
    fn describe(&self) -> String;
}

/// A pool in memory: each created namespace is a RAM backend, gone at exit.
#[derive(Debug, Clone, Copy)]
pub struct MemoryPool {
    /// Bytes it hands out in total.
    pub capacity: u64,
}

impl NamespacePool for MemoryPool {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn create(&mut self, _nsid: u32, size: u64) -> Result<Box<dyn Backend>, String> {
        let b = MallocBackend::new(size).map_err(|e| e.to_string())?;
        Ok(Box::new(b))
    }

    fn delete(&mut self, _nsid: u32) {}

    fn describe(&self) -> String {
        format!("memory, {} bytes", self.capacity)
    }
}
