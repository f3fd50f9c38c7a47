//! Daemon configuration: a TOML file (several controllers) or the `--socket/--ns` flags
//! (one controller). Every value is checked; errors name the field.
//!
//! ```toml
//! poll = "adaptive"              # or "busy"
//! reactors = 2                   # threads shared by all controllers (default: one each)
//! metrics = "127.0.0.1:9480"     # Prometheus endpoint, GET /metrics (default: none)
//! [[controller]]
//! socket = "/run/vnvme/nvme0.sock"
//! serial = "VNVME0001"           # also seeds the namespaces' NGUID/UUID/EUI-64
//! [[controller.namespace]]
//! backend = "malloc:256M"        # null:SIZE | malloc:SIZE | file:PATH[:SIZE]
//! block_size = 512               # 512 or 4096
//! attach = [0, 2]                # with vfs: seen by the PF (0) and VF 2 only (default: all)
//!
//! [[controller]]                 # exported over NVMe/TCP instead of vfio-user
//! tcp_listen = "127.0.0.1:4420"
//! rdma_listen = "192.0.2.1:4420"  # over NVMe/RDMA (with tcp_listen: the same controllers on both)
//! nqn = "nqn.2026-11.io.vnvme:disk1"
//! allowed_hosts = []             # host NQNs; empty: any host
//! tcp_controllers = 2            # host associations at once (one controller each)
//! vfs = 4                        # SR-IOV VFs (secondary controllers) on NAME.vfN.sock
//! vfs_online = true              # ... online at start (else: nvme virt-mgmt on the PF)
//! namespace_pool = "malloc:4G"   # room for namespaces created at run time (or dir:PATH:SIZE,
//!                                # or lvs:STORE: thin volumes of a volume store)
//! iops_limit = 20000             # QoS (any controller): I/O commands per second
//! bandwidth_limit = "200M"       # QoS: data bytes per second
//! [[controller.namespace]]
//! backend = "file:/var/lib/vnvme/disk1.img"
//! ```

use std::path::{Path, PathBuf};

use device_model::irq_coalescing::Coalescing;
use serde::{Deserialize, Serialize};

use crate::backend_spec::BackendSpec;

/// `[[controller]]` entries one daemon numbers (their CNTLIDs stay distinct: PF `index + 1`,
/// NVMe/TCP `index + 1 + k * 0x100` below 0x1000, VFs `0x1000 + index * 128 + n`).
pub const MAX_ENTRIES: usize = 128;
/// Most VFs of one PF (`vfs`).
pub const MAX_VFS: u64 = 127;

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub poll: PollSetting,
    /// Reactor threads shared by all controllers (round robin); absent or 0: one thread per
    /// controller.
    #[serde(default)]
    pub reactors: usize,
    /// Serve the Prometheus text format on `ADDR:PORT` (`GET /metrics`); `--metrics`
    /// overrides it.
    #[serde(default)]
    pub metrics: Option<String>,
    #[serde(rename = "controller", default)]
    pub controllers: Vec<ControllerSpec>,
    /// RAID arrays and concats, assembled from their members before the controllers
    /// start; a namespace uses one as `backend = "array:NAME"`.
    #[serde(rename = "array", default)]
    pub arrays: Vec<ArraySpec>,
    /// Volume stores, loaded (or made, on a backend that holds none) before the
    /// controllers start; a namespace uses a volume as `backend = "lvol:STORE/NAME"`.
    #[serde(rename = "lvstore", default)]
    pub lvstores: Vec<LvstoreSpec>,
}

/// A size in bytes: a number, or a string with a K, M, G or T suffix.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    /// The bytes, if it parses.
    pub fn bytes(&self) -> Option<u64> {
        match self {
            SizeValue::Bytes(n) => Some(*n),
            SizeValue::Text(s) => crate::backend_spec::parse_size(s),
        }
    }
}

/// One volume store (`[[lvstore]]`, or the parameters of `lvs_create`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LvstoreSpec {
    pub name: String,
    /// The backend it lives on (any spec but `lvol:`; `array:NAME` takes that array).
    pub backend: String,
    /// Cluster size for a new store (default 1M); a loaded store keeps its own.
    pub cluster_size: Option<SizeValue>,
    /// Percent of the store in use at which hosts get a warning (default 90).
    pub warn_percent: Option<u8>,
    /// Volumes made at start when the store lacks them (`[[lvstore.volume]]`).
    #[serde(rename = "volume", default)]
    pub volumes: Vec<LvolSpec>,
}

/// A volume a `[[lvstore]]` makes at start if missing.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LvolSpec {
    pub name: String,
    pub size: SizeValue,
    #[serde(default)]
    pub thin: bool,
}

