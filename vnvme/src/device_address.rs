//! Where a host-side tool finds a controller: `vfio-user:/path/to.sock` (a vfio-user
//! server such as `vnvme serve` or SPDK's target) or `pci:0000:01:00.0` (a local device
//! bound to vfio-pci).

use std::path::PathBuf;

use host_driver::NvmeDriver;
use host_driver::transport::vfio::VfioTransport;
use host_driver::transport::vfio_user::VfioUserTransport;

/// The address of a controller for the host-side tools.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceAddress {
    VfioUser(PathBuf),
    Pci(String),
}

/// DeviceAddress parse errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceAddressError {
    #[error("target {0:?}: expected vfio-user:/path/to.sock or pci:DDDD:BB:DD.F")]
    Syntax(String),
}

impl std::fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAddress::VfioUser(p) => write!(f, "vfio-user:{}", p.display()),
            DeviceAddress::Pci(bdf) => write!(f, "pci:{bdf}"),
        }
    }
}

impl std::str::FromStr for DeviceAddress {
    type Err = DeviceAddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("vfio-user:").filter(|p| !p.is_empty()) {
            return Ok(DeviceAddress::VfioUser(PathBuf::from(p)));
        }
        if let Some(bdf) = s.strip_prefix("pci:") {
            let ok = bdf.len() == 12
                && bdf.char_indices().all(|(i, c)| match i {
                    4 | 7 => c == ':',
                    10 => c == '.',
                    _ => c.is_ascii_hexdigit(),
                });
            if ok {
                return Ok(DeviceAddress::Pci(bdf.to_ascii_lowercase()));
            }
        }
        Err(DeviceAddressError::Syntax(s.to_string()))
    }
}

impl DeviceAddress {
    /// Connect and bring the controller up with `dma_size` bytes of DMA memory and
    /// `io_queues` I/O queue pairs.
    pub fn open(&self, dma_size: u64, io_queues: u16) -> anyhow::Result<NvmeDriver> {
        self.open_with_dma_base(dma_size, io_queues, host_driver::controller::DMA_IOVA_BASE)
    }

    /// As [`Self::open`], with the driver's DMA memory at device address `iova_base`.
    pub fn open_with_dma_base(
        &self,
        dma_size: u64,
        io_queues: u16,
        iova_base: u64,
    ) -> anyhow::Result<NvmeDriver> {
        let t: Box<dyn host_driver::Transport> = match self {
            DeviceAddress::VfioUser(path) => Box::new(VfioUserTransport::connect(path)?),
            DeviceAddress::Pci(bdf) => Box::new(VfioTransport::open(bdf)?),
        };
        Ok(NvmeDriver::with_dma_base(
            t, dma_size, io_queues, iova_base,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(
            "vfio-user:/tmp/a.sock".parse::<DeviceAddress>(),
            Ok(DeviceAddress::VfioUser("/tmp/a.sock".into()))
        );
        assert_eq!(
            "pci:0000:01:00.0".parse::<DeviceAddress>(),
            Ok(DeviceAddress::Pci("0000:01:00.0".into()))
        );
        for bad in [
            "",
            "vfio-user:",
            "pci:01:00.0",
            "pci:0000:01:00:0",
            "/tmp/a.sock",
            "tcp:x",
        ] {
            assert!(bad.parse::<DeviceAddress>().is_err(), "{bad}");
        }
    }
}
