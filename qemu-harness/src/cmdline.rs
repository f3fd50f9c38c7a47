//! Building the QEMU and guest kernel command lines from a [`Guest`].

use std::fmt::Write as _;
use std::path::Path;

use super::{Accel, Guest};

/// Kernel arguments every guest gets.
const BASE_KERNEL_ARGS: &str = "console=ttyS0 quiet panic=-1 oops=panic";
/// Kernel arguments for a guest with an IOMMU.
const IOMMU_KERNEL_ARGS: &str = "intel_iommu=on iommu=pt";

impl Guest {
    /// The guest kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        let mut args = vec![BASE_KERNEL_ARGS];
        if self.iommu {
            args.push(IOMMU_KERNEL_ARGS);
        }
        args.extend(
            self.append
                .iter()
                .map(String::as_str)
                .filter(|a| !a.trim().is_empty()),
        );
        args.join(" ")
    }

    /// The QEMU arguments (without the program) for booting this guest with `accel` from
    /// `kernel` and `initrd`.
    pub fn command_line(&self, accel: Accel, kernel: &Path, initrd: &Path) -> Vec<String> {
        let mem = self.mem_mib;
        let mut machine = "q35,memory-backend=mem".to_owned();
        if self.iommu {
            machine.push_str(",kernel-irqchip=split");
        }
        let mut a: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]
        .into_iter()
        .chain(accel.qemu_args())
        .map(str::to_owned)
        .collect();
        a.extend([
            "-smp".into(),
            self.smp.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-machine".into(),
            machine,
            "-chardev".into(),
            "stdio,id=con0,signal=off".into(),
            "-serial".into(),
            "chardev:con0".into(),
            "-kernel".into(),
            kernel.display().to_string(),
            "-initrd".into(),
            initrd.display().to_string(),
            "-append".into(),
            self.kernel_cmdline(),
        ]);
        // intel-iommu must come before the devices it translates for.
        if self.iommu {
            a.extend([
                "-device".into(),
                "intel-iommu,intremap=on,caching-mode=on".into(),
            ]);
        }
        for (i, (image, opts)) in self.nvme.iter().enumerate() {
            let file = qemu_opt_value(&image.display().to_string());
            let mut device = format!("nvme,serial=vnvmeq{i},drive=nvd{i}");
            if !opts.is_empty() {
                let _ = write!(device, ",{opts}");
            }
            a.extend([
                "-drive".into(),
                format!("file={file},if=none,id=nvd{i},format=raw,cache=unsafe"),
                "-device".into(),
                device,
            ]);
        }
        // More devices than the root bus has slots for: each goes behind a PCIe root port of
        // its own, eight root ports (functions) per slot from slot 8 on: up to 192 devices.
        let behind_ports = self.vfio_user.len() > ROOT_BUS_DEVICES;
        for (i, socket) in self.vfio_user.iter().enumerate() {
            let path = json_string(&socket.display().to_string());
            let bus = if behind_ports {
                let (slot, func) = (8 + i / 8, i % 8);
                a.extend([
                    "-device".into(),
                    format!(
                        "pcie-root-port,id=rp{i},bus=pcie.0,chassis={},addr={slot:#x}.{func}{},\
                         io-reserve=0,mem-reserve=1M,pref64-reserve=0",
                        i + 1,
                        if func == 0 { ",multifunction=on" } else { "" }
                    ),
                ]);
                format!(r#","bus":"rp{i}""#)
            } else {
                String::new()
            };
            a.extend([
                "-device".into(),
                format!(
                    r#"{{"driver":"vfio-user-pci","id":"vu{i}"{bus},"socket":{{"type":"unix","path":{path}}}}}"#
                ),
            ]);
        }
        if !self.hostfwd.is_empty() || self.reach_host {
            // restrict=on keeps the guest off the host's network; a guest that must reach
            // a server on the host's loopback (as 10.0.2.2) gets restrict=off
            let mut netdev = format!(
                "user,id=n0,restrict={}",
                if self.reach_host { "off" } else { "on" }
            );
            for (host, guest) in &self.hostfwd {
                let _ = write!(netdev, ",hostfwd=tcp:127.0.0.1:{host}-:{guest}");
            }
            a.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-pci,netdev=n0,romfile=".into(),
            ]);
        }
        a.extend(self.qemu_args.iter().cloned());
        a
    }
}

/// vfio-user devices placed straight on the q35 root bus; more go behind root ports.
const ROOT_BUS_DEVICES: usize = 16;

/// Escapes a value inside a QEMU `key=value,...` option string (commas are doubled).
fn qemu_opt_value(value: &str) -> String {
    value.replace(',', ",,")
}