impl LvstoreSpec {
    /// The cluster size in bytes.
    pub fn cluster_bytes(&self) -> u64 {
        self.cluster_size
            .as_ref()
            .and_then(SizeValue::bytes)
            .unwrap_or(volumes::lvol::DEFAULT_CLUSTER)
    }

    /// Check the fields; why not, naming the field.
    pub fn check(&self, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        check_name(&self.name, at)?;
        let spec: BackendSpec = self
            .backend
            .parse()
            .map_err(|e: crate::backend_spec::SpecError| field(at("backend"), e.to_string()))?;
        if matches!(spec, BackendSpec::Lvol { .. }) {
            return Err(field(at("backend"), "a store cannot live on a volume"));
        }
        if let Some(c) = &self.cluster_size {
            let ok = c
                .bytes()
                .is_some_and(|n| n.is_power_of_two() && (16 << 10..=64 << 20).contains(&n));
            if !ok {
                return Err(field(
                    at("cluster_size"),
                    "a power of two from 16K to 64M, e.g. \"1M\"",
                ));
            }
        }
        if self.warn_percent.is_some_and(|p| p > 100) {
            return Err(field(at("warn_percent"), "0 to 100"));
        }
        for (j, v) in self.volumes.iter().enumerate() {
            volumes::lvol::meta::check_name(&v.name)
                .map_err(|e| field(at(&format!("volume[{j}].name")), e.to_string()))?;
            if !v.size.bytes().is_some_and(|n| n > 0 && n % 4096 == 0) {
                return Err(field(
                    at(&format!("volume[{j}].size")),
                    "a positive multiple of 4096 bytes, e.g. \"1G\"",
                ));
            }
        }
        Ok(())
    }
}

/// One array (`[[array]]`, or the parameters of `raid_create`).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArraySpec {
    pub name: String,
    /// raid0, raid1, raid10 or concat.
    pub level: String,
    /// Member backend specs, in slot order (null:, malloc:, file:, nvme:, nvme-tcp://).
    pub members: Vec<String>,
    /// Strip size in KiB (raid0, raid10; default 64).
    pub strip_size_kb: Option<u64>,
    /// Rebuild rate limit in MB/s (default 200; 0: none).
    pub rebuild_rate_mb: Option<u64>,
}

impl ArraySpec {
    /// Check the fields; why not, naming the field.
    pub fn check(&self, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
        check_name(&self.name, at)?;
        let level: volumes::raid::Level = self
            .level
            .parse()
            .map_err(|e: String| field(at("level"), e))?;
        level
            .check_members(self.members.len())
            .map_err(|e| field(at("members"), e))?;
        let mut seen = std::collections::HashSet::new();
        for m in &self.members {
            let spec: BackendSpec = m
                .parse()
                .map_err(|e: crate::backend_spec::SpecError| field(at("members"), e.to_string()))?;
            if matches!(spec, BackendSpec::Array { .. }) {
                return Err(field(
                    at("members"),
                    "an array cannot be a member of an array",
                ));
            }
            // RAM and null members are each their own; anything else names storage that two
            // members cannot share
            let own = matches!(spec, BackendSpec::Malloc { .. } | BackendSpec::Null { .. });
            if !own && !seen.insert(m.trim()) {
                return Err(field(at("members"), format!("{m} is listed twice")));
            }
        }
        if let Some(kb) = self.strip_size_kb
            && (!(4..=16384).contains(&kb) || !kb.is_power_of_two())
        {
            return Err(field(at("strip_size_kb"), "a power of two from 4 to 16384"));
        }
        Ok(())
    }
}

/// How a controller given by flags is reached: a vfio-user socket, NVMe/TCP, or both (two
/// controllers of one subsystem sharing the namespaces).
#[derive(Clone, Debug, Default)]
pub struct Served {
    pub socket: Option<PathBuf>,
    pub tcp_listen: Option<String>,
    /// Serve the NVMe/TCP export over NVMe/RDMA too, on this address.
    pub rdma_listen: Option<String>,
    pub nqn: Option<String>,
    pub allowed_hosts: Vec<String>,
}

impl Served {
    /// Only a vfio-user socket.
    pub fn socket(path: PathBuf) -> Self {
        Self {
            socket: Some(path),
            ..Self::default()
        }
    }
}

/// Reactor idle policy.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PollSetting {
    #[default]
    Adaptive,
    Busy,
}

