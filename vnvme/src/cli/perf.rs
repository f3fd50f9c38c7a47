//! `vnvme perf <target>`: spdk_nvme_perf's conventions (-q -o -w -M -t -c) over our host
//! driver, with a live progress line.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use vnvme::device_address::DeviceAddress;
use vnvme::perf::{self, Pattern, PerfOptions};

/// Measure IOPS, bandwidth and latency of a controller's namespaces.
#[derive(Debug, clap::Args)]
pub struct PerfArgs {
    /// vfio-user:/path/to.sock, pci:DDDD:BB:DD.F, or nvme-tcp://HOST:PORT/NQN[/NSID] or
    /// nvme-rdma://... (the NVMe-oF initiator alone, one worker, no --verify)
    pub target: String,
    /// queue depth per queue pair
    #[arg(short = 'q', long, default_value_t = 32)]
    pub queue_depth: u32,
    /// I/O size in bytes
    #[arg(short = 'o', long, default_value_t = 4096)]
    pub io_size: u64,
    /// access pattern
    #[arg(short = 'w', long, value_enum, default_value_t = Pattern::Randread)]
    pub pattern: Pattern,
    /// read percentage for randrw
    #[arg(short = 'M', long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub mix: u8,
    /// run time in seconds
    #[arg(short = 't', long, default_value_t = 10.0)]
    pub time: f64,
    /// worker threads (SPDK's -c core count; one queue pair per namespace each)
    #[arg(short = 'c', long, default_value_t = 1)]
    pub cores: usize,
    /// check that reads return what this run wrote
    #[arg(long)]
    pub verify: bool,
    /// DMA memory in MiB
    #[arg(long, default_value_t = 256)]
    pub dma_mib: u64,
    /// keep the I/O queues' doorbells in host memory (Doorbell Buffer Config, as Linux
    /// does when the controller offers it)
    #[arg(long)]
    pub shadow_doorbells: bool,
}

pub fn run(args: &PerfArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        !args.verify || !matches!(args.pattern, Pattern::Read | Pattern::Randread),
        "--verify checks what this run wrote, and -w {} writes nothing: use write or \
         randwrite (read back after the run, as fio does) or randrw",
        format!("{:?}", args.pattern).to_lowercase()
    );
    if nvmeof::initiator::is_fabrics_url(&args.target) {
        return run_tcp(args);
    }
    let target: DeviceAddress = args.target.parse()?;
    anyhow::ensure!(
        args.time > 0.0 && args.time < 86_400.0,
        "-t {}: give 0 < seconds < 86400",
        args.time
    );
    anyhow::ensure!(
        args.cores >= 1 && args.cores <= 128,
        "-c {}: 1..=128",
        args.cores
    );
    let mut ctrl = target.open(args.dma_mib << 20, 128)?;
    let opts = options(args);
    let mut last = (Duration::ZERO, 0u64);
    let report = perf::run(&mut ctrl, &opts, |elapsed, ios| {
        let dt = elapsed.saturating_sub(last.0).as_secs_f64().max(1e-9);
        #[allow(clippy::cast_precision_loss)] // a display rate
        let rate = (ios - last.1) as f64 / dt;
        last = (elapsed, ios);
        progress(&format!(
            "[{:>6.1} s] {:>12.0} IOPS",
            elapsed.as_secs_f64(),
            rate
        ));
    })?;
    progress_done();
    crate::cli::out!("{}", perf::format_report(&ctrl.target(), &report));
    let total = report.total();
    Ok(i32::from(total.errors > 0 || total.verify_failures > 0))
}

/// `perf nvme-tcp://...` or `nvme-rdma://...`: the NVMe-oF initiator backend driven
/// directly.
fn run_tcp(args: &PerfArgs) -> anyhow::Result<i32> {
    use device_model::backend::Backend;
    let url: nvmeof::initiator::TcpUrl = args.target.parse()?;
    let mut b = nvmeof::initiator::TcpBackend::connect(&url)?;
    let opts = options(args);
    let report = perf::backend_job::run(&mut b, &opts, |elapsed, ios| {
        progress(&format!(
            "[{:>6.1} s] {:>12} I/Os",
            elapsed.as_secs_f64(),
            ios
        ));
    })?;
    progress_done();
    crate::cli::out!("{}", perf::format_report(&b.describe(), &report));
    let total = report.total();
    Ok(i32::from(total.errors > 0))
}

/// A progress line: rewritten in place on a terminal, one line each otherwise (a log file
/// or a pipe gets no carriage returns).
fn progress(line: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r{line}");
        let _ = std::io::stderr().flush();
    } else {
        eprintln!("{line}");
    }
}

/// End the in-place progress line on a terminal.
fn progress_done() {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// The run the flags describe.
fn options(args: &PerfArgs) -> PerfOptions {
    PerfOptions {
        queue_depth: args.queue_depth,
        io_size: args.io_size,
        pattern: args.pattern,
        read_percent: args.mix,
        duration: Duration::from_secs_f64(args.time),
        workers: args.cores,
        verify: args.verify,
        shadow_doorbells: args.shadow_doorbells,
    }
}
