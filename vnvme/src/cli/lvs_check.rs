//! `vnvme lvs-check BACKEND`: verify a volume store offline (nothing is written): the
//! superblock copies' CRCs, the checkpoint's, every committed journal record's, and the
//! maps' rules (no cluster owned twice, thick volumes fully mapped, parents that exist);
//! free versus referenced clusters are counted. Exit status 0: clean; 1: not.

use std::sync::Arc;

use device_model::GuestMemory;
use pcie_p2p::DeviceRegistry;
use vnvme::backend_spec::BackendSpec;

/// Check a volume store on a backend, offline.
#[derive(Debug, clap::Args)]
pub struct LvsCheckArgs {
    /// The backend holding the store (file:PATH, nvme:..., nvme-tcp://...)
    pub backend: String,
    /// machine-readable output
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &LvsCheckArgs) -> anyhow::Result<i32> {
    let spec: BackendSpec = args.backend.parse()?;
    if matches!(spec, BackendSpec::Array { .. } | BackendSpec::Lvol { .. }) {
        anyhow::bail!(
            "{}: check a store on a plain backend (file:, nvme:, nvme-tcp://)",
            args.backend
        );
    }
    let guest = Arc::new(GuestMemory::new());
    let mut devices = DeviceRegistry::default();
    let mut base = spec.open(&guest, &mut devices)?.backend;
    let r = match volumes::lvol::check(base.as_mut()) {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                crate::cli::outln!(
                    "{}",
                    serde_json::json!({ "clean": false, "error": e.to_string() })
                );
            } else {
                crate::cli::outln!("{}: the store does not load: {e}", args.backend);
            }
            return Ok(1);
        }
    };
    if args.json {
        let v = serde_json::json!({
            "clean": r.is_clean(),
            "name": r.name,
            "generation": r.generation,
            "bad_superblock_copies": r.bad_copies,
            "journal_records": r.replayed,
            "volumes": r.volumes,
            "clusters": r.clusters,
            "referenced": r.referenced,
            "shared": r.shared,
            "free": r.free,
            "errors": r.errors,
        });
        crate::cli::outln!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        crate::cli::outln!(
            "store {} (generation {}): {} volumes, {} journal records replayed",
            r.name,
            r.generation,
            r.volumes,
            r.replayed
        );
        crate::cli::outln!(
            "clusters: {} total, {} referenced ({} shared), {} free",
            r.clusters,
            r.referenced,
            r.shared,
            r.free
        );
        for b in &r.bad_copies {
            crate::cli::outln!("note: a superblock copy was not used: {b}");
        }
        for e in &r.errors {
            crate::cli::outln!("error: {e}");
        }
        crate::cli::outln!("{}", if r.is_clean() { "clean" } else { "NOT clean" });
    }
    Ok(i32::from(!r.is_clean()))
}
