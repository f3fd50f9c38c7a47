//! `vnvme identify <target>`: controller and namespace data, as nvme-cli prints the main
//! fields, or JSON with `--json`.

use vnvme::device_address::DeviceAddress;

/// Print a controller's Identify data.
#[derive(Debug, clap::Args)]
pub struct IdentifyArgs {
    /// vfio-user:/path/to.sock or pci:DDDD:BB:DD.F
    pub target: String,
    /// machine-readable output
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &IdentifyArgs) -> anyhow::Result<i32> {
    let target: DeviceAddress = args.target.parse()?;
    let mut ctrl = target.open(8 << 20, 1)?;
    let cmb = ctrl.cmb()?;
    let id = ctrl.identify();
    let (model, serial, firmware) = ctrl.names();
    let cap = ctrl.cap();
    let namespaces: Vec<serde_json::Value> = ctrl
        .namespaces()
        .iter()
        .map(|ns| {
            serde_json::json!({
                "nsid": ns.nsid,
                "blocks": ns.blocks,
                "block_size": ns.block_size,
                "bytes": ns.blocks * u64::from(ns.block_size),
                "capacity_blocks": ns.identify.ncap.get(),
                "utilization_blocks": ns.identify.nuse.get(),
                "nguid": hex(&ns.identify.nguid),
                "eui64": hex(&ns.identify.eui64),
            })
        })
        .collect();
    let ver = id.ver.get();
    let v = serde_json::json!({
        "target": ctrl.target(),
        "vid": id.vid.get(),
        "ssvid": id.ssvid.get(),
        "sn": serial,
        "mn": model,
        "fr": firmware,
        "cntlid": id.cntlid.get(),
        "ver": format!("{}.{}.{}", ver >> 16, (ver >> 8) & 0xff, ver & 0xff),
        "mdts": id.mdts,
        "max_transfer_bytes": ctrl.max_transfer(),
        "oacs": id.oacs.get(),
        "oncs": id.oncs.get(),
        "nn": id.nn.get(),
        "sqes": id.sqes,
        "cqes": id.cqes,
        "mqes": (cap & 0xffff) + 1,
        "io_queues_granted": ctrl.io_queue_count(),
        "subnqn": String::from_utf8_lossy(&id.subnqn).trim_end_matches('\0').to_string(),
        "namespaces": namespaces,
        "cmb": cmb,
    });
    if args.json {
        crate::cli::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    crate::cli::outln!("NVMe Identify Controller ({}):", ctrl.target());
    for key in [
        "vid", "ssvid", "sn", "mn", "fr", "cntlid", "ver", "mdts", "oacs", "oncs", "nn", "mqes",
        "subnqn",
    ] {
        let val = &v[key];
        let s = match (key, val.as_u64()) {
            ("vid" | "ssvid" | "oacs" | "oncs", Some(n)) => format!("{n:#x}"),
            _ => val.as_str().map_or_else(|| val.to_string(), str::to_string),
        };
        crate::cli::outln!("{key:<10}: {s}");
    }
    match cmb {
        None => crate::cli::outln!("{:<10}: none", "cmb"),
        Some(c) => crate::cli::outln!(
            "{:<10}: {} MiB in BAR{} at {:#x} (sqs {}, cqs {}, lists {}, read data {}, write data {})",
            "cmb",
            c.bytes >> 20,
            c.bar,
            c.offset,
            c.sqs,
            c.cqs,
            c.lists,
            c.read_data,
            c.write_data
        ),
    }
    for ns in ctrl.namespaces() {
        crate::cli::outln!(
            "namespace {}: {} blocks of {} bytes ({} MiB), nguid {}",
            ns.nsid,
            ns.blocks,
            ns.block_size,
            (ns.blocks * u64::from(ns.block_size)) >> 20,
            hex(&ns.identify.nguid)
        );
    }
    Ok(0)
}

fn hex(b: &[u8]) -> String {
    use std::fmt::Write;
    b.iter().fold(String::new(), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}
