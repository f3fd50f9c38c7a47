//! The backend devices of one process, by target name, so every namespace backend on the
//! same SSD shares one [`SharedDevice`] (one bring-up, one set of guest-memory mirrors).

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use host_driver::NvmeDriver;

use crate::shared_device::SharedDevice;

/// Open devices by target; a device lives as long as a backend uses it.
#[derive(Debug, Default)]
pub struct DeviceRegistry {
    devices: HashMap<String, Weak<SharedDevice>>,
}

impl DeviceRegistry {
    /// The device for `target`, brought up by `open` if no backend uses it yet.
    pub fn get_or_open<E>(
        &mut self,
        target: &str,
        open: impl FnOnce() -> Result<NvmeDriver, E>,
    ) -> Result<Arc<SharedDevice>, E> {
        if let Some(dev) = self.devices.get(target).and_then(Weak::upgrade) {
            return Ok(dev);
        }
        let dev = SharedDevice::new(open()?);
        self.devices
            .insert(target.to_string(), Arc::downgrade(&dev));
        Ok(dev)
    }
}