/// One controller.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSpec {
    /// vfio-user socket to serve the controller on.
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Export over NVMe/TCP on this address instead (`HOST:PORT`).
    pub tcp_listen: Option<String>,
    /// Export the same controllers over NVMe/RDMA too, on this address (`IP:PORT`, an
    /// address of an RDMA device's interface); needs `tcp_listen`.
    #[serde(default)]
    pub rdma_listen: Option<String>,
    /// Subsystem NQN (default `nqn.2026-11.io.vnvme:SERIAL`).
    pub nqn: Option<String>,
    /// Host NQNs allowed to connect over NVMe/TCP; empty: any.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// NVMe/TCP controllers in the subsystem, one per host association (default 2; 1 for
    /// `nvme:` namespaces, which cannot be shared).
    pub tcp_controllers: Option<usize>,
    /// SR-IOV: virtual functions of this controller (the PF), 1..=127, each a secondary
    /// controller served on `NAME.vfN.sock` beside the PF's `NAME.sock`.
    pub vfs: Option<u16>,
    /// Bring the VFs online at start with default resources (else the PF's host does it
    /// with Virtualization Management, e.g. `nvme virt-mgmt`).
    #[serde(default)]
    pub vfs_online: bool,
    /// Namespace Management: where namespaces created at run time get their blocks,
    /// `malloc:SIZE`, `dir:PATH:SIZE` or `lvs:STORE` (see [`crate::namespace_pool`]).
    pub namespace_pool: Option<String>,
    /// QoS: I/O commands per second (each of the entry's controllers).
    pub iops_limit: Option<u64>,
    /// QoS: data bytes per second, with a K/M/G suffix (e.g. "100M").
    pub bandwidth_limit: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub vendor_id: Option<u16>,
    pub device_id: Option<u16>,
    pub max_io_queues: Option<u16>,
    pub mdts: Option<u8>,
    /// Power-on Interrupt Coalescing, "ENTRIES/MICROSECONDS" (e.g. "8/100"): an interrupt
    /// fires after that many completions or when the oldest waited that long (rounded up to
    /// 100 us), whichever is first; applied adaptively (a host waiting on one command gets
    /// its interrupt at once). Absent: [`DEFAULT_IRQ_COALESCING`]. "off": every poll pass
    /// that posts raises the interrupt. A host that sets feature 08h gets what it set.
    pub irq_coalescing: Option<String>,
    #[serde(rename = "namespace", default)]
    pub namespaces: Vec<NamespaceSpec>,
}

/// The power-on Interrupt Coalescing of a controller whose configuration names none: 16
/// completions or 200 us, adaptive (BENCHMARKS.md, "Hot path, round 2": a stock Linux guest,
/// which never sets feature 08h, gets about 1.25-2x QEMU's nvme at QD32 with it and keeps QD1).
pub const DEFAULT_IRQ_COALESCING: &str = "16/200";

/// Parse "ENTRIES/MICROSECONDS" into feature 08h's threshold (0's based) and time (100 us),
/// or "off".
pub fn parse_coalescing(v: &str) -> Result<Coalescing, &'static str> {
    const WHY: &str =
        "ENTRIES/MICROSECONDS with ENTRIES 1..=256 and MICROSECONDS 100..=25500, or off";
    if v.trim() == "off" {
        return Ok(Coalescing::default());
    }
    let (e, us) = v.split_once('/').ok_or(WHY)?;
    let e: u32 = e.trim().parse().map_err(|_| WHY)?;
    let us: u32 = us.trim().parse().map_err(|_| WHY)?;
    if !(1..=256).contains(&e) || !(1..=25_500).contains(&us) {
        return Err(WHY);
    }
    Ok(Coalescing {
        threshold: (e - 1) as u8,
        time: us.div_ceil(100) as u8,
    })
}

/// One namespace.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub backend: String,
    #[serde(default = "default_block_size")]
    pub block_size: u32,
    /// With `vfs`: the controllers the namespace is attached to, 0 for the PF and N for
    /// VF N (default: all). A controller sees only the namespaces attached to it.
    pub attach: Option<Vec<u16>>,
}

fn default_block_size() -> u32 {
    512
}

/// `pool` with its RAM kept as `key` (`malloc:SIZE@KEY`) when it is a `malloc:` pool that
/// names no kept RAM yet, with the bytes to keep for it.
pub fn keep_pool_ram(pool: &str, key: &str) -> Option<(String, u64)> {
    match pool.parse() {
        Ok(crate::pool_spec::PoolSpec::Malloc {
            capacity,
            kept: None,
        }) => Some((
            format!("{}@{key}", pool.trim()),
            crate::pool_spec::kept_pool_bytes(capacity),
        )),
        _ => None,
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

/// The `name` of a volume store or an array: 1 to 32 letters, digits, '-', '_', '.'.
fn check_name(name: &str, at: &dyn Fn(&str) -> String) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(field(
            at("name"),
            "1 to 32 characters: letters, digits, '-', '_', '.'",
        ));
    }
    Ok(())
}

