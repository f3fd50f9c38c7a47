//! `vnvme perf-many TARGET...`: aggregate IOPS of many controllers driven from one thread
//! (one queue pair each, QD reads of 4 KiB at random LBAs of namespace 1), for the scale
//! benchmark: does the serving side's throughput hold as the number of active controllers
//! grows?

use std::time::{Duration, Instant};

use host_driver::{DmaBuffer, IoQueuePair, NvmeDriver};
use vnvme::device_address::DeviceAddress;
use vnvme::perf::Rng;

/// Drive several controllers at once from one thread.
#[derive(Debug, clap::Args)]
pub struct PerfManyArgs {
    /// controllers: vfio-user:/path.sock or pci:DDDD:BB:DD.F, one or more
    #[arg(required = true)]
    pub targets: Vec<String>,
    /// commands in flight per controller
    #[arg(short = 'q', long, default_value_t = 8)]
    pub queue_depth: u16,
    /// seconds
    #[arg(short = 't', long, default_value_t = 5.0)]
    pub time: f64,
}

struct Job {
    _ctrl: NvmeDriver,
    qp: IoQueuePair,
    buf: DmaBuffer,
    blocks: u64,
    lba_per_io: u32,
    ios: u64,
}

pub fn run(args: &PerfManyArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        args.queue_depth >= 1 && args.queue_depth <= 1024,
        "-q 1..=1024"
    );
    anyhow::ensure!(
        args.time > 0.0 && args.time < 86_400.0,
        "-t: 0 < seconds < 86400"
    );
    let qd = u64::from(args.queue_depth);
    let mut jobs = Vec::new();
    for t in &args.targets {
        let target: DeviceAddress = t.parse()?;
        let mut ctrl = target.open((qd * 4096 + (1 << 20)).next_power_of_two(), 1)?;
        let ns = ctrl
            .namespaces()
            .first()
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{t}: no namespace"))?;
        let qp = ctrl.create_io_queue_pair(args.queue_depth + 1)?;
        let buf = ctrl.dma().alloc(qd * 4096)?;
        let lba_per_io = 4096 / ns.block_size;
        jobs.push(Job {
            _ctrl: ctrl,
            qp,
            buf,
            blocks: ns.blocks,
            lba_per_io,
            ios: 0,
        });
    }
    let mut rng = Rng(0x5ca1_ab1e);
    let submit = |j: &mut Job, slot: u64, rng: &mut Rng| -> anyhow::Result<()> {
        let units = j.blocks / u64::from(j.lba_per_io);
        let lba = (rng.next() % units) * u64::from(j.lba_per_io);
        let iova = j.buf.iova() + slot * 4096;
        j.qp.read_write(false, 1, lba, j.lba_per_io, iova, 4096, slot)?;
        Ok(())
    };
    for j in &mut jobs {
        for slot in 0..qd {
            submit(j, slot, &mut rng)?;
        }
        j.qp.ring();
    }
    let start = Instant::now();
    let end = Duration::from_secs_f64(args.time);
    let mut errors = 0u64;
    let mut done = Vec::with_capacity(qd as usize);
    while start.elapsed() < end {
        for j in &mut jobs {
            done.clear();
            j.qp.poll(qd as usize, |r| done.push(r));
            for r in &done {
                if r.status.is_success() {
                    j.ios += 1;
                } else {
                    errors += 1;
                }
                submit(j, r.user, &mut rng)?;
            }
            if !done.is_empty() {
                j.qp.ring();
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let total: u64 = jobs.iter().map(|j| j.ios).sum();
    #[allow(clippy::cast_precision_loss)] // display rates
    {
        let min = jobs.iter().map(|j| j.ios).min().unwrap_or(0) as f64 / secs;
        let max = jobs.iter().map(|j| j.ios).max().unwrap_or(0) as f64 / secs;
        crate::cli::outln!(
            "controllers {} | total IOPS {:.0} | per controller min {:.0} max {:.0} | errors {errors}",
            jobs.len(),
            total as f64 / secs,
            min,
            max
        );
    }
    Ok(i32::from(errors > 0))
}
