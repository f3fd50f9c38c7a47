//! The daemon's arrays (RAID 0/1/10, concat; see the `volumes` crate): assembled from their
//! members at start (`[[array]]`) or at run time (`raid_create`), handed to the namespace
//! that names them (`array:NAME`), and managed through their handles while a reactor owns
//! them: members added and removed, rebuild rate set, status listed.
//!
//! Every array has a thread of its own for background work (rebuild, resync, commands)
//! while no reactor polls it ([`DrivenArray`]), used by a namespace or not.

use std::sync::Arc;

use device_model::GuestMemory;
use device_model::backend::Backend;
use pcie_p2p::{DeviceRegistry, TransferStats};
use volumes::raid::{self, ArrayHandle, ArrayStatus, DrivenArray, Level, MemberIn};

use crate::backend_spec::{BackendSpec, refuse_in_worker};
use crate::config::ArraySpec;

/// One array the daemon knows.
struct Slot {
    name: String,
    handle: ArrayHandle,
    /// The array while no namespace has it.
    idle: Option<DrivenArray>,
    /// The namespace that has it.
    used_by: Option<String>,
    /// Member specs by slot, as users wrote them.
    members: Vec<String>,
    /// Members refused at assembly, with why.
    refused: Vec<String>,
}

/// The arrays of a daemon.
#[derive(Default)]
pub struct Arrays {
    list: Vec<Slot>,
    /// Transfer counters of `nvme:` members, by spec.
    transfers: Vec<(String, Arc<TransferStats>)>,
    /// A supervised worker's: members on `malloc:` RAM the supervisor does not keep are
    /// refused (their data would die with the process while the hosts see no power loss).
    worker: bool,
}

impl std::fmt::Debug for Arrays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|s| &s.name))
            .finish()
    }
}

/// Bytes per second of a rate in MB/s.
fn rate_of(mb: Option<u64>) -> u64 {
    mb.map_or(raid::DEFAULT_RATE, |m| m.saturating_mul(1_000_000))
}

/// `fast_io_fail_tmo` of a member on a remote target that does not set its own: a mirror
/// must not wait for a lost target until the controller loss timeout (60 s by default,
/// longer than a guest's I/O timeout) when another copy can take its writes.
pub const MEMBER_FAST_IO_FAIL: std::time::Duration = std::time::Duration::from_secs(5);

/// Open member `spec` (an `nvme:` member gets its guest memory when a namespace takes the
/// array: [`Backend::use_guest_memory`]).
fn open_member(spec: &str, devices: &mut DeviceRegistry) -> Result<Box<dyn Backend>, String> {
    open_member_counted(spec, devices).map(|(b, _)| b)
}

/// [`open_member`], with the transfer counters of an `nvme:` member.
fn open_member_counted(spec: &str, devices: &mut DeviceRegistry) -> Result<Member, String> {
    let mut parsed: BackendSpec = spec.parse().map_err(|e| format!("{e}"))?;
    match &mut parsed {
        BackendSpec::Array { .. } => {
            return Err(format!("{spec}: an array cannot be a member of an array"));
        }
        BackendSpec::NvmeTcp(url) => {
            url.fast_io_fail_tmo.get_or_insert(MEMBER_FAST_IO_FAIL);
        }
        _ => {}
    }
    // no guest memory yet: the array's namespace gives its controller's when it takes the
    // array (until then, and for arrays under a volume store, `nvme:` members bounce)
    let guest = Arc::new(GuestMemory::new());
    parsed
        .open(&guest, devices)
        .map(|o| (o.backend, o.transfer))
        .map_err(|e| format!("{spec}: {e}"))
}

/// An opened member and, for an `nvme:` one, its transfer counters.
type Member = (Box<dyn Backend>, Option<Arc<TransferStats>>);

/// Open a member the array's superblocks record and the configuration does not name (one
/// added at run time). The superblocks live on the members, so this opens nothing new: a
/// file is opened as it is (never created or resized: a `:SIZE` is dropped), a network or
/// device namespace as recorded; anything else is not reopened this way. Assembly then
/// accepts it only if it carries this array's superblock for that slot.
fn open_recorded(spec: &str, devices: &mut DeviceRegistry) -> Result<(String, Member), String> {
    let parsed: BackendSpec = spec.parse().map_err(|e| format!("{e}"))?;
    let spec = match parsed {
        BackendSpec::File { path, .. } => format!("file:{}", path.display()),
        // and RAM a supervisor keeps (a member added at run time under it): the next worker
        // opens the same memfd
        BackendSpec::NvmeTcp(_)
        | BackendSpec::Nvme { .. }
        | BackendSpec::Malloc { kept: Some(_), .. } => spec.to_owned(),
        _ => return Err("not a member kind reopened from a superblock".into()),
    };
    let m = open_member_counted(&spec, devices)?;
    Ok((spec, m))
}