fn field(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.into(),
        message: message.into(),
    }
}

impl Config {
    /// Under a supervisor: name the RAM of every `malloc:` backend the configuration holds
    /// (volume stores, then array members, then namespaces, in file order) as kept RAM
    /// `c0`, `c1`, ... (`malloc:SIZE@cN`), and return each key with its size. The supervisor
    /// makes a memfd for each; its workers, running this on the same configuration, open
    /// those memfds, so the data outlives every worker.
    pub fn keep_configured_ram(&mut self) -> Vec<(String, u64)> {
        let specs = self
            .lvstores
            .iter_mut()
            .map(|s| &mut s.backend)
            .chain(self.arrays.iter_mut().flat_map(|a| a.members.iter_mut()))
            .chain(
                self.controllers
                    .iter_mut()
                    .flat_map(|c| c.namespaces.iter_mut().map(|n| &mut n.backend)),
            );
        let mut kept = Vec::new();
        for spec in specs {
            let key = format!("c{}", kept.len());
            if let Some(named) = crate::backend_spec::keep_ram(spec, &key)
                && let Ok(BackendSpec::Malloc { size, .. }) = named.parse()
            {
                *spec = named;
                kept.push((key, size));
            }
        }
        // then the `malloc:` namespace pools, in file order: a sparse range per NSID
        let pools = self
            .controllers
            .iter_mut()
            .filter_map(|c| c.namespace_pool.as_mut());
        for pool in pools {
            let key = format!("c{}", kept.len());
            if let Some((named, bytes)) = keep_pool_ram(pool, &key) {
                *pool = named;
                kept.push((key, bytes));
            }
        }
        kept
    }

