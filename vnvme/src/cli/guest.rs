//! `vnvme guest`: boot a throw-away Linux test guest, run a script in it, print its console.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use qemu_harness::{Guest, VmError};

/// Exit code for a guest that timed out (as timeout(1) uses).
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// Arguments of `vnvme guest`.
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// Shell script to run in the guest (with `sh -e`, in /tmp/h).
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "command",
        conflicts_with = "command"
    )]
    pub script: Option<PathBuf>,
    /// Inline script text to run in the guest instead of --script.
    #[arg(short = 'c', long = "command", value_name = "SCRIPT")]
    pub command: Option<String>,
    /// Attach QEMU's own NVMe controller on raw image IMG (created with 1 GiB if missing);
    /// text after a colon is appended to its `-device nvme,...` options. Repeatable.
    #[arg(long = "nvme", value_name = "IMG[:OPTS]")]
    pub nvme: Vec<String>,
    /// Attach a vfio-user PCI device served on this unix socket. Repeatable.
    #[arg(long = "vfio-user", value_name = "SOCK")]
    pub vfio_user: Vec<PathBuf>,
    /// Forward 127.0.0.1:HOST to the guest's port GUEST (run `net_up` in the script). Repeatable.
    #[arg(long, value_name = "HOST:GUEST", value_parser = parse_hostfwd)]
    pub hostfwd: Vec<(u16, u16)>,
    /// Let the guest reach servers on the host's loopback as 10.0.2.2 (e.g. `nvme connect -t
    /// tcp -a 10.0.2.2` to `vnvme serve --tcp-listen 127.0.0.1:PORT`; run `net_up`).
    #[arg(long)]
    pub reach_host: bool,
    /// Add an emulated Intel IOMMU.
    #[arg(long)]
    pub iommu: bool,
    /// Copy a file into the guest as /tmp/h/<basename>. Repeatable.
    #[arg(long = "file", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// Kill the guest after this many seconds (exit code 124).
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub timeout: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub smp: u32,
    /// Guest RAM in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 1024)]
    pub mem: u32,
    /// Extra guest kernel arguments.
    #[arg(long, value_name = "ARGS")]
    pub append: Option<String>,
}

/// Parses `HOST:GUEST` port pairs.
fn parse_hostfwd(text: &str) -> Result<(u16, u16), String> {
    let (host, guest) = text.split_once(':').ok_or("expected HOST:GUEST")?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("bad port {p:?}: {e}"))
    };
    Ok((port(host)?, port(guest)?))
}

impl GuestArgs {
    /// The guest these arguments describe; console lines go to stdout as they arrive.
    pub fn guest(&self) -> anyhow::Result<Guest> {
        let script = match (&self.script, &self.command) {
            (Some(path), None) => std::fs::read_to_string(path)
                .with_context(|| format!("reading script {}", path.display()))?,
            (None, Some(text)) => text.clone(),
            _ => bail!("give exactly one of --script FILE and -c SCRIPT"),
        };
        let mut guest = Guest::new(script)
            .smp(self.smp)
            .mem_mib(self.mem)
            .timeout(Duration::from_secs(self.timeout))
            .echo_console(false)
            .on_console_line(|line| {
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            });
        for spec in &self.nvme {
            let (image, opts) = spec.split_once(':').unwrap_or((spec, ""));
            guest = guest.qemu_nvme(image, opts);
        }
        for socket in &self.vfio_user {
            guest = guest.vfio_user(socket);
        }
        for &(host, port) in &self.hostfwd {
            guest = guest.hostfwd(host, port);
        }
        for file in &self.files {
            guest = guest.file(file);
        }
        if self.iommu {
            guest = guest.iommu();
        }
        if self.reach_host {
            guest = guest.reach_host();
        }
        if let Some(args) = &self.append {
            guest = guest.append(args);
        }
        Ok(guest)
    }
}

/// Runs `vnvme guest`: boots the guest, streams its console to stdout and returns the
/// script's exit status (124 if the guest timed out).
pub fn run(args: &GuestArgs) -> anyhow::Result<i32> {
    match args.guest()?.run() {
        Ok(output) => Ok(output.status),
        Err(VmError::Timeout { secs, qemu_pid, .. }) => {
            eprintln!("vnvme guest: timed out after {secs} s; killed QEMU (pid {qemu_pid})");
            Ok(TIMEOUT_EXIT_CODE)
        }
        Err(e) => Err(e).context("running the guest"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: GuestArgs,
    }

    fn parse(argv: &[&str]) -> Result<GuestArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("guest").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn parses_everything() {
        let a = parse(&[
            "-c",
            "nvme list",
            "--nvme",
            "/tmp/a.img",
            "--nvme",
            "/tmp/b.img:max_ioqpairs=2",
            "--vfio-user",
            "/tmp/s.sock",
            "--hostfwd",
            "2222:22",
            "--iommu",
            "--file",
            "/bin/true",
            "--timeout",
            "30",
            "--smp",
            "1",
            "--mem",
            "512",
        ])
        .unwrap();
        assert_eq!(a.command.as_deref(), Some("nvme list"));
        assert_eq!(a.nvme, ["/tmp/a.img", "/tmp/b.img:max_ioqpairs=2"]);
        assert_eq!(a.hostfwd, [(2222, 22)]);
        assert!(a.iommu);
        assert_eq!((a.timeout, a.smp, a.mem), (30, 1, 512));
        let guest = a.guest().unwrap();
        let cmd = guest.command_line(
            qemu_harness::Accel::Tcg,
            std::path::Path::new("/k"),
            std::path::Path::new("/i"),
        );
        assert!(
            cmd.iter()
                .any(|x| x == "nvme,serial=vnvmeq1,drive=nvd1,max_ioqpairs=2")
        );
        assert!(cmd.iter().any(|x| x.contains("\"path\":\"/tmp/s.sock\"")));
    }

    #[test]
    fn needs_one_script() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["-c", "true", "--script", "/x"]).is_err());
        assert!(parse(&["-c", "true", "--hostfwd", "22"]).is_err());
    }
}
