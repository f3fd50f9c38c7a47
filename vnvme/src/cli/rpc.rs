//! `vnvme rpc METHOD [KEY=VALUE...]`: call the running daemon's management socket and print
//! the result as JSON (exit 1 with the daemon's message when it refuses).

use std::path::PathBuf;

use anyhow::Context;
use vnvme::rpc::client;

/// Default management socket of `vnvme serve --rpc`.
pub const DEFAULT_SOCKET: &str = "/run/vnvme/vnvme.rpc";

/// Manage a running daemon (its `serve --rpc` socket).
#[derive(Debug, clap::Args)]
#[command(after_help = "Methods and parameters:
  subsystem_list
  controller_list
  subsystem_create   nqn=.. socket=.. [vfs=N] [namespace=[{\"backend\":\"malloc:64M\"}]] ...
                     (the fields of a [[controller]] table)
  subsystem_delete   nqn=..
  ns_create          nqn=.. size=1G [block_size=512|4096] [shared=true|false]
  ns_delete          nqn=.. nsid=N
  ns_add             nqn=.. backend=lvol:STORE/NAME [block_size=512|4096] [nsid=N]   (then ns_attach)
  ns_attach          nqn=.. nsid=N controllers=[CNTLID,...]
  ns_detach          nqn=.. nsid=N controllers=[CNTLID,...]
  qos_set            cntlid=N [iops=N] [bandwidth=100M]   (absent or 0: no limit)
  vf_enable          nqn=.. count=N   (VFs 1..=N online, the rest offline)
  stats              [cntlid=N]   (I/O counters, errors by status, latency p50/p99/p99.9
                     in us, queue depth; per controller and per namespace)
  raid_create        name=.. level=raid0|raid1|raid10|concat members='[\"SPEC\",...]'
                     [strip_size_kb=64] [rebuild_rate_mb=200]
                     (assembles the array when its members carry it already)
  raid_delete        name=..   (not while a namespace uses it; wipes the superblocks)
  raid_list          (state online/degraded/rebuilding/offline, members, rebuild
                     progress with percent and ETA, IOPS, reads served per member)
  raid_add_member    name=.. member=SPEC   (a returning member: partial rebuild)
  raid_remove_member name=.. member=SPEC|SLOT
  raid_set_rebuild_rate name=.. mb_per_sec=N   (0: no limit)
  (bdev_raid_add_base_bdev, bdev_raid_remove_base_bdev: the same, SPDK's names)
  lvs_create         name=.. backend=SPEC [cluster_size=1M] [warn_percent=90]
                     (loads the store the backend holds, or makes one on a blank backend)
  lvs_delete         name=..   (not while a volume is in use; wipes the superblocks)
  lvs_list           (capacity, used, clusters_free, metadata use)
  lvol_create        name=STORE/NAME size=1G [thin=true]
  lvol_delete        name=STORE/NAME   (snapshots in any order; not while in use)
  lvol_resize        name=STORE/NAME size=2G   (shrink only while not in use)
  lvol_rename        name=STORE/NAME new_name=..
  lvol_snapshot      name=STORE/NAME snapshot_name=..
  lvol_clone         snapshot=STORE/SNAP clone_name=..
  lvol_inflate       name=STORE/NAME   (own copy of every cluster, thick, no parent)
  lvol_decouple      name=STORE/NAME   (own copy of the clusters it shares)
  lvol_list          [lvs=STORE]   (size, thin, snapshot, parent, used, shared, clones)
A VALUE that parses as JSON is JSON; anything else is a string.")]
pub struct RpcArgs {
    /// the daemon's management socket
    #[arg(long, short = 's', default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// method name
    pub method: String,
    /// parameters as KEY=VALUE, or one JSON object
    pub params: Vec<String>,
}

pub fn run(args: &RpcArgs) -> anyhow::Result<i32> {
    let params = match args.params.as_slice() {
        [one] if one.trim_start().starts_with('{') => {
            serde_json::from_str(one).context("parameters: not a JSON object")?
        }
        kv => client::params_from_args(kv).map_err(anyhow::Error::msg)?,
    };
    match client::call(&args.socket, &args.method, &params)? {
        Ok(v) => {
            crate::cli::outln!("{}", serde_json::to_string_pretty(&v)?);
            Ok(0)
        }
        Err(e) => {
            eprintln!("vnvme rpc {}: {} (code {})", args.method, e.message, e.code);
            Ok(1)
        }
    }
}
