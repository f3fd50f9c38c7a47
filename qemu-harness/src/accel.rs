//! Choosing QEMU's accelerator: KVM where it can run a stock kernel, TCG otherwise.

use std::fmt;
use std::path::Path;

use super::VmError;

/// Environment variable overriding the choice: `tcg`, `kvm` or `auto` (the default).
pub const ACCEL_ENV: &str = "VNVME_ACCEL";

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`-accel kvm -cpu host`).
    Kvm,
    /// Multi-threaded software emulation (`-accel tcg,thread=multi -cpu max`).
    Tcg,
}

impl Accel {
    /// Picks the accelerator from `$VNVME_ACCEL` and what the host offers.
    pub fn detect() -> Result<Self, VmError> {
        let env = std::env::var(ACCEL_ENV).ok();
        Self::choose(env.as_deref(), kvm_usable())
    }

    /// The decision behind [`Accel::detect`]: `setting` is the environment override (if
    /// any), `kvm_usable` whether the host has a real (not nested "PVM") KVM we may open.
    pub fn choose(setting: Option<&str>, kvm_usable: bool) -> Result<Self, VmError> {
        match setting.map(str::trim).unwrap_or_default() {
            "" | "auto" => Ok(if kvm_usable { Self::Kvm } else { Self::Tcg }),
            "tcg" => Ok(Self::Tcg),
            "kvm" => Ok(Self::Kvm),
            other => Err(VmError::Config(format!(
                "{ACCEL_ENV}={other:?}: expected tcg, kvm or auto"
            ))),
        }
    }

    /// The QEMU arguments selecting this accelerator and a matching CPU model.
    pub fn qemu_args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            Self::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// Whether KVM can be used: `/dev/kvm` opens read-write and a stock KVM module
/// (`kvm_intel` or `kvm_amd`) is loaded. A nested "PVM" KVM has neither module and cannot
/// run stock kernels.
pub fn kvm_usable() -> bool {
    let vendor_module = ["kvm_intel", "kvm_amd"]
        .iter()
        .any(|m| Path::new("/sys/module").join(m).exists());
    vendor_module
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_kvm_availability() {
        assert_eq!(Accel::choose(None, true).unwrap(), Accel::Kvm);
        assert_eq!(Accel::choose(None, false).unwrap(), Accel::Tcg);
        assert_eq!(Accel::choose(Some("auto"), false).unwrap(), Accel::Tcg);
        assert_eq!(Accel::choose(Some(""), true).unwrap(), Accel::Kvm);
    }

    #[test]
    fn override_wins() {
        assert_eq!(Accel::choose(Some("tcg"), true).unwrap(), Accel::Tcg);
        assert_eq!(Accel::choose(Some("kvm"), false).unwrap(), Accel::Kvm);
        assert!(matches!(
            Accel::choose(Some("hvf"), true),
            Err(VmError::Config(_))
        ));
    }

    #[test]
    fn args() {
        assert_eq!(
            Accel::Tcg.qemu_args(),
            ["-accel", "tcg,thread=multi", "-cpu", "max"]
        );
        assert_eq!(Accel::Kvm.to_string(), "kvm");
    }
}
