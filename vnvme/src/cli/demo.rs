//! `vnvme demo`: the main job on an embedded default. Starts the daemon with a RAM
//! namespace, boots a Linux guest attached to it over vfio-user, and runs `nvme list`,
//! `nvme id-ctrl` and a short fio write+verify in the guest with its stock nvme driver.

use std::time::Duration;

use anyhow::Context;
use qemu_harness::Guest;
use vnvme::config::{Config, PollSetting};
use vnvme::daemon::Daemon;

/// Boot a demo guest against a vnvme controller.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// namespace backend (repeatable)
    #[arg(long = "ns", default_values_t = vec!["malloc:256M".to_string()])]
    pub ns: Vec<String>,
}

const SCRIPT: &str = r#"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
echo "== nvme list"; nvme list
echo "== nvme id-ctrl (first lines)"; nvme id-ctrl /dev/nvme0 | head -12
echo "== fio 4k randwrite + crc32c verify, 32 MiB"
fio --name=demo --filename=/dev/nvme0n1 --direct=1 --ioengine=io_uring --rw=randwrite --bs=4k \
    --iodepth=16 --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
    | grep -E 'IOPS|err=|verify'
echo "== nvme smart-log"; nvme smart-log /dev/nvme0 | grep -Ei 'data_units|host_(read|write)'
"#;

pub fn run(args: &DemoArgs) -> anyhow::Result<i32> {
    let dir = std::env::temp_dir().join(format!("vnvme-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let sock = dir.join("nvme0.sock");
    let cfg = Config::from_flags(
        vnvme::config::Served::socket(sock.clone()),
        &args.ns,
        Some("VNVMEDEMO".into()),
        512,
        PollSetting::Adaptive,
    )?;
    let daemon = Daemon::start(&cfg).context("starting the daemon")?;
    eprintln!(
        "vnvme demo: daemon serving {} with {}",
        sock.display(),
        args.ns.join(", ")
    );
    let out = Guest::new(SCRIPT)
        .vfio_user(&sock)
        .timeout(Duration::from_mins(5))
        .on_console_line(|l| crate::cli::outln!("{l}"))
        .run();
    daemon.stop().context("stopping the daemon")?;
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    eprintln!(
        "vnvme demo: guest finished with status {} after {:.1} s",
        out.status,
        out.elapsed.as_secs_f64()
    );
    Ok(out.status)
}