/// A JSON string literal for `value`.
fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn args(guest: &Guest) -> Vec<String> {
        guest.command_line(
            Accel::Tcg,
            Path::new("/k/vmlinuz"),
            Path::new("/r/initrd.cpio"),
        )
    }

    /// The value following the `n`-th occurrence of option `opt`.
    fn values<'a>(args: &'a [String], opt: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == opt)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn minimal_guest() {
        let a = args(&Guest::new("true"));
        assert_eq!(
            a[..9],
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-accel",
                "tcg,thread=multi",
                "-cpu",
                "max"
            ]
        );
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["1024M"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=1024M,share=on"]
        );
        assert_eq!(values(&a, "-machine"), ["q35,memory-backend=mem"]);
        assert_eq!(values(&a, "-chardev"), ["stdio,id=con0,signal=off"]);
        assert_eq!(values(&a, "-serial"), ["chardev:con0"]);
        assert_eq!(values(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/r/initrd.cpio"]);
        assert_eq!(
            values(&a, "-append"),
            ["console=ttyS0 quiet panic=-1 oops=panic"]
        );
        assert!(values(&a, "-device").is_empty());
        assert!(values(&a, "-netdev").is_empty());
    }

    #[test]
    fn full_guest() {
        let guest = Guest::new("true")
            .smp(4)
            .mem_mib(2048)
            .iommu()
            .qemu_nvme("/img/a.raw", "")
            .qemu_nvme("/img/b,c.raw", ",max_ioqpairs=4")
            .vfio_user("/run/v\"0.sock")
            .vfio_user("/run/v1.sock")
            .hostfwd(2222, 22)
            .hostfwd(8080, 80)
            .append("hnocoldplug=1")
            .qemu_arg("-s")
            .timeout(Duration::from_secs(5));
        let a = guest.command_line(Accel::Kvm, Path::new("/k"), Path::new("/i"));
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
        assert_eq!(values(&a, "-smp"), ["4"]);
        assert_eq!(values(&a, "-m"), ["2048M"]);
        assert_eq!(
            values(&a, "-object"),
            ["memory-backend-memfd,id=mem,size=2048M,share=on"]
        );
        assert_eq!(
            values(&a, "-machine"),
            ["q35,memory-backend=mem,kernel-irqchip=split"]
        );
        assert_eq!(
            values(&a, "-append"),
            ["console=ttyS0 quiet panic=-1 oops=panic intel_iommu=on iommu=pt hnocoldplug=1"]
        );
        assert_eq!(
            values(&a, "-drive"),
            [
                "file=/img/a.raw,if=none,id=nvd0,format=raw,cache=unsafe",
                "file=/img/b,,c.raw,if=none,id=nvd1,format=raw,cache=unsafe",
            ]
        );
        assert_eq!(
            values(&a, "-device"),
            [
                "intel-iommu,intremap=on,caching-mode=on",
                "nvme,serial=vnvmeq0,drive=nvd0",
                "nvme,serial=vnvmeq1,drive=nvd1,max_ioqpairs=4",
                r#"{"driver":"vfio-user-pci","id":"vu0","socket":{"type":"unix","path":"/run/v\"0.sock"}}"#,
                r#"{"driver":"vfio-user-pci","id":"vu1","socket":{"type":"unix","path":"/run/v1.sock"}}"#,
                "virtio-net-pci,netdev=n0,romfile=",
            ]
        );
        assert_eq!(
            values(&a, "-netdev"),
            [
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80"
            ]
        );
        assert_eq!(a.last().map(String::as_str), Some("-s"));
    }

    #[test]
    fn many_vfio_user_devices_go_behind_root_ports() {
        let mut guest = Guest::new("true");
        for i in 0..20 {
            guest = guest.vfio_user(format!("/run/v{i}.sock"));
        }
        let a = guest.command_line(Accel::Tcg, Path::new("/k"), Path::new("/i"));
        let d = values(&a, "-device");
        assert_eq!(d.len(), 40);
        assert_eq!(
            d[0],
            "pcie-root-port,id=rp0,bus=pcie.0,chassis=1,addr=0x8.0,multifunction=on,\
             io-reserve=0,mem-reserve=1M,pref64-reserve=0"
        );
        assert_eq!(
            d[1],
            r#"{"driver":"vfio-user-pci","id":"vu0","bus":"rp0","socket":{"type":"unix","path":"/run/v0.sock"}}"#
        );
        assert!(d[38].starts_with("pcie-root-port,id=rp19,bus=pcie.0,chassis=20,addr=0xa.3,io"));
    }

    #[test]
    fn json_escaping() {
        assert_eq!(json_string("a\"b\\c\n"), r#""a\"b\\c\u000a""#);
    }
}
