//! The daemon's volume stores (see `volumes::lvol`): loaded from their backends at start
//! (`[[lvstore]]`) or at run time (`lvs_create`), made on a backend that holds none, and
//! the volumes handed to the namespaces that name them (`lvol:STORE/NAME`).

use std::sync::Arc;

use device_model::GuestMemory;
use device_model::backend::Backend;
use pcie_p2p::DeviceRegistry;
use volumes::lvol::{Store, StoreOptions, StoreStatus, VolumeInfo};

use crate::backend_spec::{BackendSpec, refuse_in_worker};
use crate::config::LvstoreSpec;

/// One store the daemon knows.
struct Slot {
    store: Store,
    /// The backend spec as the user wrote it.
    backend: String,
}

/// The volume stores of a daemon.
#[derive(Default)]
pub struct Lvstores {
    list: Vec<Slot>,
    /// A supervised worker's: stores commit mapping changes before acknowledging a write,
    /// and none is made on `malloc:`.
    worker: bool,
}

impl std::fmt::Debug for Lvstores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|s| s.store.name()))
            .finish()
    }
}

/// How `lvs_create` found its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Made {
    /// It held this store: loaded.
    Loaded,
    /// It held none: a new store.
    Created,
}

impl Lvstores {
    /// No stores yet; `worker` for a supervised worker (see
    /// [`volumes::lvol::Store::set_mappings_before_ack`]).
    pub fn new(worker: bool) -> Self {
        Self {
            list: Vec::new(),
            worker,
        }
    }

    fn find(&self, name: &str) -> Result<&Slot, String> {
        self.list
            .iter()
            .find(|s| s.store.name() == name)
            .ok_or_else(|| format!("no volume store named {name}"))
    }

    /// The store named `name`.
    pub fn store(&self, name: &str) -> Result<Store, String> {
        self.find(name).map(|s| s.store.clone())
    }

    /// Load the store on `spec.backend`, or make one when the backend holds none; then
    /// make the volumes `spec` lists that it lacks.
    pub fn create(
        &mut self,
        spec: &LvstoreSpec,
        devices: &mut DeviceRegistry,
        arrays: &mut crate::arrays::Arrays,
    ) -> Result<Made, String> {
        spec.check(&|f: &str| f.to_string())
            .map_err(|e| e.to_string())?;
        if self.find(&spec.name).is_ok() {
            return Err(format!("a volume store named {} exists", spec.name));
        }
        if self.worker {
            // the supervisor checks the config; this is `lvs_create` at run time
            refuse_in_worker(&format!("volume store {}", spec.name), &spec.backend)?;
        }
        let own = spec.backend.starts_with("malloc:") || spec.backend.starts_with("null:");
        if !own && let Some(s) = self.list.iter().find(|s| s.backend == spec.backend) {
            return Err(format!(
                "{} holds volume store {} already",
                spec.backend,
                s.store.name()
            ));
        }
        let parsed: BackendSpec = spec.backend.parse().map_err(|e| format!("{e}"))?;
        let base: Box<dyn Backend> = match &parsed {
            BackendSpec::Array { name } => arrays.take(name, &format!("lvstore {}", spec.name))?,
            BackendSpec::Lvol { .. } => return Err("a store cannot live on a volume".into()),
            other => {
                let guest = Arc::new(GuestMemory::new());
                other
                    .open(&guest, devices)
                    .map(|o| o.backend)
                    .map_err(|e| format!("{}: {e}", spec.backend))?
            }
        };
        let opts = StoreOptions {
            name: spec.name.clone(),
            cluster_size: spec.cluster_bytes(),
            journal_len: None,
        };
        let (store, made) = match Store::load_or_format(base, &opts) {
            Ok((s, Some(report))) => {
                if s.name() != spec.name {
                    return Err(format!(
                        "{} holds volume store {}, not {}",
                        spec.backend,
                        s.name(),
                        spec.name
                    ));
                }
                for b in &report.bad_copies {
                    log::warn!(
                        "volume store {}: a superblock copy was not used: {b}",
                        spec.name
                    );
                }
                (s, Made::Loaded)
            }
            Ok((s, None)) => {
                log::info!("volume store {}: made on {}", spec.name, spec.backend);
                (s, Made::Created)
            }
            Err(e) => return Err(format!("{}: {e}", spec.backend)),
        };
        if let Some(p) = spec.warn_percent {
            store.set_threshold(p);
        }
        store.set_mappings_before_ack(self.worker);
        for v in &spec.volumes {
            if store.list().iter().any(|x| x.name == v.name) {
                continue;
            }
            let size = v.size.bytes().unwrap_or(0);
            store
                .create(&v.name, size, v.thin)
                .map_err(|e| format!("volume {}/{}: {e}", spec.name, v.name))?;
        }
        self.list.push(Slot {
            store,
            backend: spec.backend.clone(),
        });
        Ok(made)
    }

    /// Volume `volume` of store `store` as a namespace backend.
    pub fn open(&self, store: &str, volume: &str) -> Result<Box<dyn Backend>, String> {
        let s = self.find(store)?;
        s.store
            .open(volume)
            .map(|b| Box::new(b) as Box<dyn Backend>)
            .map_err(|e| e.to_string())
    }

