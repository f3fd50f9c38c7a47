//! `vnvme`: the NVMe controller emulator daemon and its tools.

#![forbid(unsafe_code)]

mod cli;

use clap::{Parser, Subcommand};

/// NVMe controller emulator served over vfio-user.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a test guest (Linux under QEMU with nvme-cli and fio), run a script in it and
    /// print its console; exits with the script's status (124 on timeout).
    Guest(cli::guest::GuestArgs),
    /// Serve emulated NVMe controllers over vfio-user until SIGINT/SIGTERM.
    Serve(cli::serve::ServeArgs),
    /// Start the daemon with a RAM namespace and boot a Linux guest that uses it (nvme list, fio).
    Demo(cli::demo::DemoArgs),
    /// Identify a controller through the user-space host driver (vfio-user:SOCK).
    Identify(cli::identify::IdentifyArgs),
    /// Aggregate IOPS of many controllers driven from one thread (scale benchmark).
    PerfMany(cli::perf_many::PerfManyArgs),
    /// Read an NVMe/TCP discovery controller's log (like `nvme discover -t tcp`).
    Discover(cli::discover::DiscoverArgs),
    /// Measure a controller's namespaces with the user-space host driver (spdk_nvme_perf style).
    Perf(cli::perf::PerfArgs),
    /// Manage a running daemon: namespaces, attachment, QoS, VFs, subsystems (JSON-RPC).
    Rpc(cli::rpc::RpcArgs),
    /// Verify a volume store offline: CRCs, reference counts, free versus mapped clusters.
    LvsCheck(cli::lvs_check::LvsCheckArgs),
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Guest(args) => cli::guest::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Demo(args) => cli::demo::run(args),
        Command::Identify(args) => cli::identify::run(args),
        Command::Perf(args) => cli::perf::run(args),
        Command::Discover(args) => cli::discover::run(args),
        Command::Rpc(args) => cli::rpc::run(args),
        Command::PerfMany(args) => cli::perf_many::run(args),
        Command::LvsCheck(args) => cli::lvs_check::run(args),
    };
    let code = result.unwrap_or_else(|e| {
        eprintln!("vnvme: error: {}", cause_once(&e));
        1
    });
    std::process::exit(code);
}

/// The error and its causes on one line, each cause once: an error that already shows its
/// cause's text in its own message does not get it appended again.
pub(crate) fn cause_once(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}
