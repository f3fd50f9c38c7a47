//! The RAM of `malloc:` namespaces under a supervisor: one memfd per `malloc:` spec, made
//! by the supervisor and handed to every worker (control message `RAM`), so what a guest
//! wrote outlives the worker that served it.
//!
//! A configured spec is kept as `cN` (its place among the configuration's `malloc:` specs,
//! [`Config::keep_configured_ram`]); one a run-time call names (`subsystem_create`,
//! `raid_create`, `lvs_create`) as `rN`, written into the call's request line before it is
//! forwarded and recorded (`malloc:SIZE@rN`), so its replay opens the same RAM. A deletion
//! that takes the creation out of the replayed list (`lvs_delete`, `raid_delete`,
//! `subsystem_delete`) lets go of its RAM.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde_json::{Value, json};

use super::control;
use crate::backend_spec::BackendSpec;
use crate::config::Config;

/// Most kept RAM memfds at once (configured and run time): a caller cannot make the
/// supervisor run out of descriptors.
const MAX_KEPT: usize = 256;
/// Most `malloc:` specs one run-time call may name.
pub(super) const MAX_PER_CALL: usize = 16;

/// Every kept RAM memfd, by key.
#[derive(Debug, Default)]
pub(super) struct KeptRam {
    all: Vec<(String, OwnedFd)>,
    /// The number of the next run-time key.
    next: u64,
}

impl KeptRam {
    /// Make the RAM of every `malloc:` spec of `cfg` (which names them `cN` from now on).
    pub(super) fn configured(cfg: &mut Config) -> std::io::Result<Self> {
        let mut all = Vec::new();
        for (key, size) in cfg.keep_configured_ram() {
            all.push((key, sys_util::kept_ram::create(c"vnvme-ram", size)?));
        }
        Ok(Self { all, next: 0 })
    }

    /// Hand every kept RAM to a worker starting on `ctl`.
    pub(super) fn send_all(&self, ctl: &UnixStream) -> std::io::Result<()> {
        for (key, fd) in &self.all {
            control::send(ctl, control::RAM, &json!({"key": key}), &[fd.as_fd()])?;
        }
        Ok(())
    }

    /// Make RAM of `size` bytes for a run-time call; hand it to the running worker on `ctl`
    /// (which acknowledges) if there is one. Its key.
    pub(super) fn make(
        &mut self,
        size: u64,
        ctl: Option<&UnixStream>,
    ) -> Result<String, std::io::Error> {
        if self.all.len() >= MAX_KEPT {
            return Err(std::io::Error::other(format!(
                "{MAX_KEPT} RAM namespaces, stores and members kept already"
            )));
        }
        let fd = sys_util::kept_ram::create(c"vnvme-ram", size)?;
        let key = format!("r{}", self.next);
        if let Some(ctl) = ctl {
            let body = json!({"key": key});
            match control::request(ctl, control::RAM, &body, &[fd.as_fd()], super::CONTROL_WAIT)? {
                Some(m) if m.command == control::DONE && m.body["ok"] == true => {}
                other => {
                    return Err(std::io::Error::other(format!(
                        "the worker did not take the RAM ({other:?})"
                    )));
                }
            }
        }
        self.next += 1;
        log::info!("supervisor: keeping {size} bytes of RAM as {key}");
        self.all.push((key.clone(), fd));
        Ok(key)
    }

    /// Let go of RAM `key` (its creation is no longer replayed, or was refused), and have
    /// the worker on `ctl` let go of it too if no namespace took it.
    pub(super) fn forget(&mut self, key: &str, ctl: Option<&UnixStream>) {
        if let Some(i) = self.all.iter().position(|(k, _)| k == key) {
            self.all.swap_remove(i);
            if let Some(ctl) = ctl
                && let Err(e) = control::send(ctl, control::FORGET, &json!({"key": key}), &[])
            {
                log::warn!("supervisor: telling the worker to let go of RAM {key}: {e}");
            }
            log::info!("supervisor: RAM {key} let go");
        }
    }
}

/// The kept RAM keys the `malloc:` specs of request `req` name.
pub(super) fn keys_in(req: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    visit_strings(&mut req.clone(), &mut |s| {
        if let Ok(BackendSpec::Malloc { kept: Some(k), .. }) = s.parse() {
            keys.push(k);
        }
    });
    keys
}

/// Call `f` on every string in `v`, which it may change.
pub(super) fn visit_strings(v: &mut Value, f: &mut dyn FnMut(&mut String)) {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter_mut().for_each(|x| visit_strings(x, f)),
        Value::Object(o) => o.values_mut().for_each(|x| visit_strings(x, f)),
        _ => {}
    }
}