    /// The configuration as TOML text that [`Config::parse`] reads back the same (what a
    /// supervisor hands each worker).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("(configuration)"),
            message: e.to_string(),
        })
    }

    /// Load and check a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and check TOML text (`origin` is used in messages).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// One controller from command-line flags.
    pub fn from_flags(
        served: Served,
        ns: &[String],
        serial: Option<String>,
        block_size: u32,
        poll: PollSetting,
    ) -> Result<Self, ConfigError> {
        let namespaces = ns
            .iter()
            .map(|b| NamespaceSpec {
                backend: b.clone(),
                block_size,
                attach: None,
            })
            .collect();
        let Served {
            socket,
            tcp_listen,
            rdma_listen,
            nqn,
            allowed_hosts,
        } = served;
        let ctrl = ControllerSpec {
            socket,
            tcp_listen,
            rdma_listen,
            nqn,
            allowed_hosts,
            tcp_controllers: None,
            vfs: None,
            vfs_online: false,
            namespace_pool: None,
            iops_limit: None,
            bandwidth_limit: None,
            serial,
            model: None,
            vendor_id: None,
            device_id: None,
            max_io_queues: None,
            mdts: None,
            irq_coalescing: None,
            namespaces,
        };
        let cfg = Config {
            poll,
            reactors: 0,
            metrics: None,
            controllers: vec![ctrl],
            arrays: Vec::new(),
            lvstores: Vec::new(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every value that serde's types do not already restrict.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.reactors > 64 {
            return Err(field(
                "reactors",
                "at most 64 (0: one thread per controller)",
            ));
        }
        if let Some(m) = &self.metrics
            && m.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(field(
                "metrics",
                "an IP:PORT to listen on, e.g. \"127.0.0.1:9480\"",
            ));
        }
        if self.controllers.is_empty() {
            return Err(field(
                "controller",
                "at least one [[controller]] is required",
            ));
        }
        if self.controllers.len() > MAX_ENTRIES {
            return Err(field(
                "controller",
                format!("at most {MAX_ENTRIES} [[controller]] entries"),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (i, a) in self.arrays.iter().enumerate() {
            let at = |f: &str| format!("array[{i}].{f}");
            a.check(&at)?;
            if !names.insert(a.name.as_str()) {
                return Err(field(
                    at("name"),
                    format!("two arrays are named {}", a.name),
                ));
            }
        }
        let mut stores = std::collections::HashSet::new();
        for (i, s) in self.lvstores.iter().enumerate() {
            let at = |f: &str| format!("lvstore[{i}].{f}");
            s.check(&at)?;
            if !stores.insert(s.name.as_str()) {
                return Err(field(
                    at("name"),
                    format!("two volume stores are named {}", s.name),
                ));
            }
        }
        let mut used = std::collections::HashSet::new();
        let mut sockets = std::collections::HashSet::new();
        for (i, c) in self.controllers.iter().enumerate() {
            let at = |f: &str| format!("controller[{i}].{f}");
            match (&c.socket, &c.tcp_listen) {
                (Some(sock), None) => {
                    if sock.as_os_str().is_empty() {
                        return Err(field(at("socket"), "must not be empty"));
                    }
                    if !sockets.insert(sock) {
                        return Err(field(
                            at("socket"),
                            format!("{} is used by two controllers", sock.display()),
                        ));
                    }
                    if sock
                        .parent()
                        .is_some_and(|p| !p.as_os_str().is_empty() && !p.is_dir())
                    {
                        return Err(field(
                            at("socket"),
                            format!("directory of {} does not exist", sock.display()),
                        ));
                    }
                    if c.rdma_listen.is_some()
                        && c.namespaces.iter().any(|n| n.backend.starts_with("nvme:"))
                    {
                        return Err(field(
                            at("rdma_listen"),
                            "an nvme: namespace (zero copy into one VM's memory) cannot be \
                             shared with an NVMe/RDMA export",
                        ));
                    }
                }
                (None, Some(addr)) => {
                    if addr.parse::<std::net::SocketAddr>().is_err() {
                        return Err(field(at("tcp_listen"), "want IP:PORT, e.g. 127.0.0.1:4420"));
                    }
                }
                (Some(_), Some(addr)) => {
                    // both: a vfio-user controller and an NVMe/TCP one sharing the namespaces
                    if addr.parse::<std::net::SocketAddr>().is_err() {
                        return Err(field(at("tcp_listen"), "want IP:PORT, e.g. 127.0.0.1:4420"));
                    }
                    if c.namespaces.iter().any(|n| n.backend.starts_with("nvme:")) {
                        return Err(field(
                            at("tcp_listen"),
                            "an nvme: namespace (zero copy into one VM's memory) cannot be \
                             shared with an NVMe/TCP export",
                        ));
                    }
                }
                (None, None) if c.rdma_listen.is_some() => {}
                (None, None) => {
                    return Err(field(
                        at("socket"),
                        "socket, tcp_listen or rdma_listen is required",
                    ));
                }
            }
            let nqn_ok = |n: &str| {
                n.starts_with("nqn.")
                    && n.len() <= 223
                    && n.is_ascii()
                    && n != "nqn.2014-08.org.nvmexpress.discovery"
            };
            if let Some(n) = &c.nqn
                && !nqn_ok(n)
            {
                return Err(field(
                    at("nqn"),
                    "an NQN: nqn.YYYY-MM.domain:name, at most 223 ASCII bytes",
                ));
            }
            if let Some(h) = c.allowed_hosts.iter().find(|h| !nqn_ok(h)) {
                return Err(field(at("allowed_hosts"), format!("{h:?} is not an NQN")));
            }
            let fabrics = c.tcp_listen.is_some() || c.rdma_listen.is_some();
            if let Some(addr) = &c.rdma_listen
                && addr.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(field(
                    at("rdma_listen"),
                    "want IP:PORT, e.g. 192.0.2.1:4420",
                ));
            }
            if !fabrics && !c.allowed_hosts.is_empty() {
                return Err(field(
                    at("allowed_hosts"),
                    "only for tcp_listen or rdma_listen controllers",
                ));
            }
            let has_nvme = c.namespaces.iter().any(|n| n.backend.starts_with("nvme:"));
            if let Some(n) = c.tcp_controllers {
                if !fabrics || !(1..=15).contains(&n) {
                    return Err(field(
                        at("tcp_controllers"),
                        "1..=15, with tcp_listen or rdma_listen",
                    ));
                }
                if n > 1 && has_nvme {
                    return Err(field(
                        at("tcp_controllers"),
                        "an nvme: namespace cannot be shared by several controllers",
                    ));
                }
            }
            if let Some(n) = c.vfs {
                if !(1..=MAX_VFS).contains(&u64::from(n)) {
                    return Err(field(at("vfs"), "1..=127 virtual functions"));
                }
                if c.socket.is_none() || c.tcp_listen.is_some() {
                    return Err(field(
                        at("vfs"),
                        "VFs need a vfio-user socket (and no tcp_listen)",
                    ));
                }
                if has_nvme {
                    return Err(field(
                        at("vfs"),
                        "an nvme: namespace cannot be shared with VFs",
                    ));
                }
            }
            if c.vfs_online && c.vfs.is_none() {
                return Err(field(at("vfs_online"), "only with vfs"));
            }
            if let Some(p) = &c.namespace_pool
                && let Err(why) = p.parse::<crate::pool_spec::PoolSpec>()
            {
                return Err(field(at("namespace_pool"), why));
            }
            if c.iops_limit == Some(0) {
                return Err(field(
                    at("iops_limit"),
                    "at least 1 (leave it out for no limit)",
                ));
            }
            if let Some(b) = &c.bandwidth_limit
                && crate::backend_spec::parse_size(b).is_none_or(|n| n < 4096)
            {
                return Err(field(
                    at("bandwidth_limit"),
                    "bytes per second, at least 4K (e.g. \"100M\")",
                ));
            }
            if let Some(s) = &c.serial
                && (s.is_empty() || s.len() > 20 || !s.is_ascii())
            {
                return Err(field(at("serial"), "1 to 20 ASCII characters"));
            }
            if let Some(m) = &c.model
                && (m.len() > 40 || !m.is_ascii())
            {
                return Err(field(at("model"), "at most 40 ASCII characters"));
            }
            if let Some(q) = c.max_io_queues
                && !(1..=128).contains(&q)
            {
                return Err(field(at("max_io_queues"), "must be 1..=128"));
            }
            if let Some(m) = c.mdts
                && !(1..=10).contains(&m)
            {
                return Err(field(at("mdts"), "must be 1..=10 (4 KiB << mdts)"));
            }
            if let Some(v) = &c.irq_coalescing {
                parse_coalescing(v).map_err(|why| field(at("irq_coalescing"), why))?;
            }
            for (j, n) in c.namespaces.iter().enumerate() {
                let at = |f: &str| format!("controller[{i}].namespace[{j}].{f}");
                if let Some(a) = &n.attach {
                    let vfs = c.vfs.unwrap_or(0);
                    if c.vfs.is_none() || a.iter().any(|&k| k > vfs) {
                        return Err(field(
                            at("attach"),
                            "controller numbers 0 (the PF) to vfs, with vfs set",
                        ));
                    }
                }
                let spec: BackendSpec =
                    n.backend
                        .parse()
                        .map_err(|e: crate::backend_spec::SpecError| {
                            field(at("backend"), e.to_string())
                        })?;
                if n.block_size != 512 && n.block_size != 4096 {
                    return Err(field(at("block_size"), "must be 512 or 4096"));
                }
                if let BackendSpec::Array { name } = &spec
                    && !used.insert(name.clone())
                {
                    return Err(field(
                        at("backend"),
                        format!("array {name} backs another namespace already"),
                    ));
                }
                if let BackendSpec::Lvol { store, volume } = &spec
                    && !used.insert(format!("lvol:{store}/{volume}"))
                {
                    return Err(field(
                        at("backend"),
                        format!("volume {store}/{volume} backs another namespace already"),
                    ));
                }
                if let BackendSpec::Null { size }
                | BackendSpec::Malloc { size, .. }
                | BackendSpec::File {
                    size: Some(size), ..
                } = spec
                    && size % u64::from(n.block_size) != 0
                {
                    return Err(field(at("backend"), "size is not a multiple of block_size"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(t, Path::new("test.toml"))
    }

    /// What a supervisor hands its workers reads back as the same configuration, RAM keys
    /// included.
    #[test]
    fn a_configuration_reads_back_from_its_toml() {
        let text = r#"
poll = "busy"
reactors = 2
metrics = "127.0.0.1:9480"
[[array]]
name = "r"
level = "raid1"
members = ["malloc:8M", "malloc:8M"]
strip_size_kb = 64
[[lvstore]]
name = "s"
backend = "array:r"
cluster_size = "1M"
[[lvstore.volume]]
name = "v"
size = 4194304
thin = true
[[controller]]
socket = "/tmp/vnvme-config-test.sock"
serial = "VNVME0001"
vfs = 2
vfs_online = true
irq_coalescing = "8/100"
[[controller.namespace]]
backend = "malloc:256M"
block_size = 4096
attach = [0, 2]
[[controller.namespace]]
backend = "lvol:s/v"
[[controller]]
tcp_listen = "127.0.0.1:4420"
nqn = "nqn.2026-11.io.vnvme:disk1"
allowed_hosts = ["nqn.h"]
tcp_controllers = 2
iops_limit = 20000
bandwidth_limit = "200M"
[[controller.namespace]]
backend = "null:1G"
"#;
        let mut cfg =
            parse(&text.replace("vfs = 2\n", "vfs = 2\nnamespace_pool = \"malloc:64M\"\n"))
                .unwrap();
        let kept = cfg.keep_configured_ram();
        assert_eq!(kept.len(), 4);
        assert_eq!(
            kept[3],
            ("c3".to_owned(), 256 * (64 << 20)),
            "the pool's, sparse"
        );
        assert_eq!(
            cfg.controllers[0].namespace_pool.as_deref(),
            Some("malloc:64M@c3")
        );
        let back = parse(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(format!("{back:?}"), format!("{cfg:?}"));
        assert_eq!(back.controllers[0].namespaces[0].backend, "malloc:256M@c2");
    }

    #[test]
    fn arrays_are_checked_field_by_field() {
        let ns = "[[controller]]\nsocket = \"/tmp/x.sock\"\n[[controller.namespace]]\n\
                  backend = \"array:r\"\n";
        let ok = format!(
            "[[array]]\nname = \"r\"\nlevel = \"raid1\"\n\
             members = [\"malloc:8M\", \"malloc:8M\"]\n{ns}"
        );
        let cfg = parse(&ok).unwrap();
        assert_eq!(cfg.arrays[0].members.len(), 2);
        for (bad, field_name, why) in [
            (
                "name = \"r\"\nlevel = \"raid5\"\nmembers = [\"malloc:8M\"]",
                "array[0].level",
                "raid0",
            ),
            (
                "name = \"r\"\nlevel = \"raid1\"\nmembers = [\"malloc:8M\"]",
                "array[0].members",
                "2 to 4",
            ),
            (
                "name = \"r\"\nlevel = \"raid10\"\nmembers = [\"malloc:8M\", \"malloc:8M\", \"malloc:8M\"]",
                "array[0].members",
                "even",
            ),
            (
                "name = \"r\"\nlevel = \"raid0\"\nmembers = [\"file:/a\", \"file:/a\"]",
                "array[0].members",
                "twice",
            ),
            (
                "name = \"r\"\nlevel = \"raid0\"\nmembers = [\"array:x\"]",
                "array[0].members",
                "member of an array",
            ),
            (
                "name = \"r\"\nlevel = \"raid0\"\nmembers = [\"tape:1G\"]",
                "array[0].members",
                "expected",
            ),
            (
                "name = \"r r\"\nlevel = \"raid0\"\nmembers = [\"malloc:8M\"]",
                "array[0].name",
                "letters",
            ),
            (
                "name = \"r\"\nlevel = \"raid0\"\nmembers = [\"malloc:8M\"]\nstrip_size_kb = 48",
                "array[0].strip_size_kb",
                "power of two",
            ),
        ] {
            let e = parse(&format!("[[array]]\n{bad}\n{ns}")).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.starts_with(field_name) && msg.contains(why),
                "{bad}: {msg}"
            );
        }
        // two arrays of one name; one array behind two namespaces
        let two = format!(
            "[[array]]\nname = \"r\"\nlevel = \"raid0\"\nmembers = [\"malloc:8M\"]\n\
             [[array]]\nname = \"r\"\nlevel = \"raid0\"\nmembers = [\"malloc:8M\"]\n{ns}"
        );
        assert!(parse(&two).unwrap_err().to_string().contains("two arrays"));
        let twice = format!("{ok}[[controller.namespace]]\nbackend = \"array:r\"\n");
        assert!(
            parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("backs another namespace")
        );
    }

    #[test]
    fn accepts_a_full_config() {
        let c = parse(
            "poll = \"busy\"\n[[controller]]\nsocket = \"/tmp/a.sock\"\nserial = \"S1\"\n[[controller.namespace]]\nbackend = \"malloc:64M\"\n\
             [[controller.namespace]]\nbackend = \"null:1G\"\nblock_size = 4096\n",
        )
        .unwrap();
        assert_eq!(c.poll, PollSetting::Busy);
        assert_eq!(c.controllers[0].namespaces.len(), 2);
        assert_eq!(c.metrics, None);
    }

    #[test]
    fn an_rdma_export_needs_no_tcp_listen_and_shares_no_nvme_namespace() {
        let c = parse("[[controller]]\nrdma_listen = \"127.0.0.1:4420\"\n").unwrap();
        assert_eq!(
            c.controllers[0].rdma_listen.as_deref(),
            Some("127.0.0.1:4420")
        );
        let e = parse(
            "[[controller]]\nsocket = \"/tmp/r.sock\"\nrdma_listen = \"127.0.0.1:4420\"\n\
             [[controller.namespace]]\nbackend = \"nvme:pci:0000:01:00.0\"\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("rdma_listen"), "{e}");
    }

    #[test]
    fn the_metrics_address_is_checked() {
        let ctrl = "[[controller]]\nsocket = \"/tmp/a.sock\"\n";
        let c = parse(&format!("metrics = \"127.0.0.1:9480\"\n{ctrl}")).unwrap();
        assert_eq!(c.metrics.as_deref(), Some("127.0.0.1:9480"));
        let e = parse(&format!("metrics = \"localhost\"\n{ctrl}")).unwrap_err();
        assert!(e.to_string().starts_with("metrics"), "{e}");
    }

    #[test]
    fn nvme_tcp_fields_are_checked() {
        let ok = parse(
            "[[controller]]\ntcp_listen = \"127.0.0.1:4420\"\nnqn = \"nqn.2026-11.io.x:a\"\n\
             allowed_hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1\"]\n\
             [[controller]]\nsocket = \"/tmp/d.sock\"\ntcp_listen = \"127.0.0.1:4421\"\n",
        )
        .unwrap();
        assert_eq!(ok.controllers.len(), 2);
        for (text, field_name) in [
            ("[[controller]]\n", "socket"),
            ("[[controller]]\ntcp_listen = \"localhost\"\n", "tcp_listen"),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\nrdma_listen = \"rxe0\"\n",
                "rdma_listen",
            ),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\nnqn = \"x\"\n",
                "nqn",
            ),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\nnqn = \"nqn.2014-08.org.nvmexpress.discovery\"\n",
                "nqn",
            ),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\nallowed_hosts = [\"me\"]\n",
                "allowed_hosts",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/e.sock\"\nallowed_hosts = [\"nqn.x:y\"]\n",
                "allowed_hosts",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/f.sock\"\ntcp_listen = \"127.0.0.1:1\"\n\
                 [[controller.namespace]]\nbackend = \"nvme:vfio-user:/tmp/b.sock\"\n",
                "tcp_listen",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/g.sock\"\nvfs = 1\n\
                 [[controller.namespace]]\nbackend = \"null:1G\"\nattach = [2]\n",
                "namespace[0].attach",
            ),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\nvfs = 2\n",
                "vfs",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/h.sock\"\nvfs = 200\n",
                "vfs",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/j.sock\"\niops_limit = 0\n",
                "iops_limit",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/m.sock\"\nnamespace_pool = \"ram:1G\"\n",
                "namespace_pool",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/n.sock\"\nnamespace_pool = \"malloc:1K\"\n",
                "namespace_pool",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/k.sock\"\nbandwidth_limit = \"x\"\n",
                "bandwidth_limit",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/l.sock\"\ntcp_controllers = 2\n",
                "tcp_controllers",
            ),
            (
                "[[controller]]\ntcp_listen = \"127.0.0.1:1\"\ntcp_controllers = 2\n\
                 [[controller.namespace]]\nbackend = \"nvme:vfio-user:/tmp/b.sock\"\n",
                "tcp_controllers",
            ),
            (
                "[[controller]]\nsocket = \"/tmp/i.sock\"\nvfs_online = true\n",
                "vfs_online",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(
                e.contains(&format!("controller[0].{field_name}")),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("[[controller]]\nsocket = \"/tmp/a.sock\"\n[[controller.namespace]]\nbackend = \"tape:1G\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("controller[0].namespace[0].backend"),
            "{e}"
        );
        let e = parse("[[controller]]\nsocket = \"/tmp/a.sock\"\n[[controller.namespace]]\nbackend = \"null:1G\"\nblock_size = 1000\n").unwrap_err();
        assert!(e.to_string().contains("block_size"), "{e}");
        let e = parse("[[controller]]\nsockt = \"/tmp/a.sock\"\n").unwrap_err();
        assert!(e.to_string().contains("sockt"), "{e}");
        let e = parse("[[controller]]\nsocket = \"/nonexistent-dir/a.sock\"\n").unwrap_err();
        assert!(e.to_string().contains("controller[0].socket"), "{e}");
        let e =
            parse("[[controller]]\nsocket = \"/tmp/a.sock\"\nmax_io_queues = 500\n").unwrap_err();
        assert!(e.to_string().contains("max_io_queues"), "{e}");
        let e = parse("[[controller]]\nsocket = \"/tmp/a.sock\"\nirq_coalescing = \"8\"\n")
            .unwrap_err();
        assert!(e.to_string().contains("irq_coalescing"), "{e}");
        let c = parse_coalescing("8/150").unwrap();
        assert_eq!((c.threshold, c.time), (7, 2));
        assert!(parse_coalescing("0/100").is_err() && parse_coalescing("8/0").is_err());
        assert_eq!(parse_coalescing("off"), Ok(Coalescing::default()));
        assert!(!parse_coalescing("off").unwrap().enabled());
        assert_eq!(
            parse_coalescing(DEFAULT_IRQ_COALESCING).unwrap().dword(),
            0x020f
        );
        assert!(parse("").unwrap_err().to_string().contains("controller"));
        assert!(parse("this is not toml").is_err());
    }
}