/// What identifies a member across the ways a spec can name it: a file by its path (with or
/// without `:SIZE`), a remote namespace by its addresses, NQN and NSID (not its options);
/// anything else by the spec as written.
fn member_key(spec: &str) -> String {
    match spec.parse::<BackendSpec>() {
        Ok(BackendSpec::File { path, .. }) => format!("file:{}", path.display()),
        Ok(BackendSpec::NvmeTcp(url)) => url.to_string(),
        _ => spec.to_owned(),
    }
}

impl Arrays {
    /// No arrays yet; `worker` for a supervised worker (members on unkept `malloc:` refused).
    pub fn new(worker: bool) -> Self {
        Self {
            list: Vec::new(),
            transfers: Vec::new(),
            worker,
        }
    }

    fn find(&self, name: &str) -> Result<usize, String> {
        self.list
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| format!("no array named {name}"))
    }

    /// The array that has member `spec` already (RAM and null specs are never shared).
    fn member_in_use(&self, spec: &str) -> Option<&str> {
        if spec.starts_with("malloc:") || spec.starts_with("null:") {
            return None;
        }
        self.list
            .iter()
            .find(|s| s.members.iter().any(|m| m == spec))
            .map(|s| s.name.as_str())
    }

    /// Assemble the array `spec` describes from its members, or create it on them when
    /// none carries it yet. Returns what assembly refused (stale or foreign members).
    pub fn create(
        &mut self,
        spec: &ArraySpec,
        devices: &mut DeviceRegistry,
    ) -> Result<Vec<String>, String> {
        spec.check(&|f: &str| f.to_string())
            .map_err(|e| e.to_string())?;
        if self.list.iter().any(|s| s.name == spec.name) {
            return Err(format!("an array named {} exists", spec.name));
        }
        for m in &spec.members {
            if self.worker {
                refuse_in_worker(&format!("array {}", spec.name), m)?;
            }
            if let Some(other) = self.member_in_use(m) {
                return Err(format!("{m} is already a member of array {other}"));
            }
        }
        let level: Level = spec.level.parse()?;
        let strip = spec.strip_size_kb.unwrap_or(raid::DEFAULT_STRIP >> 10) << 10;
        let rate = rate_of(spec.rebuild_rate_mb);
        let mut members = Vec::new();
        let mut unopened = Vec::new();
        for m in &spec.members {
            match open_member_counted(m, devices) {
                Ok((backend, transfer)) => {
                    self.count(m, transfer);
                    members.push(MemberIn {
                        describe: m.clone(),
                        backend,
                    });
                }
                Err(why) => unopened.push(why),
            }
        }
        // assemble when any member carries this array's superblock, else create
        // the newest superblock of this array the members carry, if any
        let mut carried: Option<raid::Superblock> = None;
        for m in &mut members {
            if let Ok(sb) = raid::read_superblock(&m.describe, m.backend.as_mut())
                && sb.name == spec.name
            {
                if sb.level != level {
                    return Err(format!(
                        "{} carries array {} as {}, not {}",
                        m.describe,
                        sb.name,
                        sb.level.name(),
                        level.name()
                    ));
                }
                if carried
                    .as_ref()
                    .is_none_or(|c| sb.generation > c.generation)
                {
                    carried = Some(sb);
                }
            }
        }
        if let Some(sb) = &carried {
            self.add_recorded(spec, &sb.specs, &mut members, &mut unopened, devices);
        }
        let (array, handle, refused) = if carried.is_some() {
            // an existing array starts without the members that cannot be reached (degraded,
            // if its level allows it); they can be added back when they return
            let a = raid::assemble(Some(&spec.name), members, rate).map_err(|e| e.to_string())?;
            let refused: Vec<String> = unopened
                .into_iter()
                .chain(a.refused.iter().map(ToString::to_string))
                .collect();
            (a.array, a.handle, refused)
        } else if let Some(why) = unopened.into_iter().next() {
            return Err(why);
        } else {
            let (a, h) =
                raid::create(&spec.name, level, strip, members, rate).map_err(|e| e.to_string())?;
            (a, h, Vec::new())
        };
        // members by slot as the superblocks order them (the configuration's order may differ)
        let mut array = array;
        let members = array
            .status()
            .members
            .into_iter()
            .map(|m| m.describe)
            .collect();
        self.list.push(Slot {
            name: spec.name.clone(),
            handle,
            idle: Some(DrivenArray::new(array)),
            used_by: None,
            members,
            refused: refused.clone(),
        });
        Ok(refused)
    }

    /// Open the members `recorded` (the specs in the newest superblock of `spec`'s array)
    /// names that the configuration does not list (added by `raid_add_member` since it was written): a
    /// restart, or the next worker of a supervised daemon, finds them again.
    fn add_recorded(
        &mut self,
        spec: &ArraySpec,
        recorded: &[String],
        members: &mut Vec<MemberIn>,
        unopened: &mut Vec<String>,
        devices: &mut DeviceRegistry,
    ) {
        for r in recorded.iter().filter(|r| !r.is_empty()) {
            let key = member_key(r);
            if spec.members.iter().any(|m| member_key(m) == key)
                || members.iter().any(|m| member_key(&m.describe) == key)
                || self.member_in_use(r).is_some()
                || (self.worker && refuse_in_worker("a recorded member", r).is_err())
            {
                continue;
            }
            match open_recorded(r, devices) {
                Ok((describe, (backend, transfer))) => {
                    self.count(&describe, transfer);
                    log::info!(
                        "array {}: member {describe} from its superblocks (not in the configuration)",
                        spec.name
                    );
                    members.push(MemberIn { describe, backend });
                }
                Err(why) => {
                    unopened.push(format!("{r} (recorded in the array's superblocks): {why}"));
                }
            }
        }
    }

    /// Keep member `spec`'s transfer counters, if it has some.
    fn count(&mut self, spec: &str, transfer: Option<Arc<TransferStats>>) {
        if let Some(t) = transfer {
            self.transfers.retain(|(s, _)| s != spec);
            self.transfers.push((spec.into(), t));
        }
    }

    /// Bytes member `spec` moved zero-copy and through a bounce buffer (`nvme:` members).
    pub fn member_transfer(&self, spec: &str) -> Option<(u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        self.transfers
            .iter()
            .find(|(s, _)| s == spec)
            .map(|(_, t)| {
                (
                    t.zero_copy_bytes.load(Relaxed),
                    t.bounced_bytes.load(Relaxed),
                )
            })
    }

    /// Hand array `name` to namespace `user` (once).
    pub fn take(&mut self, name: &str, user: &str) -> Result<Box<dyn Backend>, String> {
        let i = self.find(name)?;
        let s = &mut self.list[i];
        match s.idle.take() {
            Some(a) => {
                s.used_by = Some(user.into());
                Ok(Box::new(a))
            }
            None => Err(format!(
                "array {name} is in use by {}",
                s.used_by.as_deref().unwrap_or("a namespace")
            )),
        }
    }

    /// Stop array `name` and wipe its members' superblocks (refused while a namespace
    /// uses it). When the namespace that had it is gone, so are its member backends: the
    /// members are opened again from their specs to be wiped (RAM members need none).
    pub fn delete(&mut self, name: &str, devices: &mut DeviceRegistry) -> Result<(), String> {
        let i = self.find(name)?;
        let s = &mut self.list[i];
        if s.idle.is_none() && !s.handle.is_closed() {
            return Err(format!(
                "array {name} is in use by {}; delete that namespace first",
                s.used_by.as_deref().unwrap_or("a namespace")
            ));
        }
        if let Some(d) = s.idle.take() {
            let mut a = d.into_array();
            for (describe, mut b) in a.take_members() {
                if let Err(e) = raid::wipe(&describe, b.as_mut()) {
                    log::warn!("array {name}: {e}");
                }
            }
        } else {
            for spec in &s.members {
                if spec.starts_with("malloc:") || spec.starts_with("null:") {
                    continue;
                }
                let wiped = open_member(spec, devices)
                    .and_then(|mut b| raid::wipe(spec, b.as_mut()).map_err(|e| e.to_string()));
                if let Err(e) = wiped {
                    log::warn!("array {name}: superblock of {spec} not wiped: {e}");
                }
            }
        }
        self.list.remove(i);
        Ok(())
    }

    /// Status of every array, with who uses it and what assembly refused.
    pub fn list(&mut self) -> Vec<(ArrayStatus, Option<String>, Vec<String>, bool)> {
        self.list
            .iter_mut()
            .map(|s| {
                let st = match s.idle.as_mut() {
                    Some(d) => d.with(volumes::raid::Array::status),
                    None => s.handle.status(),
                };
                (
                    st,
                    s.used_by.clone(),
                    s.refused.clone(),
                    s.handle.is_closed(),
                )
            })
            .collect()
    }

    /// Add member `spec` to array `name` (a returning member gets a partial rebuild).
    pub fn add_member(
        &mut self,
        name: &str,
        spec: &str,
        devices: &mut DeviceRegistry,
    ) -> Result<raid::AddOutcome, String> {
        let i = self.find(name)?;
        if self.worker {
            refuse_in_worker(&format!("array {name}"), spec)?;
        }
        if let Some(other) = self.member_in_use(spec)
            && other != name
        {
            return Err(format!("{spec} is already a member of array {other}"));
        }
        let s = &self.list[i];
        if s.handle.is_closed() {
            return Err(format!("array {name} was closed with its namespace"));
        }
        let st = s.handle.status();
        let own = spec.starts_with("malloc:") || spec.starts_with("null:");
        if !own
            && st
                .members
                .iter()
                .any(|m| m.describe == spec && m.state != "missing")
        {
            return Err(format!(
                "{spec} is already an active member of array {name}"
            ));
        }
        let (mut backend, transfer) = open_member_counted(spec, devices)?;
        self.count(spec, transfer);
        let sb = raid::read_superblock(spec, backend.as_mut()).ok();
        let s = &mut self.list[i];
        let out = s.handle.add_member(backend, spec.into(), sb, None)?;
        if out.slot < s.members.len() {
            s.members[out.slot] = spec.into();
        }
        Ok(out)
    }

    /// Retire member `member` (its spec, or its slot number) of array `name`: its slot and
    /// spec.
    pub fn remove_member(&mut self, name: &str, member: &str) -> Result<(usize, String), String> {
        let i = self.find(name)?;
        let s = &mut self.list[i];
        let slot = match member.parse::<usize>() {
            Ok(n) => n,
            Err(_) => s
                .members
                .iter()
                .position(|m| m == member)
                .ok_or_else(|| format!("{member} is not a member of array {name}"))?,
        };
        s.handle.remove_member(slot, None)?;
        Ok((slot, s.members.get(slot).cloned().unwrap_or_default()))
    }

    /// Set the rebuild rate of array `name` (MB/s, 0: no limit).
    pub fn set_rate(&mut self, name: &str, mb_per_sec: u64) -> Result<(), String> {
        let i = self.find(name)?;
        let s = &mut self.list[i];
        s.handle
            .set_rate(mb_per_sec.saturating_mul(1_000_000), None);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, members: &[String]) -> ArraySpec {
        ArraySpec {
            name: name.into(),
            level: "raid1".into(),
            members: members.to_vec(),
            strip_size_kb: None,
            rebuild_rate_mb: None,
        }
    }

    #[test]
    fn an_array_is_found_again_and_starts_degraded_without_a_lost_member() {
        let dir = std::env::temp_dir().join(format!("vnvme-arrays-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        let sized = [
            format!("file:{}:8M", a.display()),
            format!("file:{}:8M", b.display()),
        ];
        let mut devices = DeviceRegistry::default();
        let mut arrays = Arrays::default();
        assert_eq!(arrays.create(&spec("r", &sized), &mut devices), Ok(vec![]));
        // refusals: a second array of that name, a member already in use, unknown arrays
        assert!(arrays.create(&spec("r", &sized), &mut devices).is_err());
        let other = [sized[0].clone(), "malloc:8M".into()];
        let e = arrays.create(&spec("s", &other), &mut devices).unwrap_err();
        assert!(e.contains("already a member"), "{e}");
        // a supervised worker keeps no member in its own memory
        let ram = ["malloc:8M".to_string(), "malloc:8M".into()];
        let e = Arrays::new(true)
            .create(&spec("m", &ram), &mut devices)
            .unwrap_err();
        assert!(e.contains("serve --supervised"), "{e}");
        assert!(
            arrays
                .take("nope", "ns")
                .is_err_and(|e| e.contains("no array"))
        );
        assert!(arrays.delete("nope", &mut devices).is_err());
        let backend = arrays.take("r", "ns1").unwrap();
        assert!(
            arrays
                .take("r", "ns2")
                .err()
                .is_some_and(|e| e.contains("in use"))
        );
        assert!(
            arrays
                .delete("r", &mut devices)
                .unwrap_err()
                .contains("in use")
        );
        drop(backend); // the namespace goes: a clean stop
        assert!(arrays.list()[0].3, "closed");
        // a restart (a new daemon's arrays): the members still carry it, found again; one
        // member gone, it starts degraded and says why
        let mut arrays = Arrays::default();
        std::fs::remove_file(&b).unwrap();
        let plain = [
            format!("file:{}", a.display()),
            format!("file:{}", b.display()),
        ];
        let refused = arrays.create(&spec("r", &plain), &mut devices).unwrap();
        assert_eq!(refused.len(), 1, "{refused:?}");
        let (st, _, listed, _) = arrays.list().remove(0);
        assert_eq!((st.state, listed.len()), ("degraded", 1));
        // its namespace gone, raid_delete still wipes the members it can reach
        let backend = arrays.take("r", "ns1").unwrap();
        drop(backend);
        arrays.delete("r", &mut devices).unwrap();
        let mut m = open_member(&plain[0], &mut devices).unwrap();
        assert!(
            raid::read_superblock(&plain[0], m.as_mut()).is_err(),
            "wiped"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