    /// Stop store `name` (refused while a volume is open) and wipe its superblocks.
    pub fn delete(&mut self, name: &str) -> Result<(), String> {
        let i = self
            .list
            .iter()
            .position(|s| s.store.name() == name)
            .ok_or_else(|| format!("no volume store named {name}"))?;
        if !self.list[i].store.idle() {
            return Err(format!(
                "volume store {name} has volumes in use; delete their namespaces first"
            ));
        }
        let slot = self.list.remove(i);
        match slot.store.close() {
            Ok(mut base) => {
                if let Err(e) = volumes::lvol::wipe(base.as_mut()) {
                    log::warn!("volume store {name}: {e}");
                }
                Ok(())
            }
            Err((store, e)) => {
                self.list.insert(
                    i,
                    Slot {
                        store,
                        backend: slot.backend,
                    },
                );
                Err(e.to_string())
            }
        }
    }

    /// Every store's status and backend spec.
    pub fn list(&self) -> Vec<(StoreStatus, String)> {
        self.list
            .iter()
            .map(|s| (s.store.status(), s.backend.clone()))
            .collect()
    }

    /// The volumes of store `name`.
    pub fn volumes(&self, name: &str) -> Result<Vec<VolumeInfo>, String> {
        Ok(self.find(name)?.store.list())
    }

    /// Every store's name.
    pub fn names(&self) -> Vec<String> {
        self.list
            .iter()
            .map(|s| s.store.name().to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn cfg(store: &str) -> Result<Config, String> {
        Config::parse(
            &format!(
                "{store}\n[[controller]]\nsocket = \"/tmp/x.sock\"\n\
                 [[controller.namespace]]\nbackend = \"lvol:p/v\"\n"
            ),
            Path::new("t.toml"),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn stores_are_checked_field_by_field_then_made_or_loaded() {
        let ok = "[[lvstore]]\nname = \"p\"\nbackend = \"malloc:64M\"\ncluster_size = \"64K\"\n\
                  [[lvstore.volume]]\nname = \"v\"\nsize = \"8M\"\nthin = true";
        let c = cfg(ok).unwrap();
        assert_eq!(c.lvstores[0].cluster_bytes(), 64 << 10);
        for (bad, want) in [
            (
                "name = \"a b\"\nbackend = \"malloc:64M\"",
                "lvstore[0].name",
            ),
            (
                "name = \"p\"\nbackend = \"lvol:q/v\"",
                "cannot live on a volume",
            ),
            (
                "name = \"p\"\nbackend = \"malloc:64M\"\ncluster_size = \"3K\"",
                "cluster_size",
            ),
            (
                "name = \"p\"\nbackend = \"malloc:64M\"\nwarn_percent = 101",
                "warn_percent",
            ),
            (
                "name = \"p\"\nbackend = \"malloc:64M\"\n[[lvstore.volume]]\nname = \"v\"\nsize = 100",
                "volume[0].size",
            ),
        ] {
            let e = cfg(&format!("[[lvstore]]\n{bad}")).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let two = format!("{ok}\n[[lvstore]]\nname = \"p\"\nbackend = \"malloc:64M\"");
        assert!(cfg(&two).unwrap_err().contains("two volume stores"));
        // made on a blank file, loaded from it again; its volumes open as backends
        let dir = std::env::temp_dir().join(format!("vnvme-lvs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut spec = c.lvstores[0].clone();
        spec.backend = format!("file:{}:64M", dir.join("p.img").display());
        let mut devices = DeviceRegistry::default();
        let mut arrays = crate::arrays::Arrays::default();
        let mut stores = Lvstores::default();
        assert_eq!(
            stores.create(&spec, &mut devices, &mut arrays),
            Ok(Made::Created)
        );
        assert!(
            stores.create(&spec, &mut devices, &mut arrays).is_err(),
            "twice"
        );
        let b = stores.open("p", "v").unwrap();
        assert_eq!(b.size(), 8 << 20);
        assert!(stores.delete("p").unwrap_err().contains("in use"));
        drop(b);
        assert!(stores.open("p", "nope").is_err());
        assert!(
            stores
                .open("q", "v")
                .err()
                .is_some_and(|e| e.contains("no volume store"))
        );
        // a supervised worker refuses a store whose data would die with it
        let mut ram = c.lvstores[0].clone();
        ram.name = "r".into();
        let refused = Lvstores::new(true).create(&ram, &mut devices, &mut arrays);
        assert!(refused.is_err_and(|e| e.contains("serve --supervised")));
        // a second daemon finds it again (no delete: that wipes it)
        drop(stores);
        let mut again = Lvstores::default();
        assert_eq!(
            again.create(&spec, &mut devices, &mut arrays),
            Ok(Made::Loaded)
        );
        assert_eq!(again.volumes("p").unwrap().len(), 1);
        again.delete("p").unwrap();
        let mut third = Lvstores::default();
        assert_eq!(
            third.create(&spec, &mut devices, &mut arrays),
            Ok(Made::Created),
            "wiped"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
