//! Per-process resource budgets shared by every tenant: the fd table. Each DMA region a
//! client maps holds one duplicated fd, so the open-file limit is raised to its hard maximum
//! at start and divided among the controllers one daemon can serve, leaving a reserve for
//! sockets, backends and the management plane. One client filling its share can then never
//! make another tenant's `accept()` or DMA_MAP fail.

/// Controllers one daemon serves at most (PF + 127 VFs, or 128 entries).
const MAX_CONTROLLERS: u64 = 128;
/// Fds kept for everything that is not a DMA region (a supervisor's kept NVMe/TCP
/// connections among them: up to twice `kept_connections::MAX_HELD`).
const RESERVE: u64 = 1024 + 2 * crate::supervisor::kept_connections::MAX_HELD as u64;

/// What [`apply`] set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    pub nofile: u64,
    pub regions_per_client: usize,
}

/// Raise RLIMIT_NOFILE to its hard limit and set the per-client DMA region limit from it.
pub fn apply() -> Budget {
    let nofile = sys_util::process::raise_open_files_limit();
    let per = (nofile.saturating_sub(RESERVE) / MAX_CONTROLLERS).max(16);
    device_model::memory::set_max_regions(usize::try_from(per).unwrap_or(usize::MAX));
    let b = Budget {
        nofile,
        regions_per_client: device_model::memory::max_regions(),
    };
    log::debug!(
        "fd budget: RLIMIT_NOFILE {}, {} DMA regions per client",
        b.nofile,
        b.regions_per_client
    );
    b
}
