//! `vnvme discover [-t tcp|rdma] HOST:PORT`: read a discovery controller's log (70h) over
//! NVMe/TCP or NVMe/RDMA and print its records as `nvme discover` does, or JSON with `--json`.

use std::time::Duration;

use nvmeof::initiator::Transport;

/// The transport of the discovery controller (nvme-cli's `-t`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TransportArg {
    Tcp,
    Rdma,
}

/// List the subsystems a discovery controller points to.
#[derive(Debug, clap::Args)]
pub struct DiscoverArgs {
    /// HOST:PORT of the discovery controller
    pub address: String,
    /// transport to reach it over
    #[arg(short = 't', long, value_enum, default_value = "tcp")]
    pub transport: TransportArg,
    /// machine-readable output
    #[arg(long)]
    pub json: bool,
    /// seconds allowed for each step
    #[arg(long, default_value_t = 5)]
    pub timeout: u64,
}

pub fn run(args: &DiscoverArgs) -> anyhow::Result<i32> {
    let transport = match args.transport {
        TransportArg::Tcp => Transport::Tcp,
        TransportArg::Rdma => Transport::Rdma,
    };
    let records = nvmeof::initiator::discover_over(
        &args.address,
        transport,
        Duration::from_secs(args.timeout),
    )?;
    if args.json {
        let v: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "trtype": r.transport(),
                    "subtype": r.kind(),
                    "portid": r.portid,
                    "traddr": r.traddr,
                    "trsvcid": r.trsvcid,
                    "subnqn": r.subnqn,
                })
            })
            .collect();
        crate::cli::outln!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    crate::cli::outln!("Discovery Log Number of Records {}", records.len());
    for (i, r) in records.iter().enumerate() {
        crate::cli::outln!("=====Discovery Log Entry {i}======");
        crate::cli::outln!("trtype:  {}", r.transport());
        crate::cli::outln!("subtype: {}", r.kind());
        crate::cli::outln!("portid:  {}", r.portid);
        crate::cli::outln!("trsvcid: {}", r.trsvcid);
        crate::cli::outln!("subnqn:  {}", r.subnqn);
        crate::cli::outln!("traddr:  {}", r.traddr);
    }
    Ok(0)
}
