//! Copy-on-write: giving a volume an exclusive top cluster for a logical cluster before a
//! write. An unmapped entry gets a fresh cluster holding no granule yet (the rest reads
//! zeroes: no zeroing of the cluster); a shared one gets a fresh top layer over the
//! shared clusters (the rest reads through: a 4 KiB write copies nothing). A partial
//! granule is filled from below first (by the data path without waiting: `fill.rs`; by a
//! resize in place: [`Core::prefill`]); an entry with too many layers
//! is collapsed into one full cluster ([`Core::collapse`]), as are entries an inflate or
//! decouple makes private.

use device_model::backend::{IoBuffer, IoOp};
use nvme_spec::Status;

use super::error::{LvolError, Result};
use super::map::{Entry, Layer, MAX_LAYERS, bit, bits_empty, set_bits};
use super::store::Core;

impl Core {
    /// The exclusive cluster writes to entry `l` of `vol` go to, made so if needed. An entry
    /// at [`MAX_LAYERS`] gets one more layer: the write to it then waits for the fills that
    /// collapse it (`fill.rs`).
    pub(crate) fn writable_top(&mut self, vol: u32, l: u32) -> std::result::Result<u32, Status> {
        let granules = self.geo.granules();
        let e = &self.meta.volumes[&vol].map[l as usize];
        let top = e.top();
        if let Some(c) = top
            && self.refs[c as usize] == 1
        {
            return Ok(c);
        }
        if let Entry::Layered(ls) = e
            && ls.len() > MAX_LAYERS
        {
            // one layer over the limit already (a snapshot took the entry while its
            // collapse ran): copied in place. Writes in flight to its layers must land (and
            // mark their granules) before the copy, or the copy would miss them
            self.wait_idle();
            let e = &self.meta.volumes[&vol].map[l as usize];
            if let Some(c) = e.top()
                && self.refs[c as usize] == 1
            {
                return Ok(c);
            }
            if matches!(e, Entry::Layered(ls) if ls.len() > MAX_LAYERS) {
                return self.collapse(vol, l).map_err(|_| Status::INTERNAL_ERROR);
            }
            return self.writable_top(vol, l);
        }
        let n = self.alloc().ok_or(Status::CAPACITY_EXCEEDED)?;
        let fresh = Layer {
            cluster: n,
            valid: bits_empty(granules),
        };
        let e = &mut self
            .meta
            .volumes
            .get_mut(&vol)
            .ok_or(Status::INTERNAL_ERROR)?
            .map[l as usize];
        let below: Vec<Layer> = match std::mem::take(e) {
            Entry::Unmapped => Vec::new(),
            Entry::Full(c) => {
                let mut all = bits_empty(granules);
                set_bits(&mut all, 0, granules);
                vec![Layer {
                    cluster: c,
                    valid: all,
                }]
            }
            Entry::Layered(ls) => ls.into_vec(),
        };
        let mut layers = Vec::with_capacity(below.len() + 1);
        layers.push(fresh);
        layers.extend(below);
        *e = Entry::Layered(layers.into_boxed_slice());
        self.dirty.insert((vol, l));
        Ok(n)
    }

    /// Give the (exclusive) top layer of entry `l` granule `g`'s current contents, waiting
    /// for the base in place (management only: the data path uses `fill.rs`).
    pub(crate) fn prefill(&mut self, vol: u32, l: u32, g: u32) -> std::result::Result<(), Status> {
        if self.dp.in_flight() > 0 {
            // a write to other sectors of this granule may be in flight below: let it land
            // (and mark the granule) before its granule is copied up
            self.wait_idle();
        }
        let e = &self.meta.volumes[&vol].map[l as usize];
        let Entry::Layered(ls) = e else {
            return Ok(()); // full: holds every granule
        };
        if bit(&ls[0].valid, g) {
            return Ok(());
        }
        let top = ls[0].cluster;
        let src = e.source(g);
        let gs = self.geo.granule;
        let buf = IoBuffer::new(gs as usize);
        let base = self.base.as_mut();
        if let Some(c) = src {
            let off = self.geo.cluster_at(c) + u64::from(g) * gs;
            self.sync
                .run(base, "copy a granule", IoOp::Read, off, Some((&buf, 0)), gs)
                .map_err(|_| Status::INTERNAL_ERROR)?;
        }
        let off = self.geo.cluster_at(top) + u64::from(g) * gs;
        self.sync
            .run(
                base,
                "copy a granule",
                IoOp::Write { fua: false },
                off,
                Some((&buf, 0)),
                gs,
            )
            .map_err(|_| Status::INTERNAL_ERROR)?;
        self.set_valid(vol, l, top, g, g + 1);
        Ok(())
    }

    /// Replace entry `l` of `vol` by one new full cluster holding its contents; returns the
    /// cluster. (Mapped entries only; the caller checked space, and no write to the entry's
    /// clusters is in flight: it would land in a cluster the copy has left.)
    pub(crate) fn collapse(&mut self, vol: u32, l: u32) -> Result<u32> {
        let cs = self.geo.cluster_size;
        let gs = self.geo.granule;
        let granules = self.geo.granules();
        let e = self.meta.volumes[&vol].map[l as usize].clone();
        let n = self
            .alloc()
            .ok_or_else(|| LvolError::NoSpace("no cluster for a copy".into()))?;
        let buf = IoBuffer::new(cs as usize);
        let mut g = 0;
        while g < granules {
            let src = e.source(g);
            let mut k = 1;
            while g + k < granules && e.source(g + k) == src {
                k += 1;
            }
            if let Some(c) = src {
                let off = self.geo.cluster_at(c) + u64::from(g) * gs;
                let boff = u64::from(g) * gs;
                self.sync.run(
                    self.base.as_mut(),
                    "copy a cluster",
                    IoOp::Read,
                    off,
                    Some((&buf, boff)),
                    u64::from(k) * gs,
                )?;
            }
            g += k;
        }
        let off = self.geo.cluster_at(n);
        self.sync.run(
            self.base.as_mut(),
            "copy a cluster",
            IoOp::Write { fua: false },
            off,
            Some((&buf, 0)),
            cs,
        )?;
        for c in e.clusters() {
            self.unref(c);
        }
        if let Some(v) = self.meta.volumes.get_mut(&vol) {
            v.map[l as usize] = Entry::Full(n);
        }
        self.dirty.insert((vol, l));
        Ok(n)
    }

    /// Make room for making every entry of `vol` private (`all`: unmapped ones too).
    pub(crate) fn make_room_to_privatize(&mut self, vol: u32, all: bool) -> Result<()> {
        let mut need = 0usize;
        for e in &self.meta.volumes[&vol].map {
            need += usize::from(match e {
                Entry::Unmapped => all,
                Entry::Full(c) => self.refs[*c as usize] > 1,
                Entry::Layered(_) => true,
            });
        }
        if need > self.free.len() {
            self.reclaim()?;
            self.apply_deferred();
            if need > self.free.len() {
                return Err(LvolError::NoSpace(format!(
                    "{need} clusters needed, {} free",
                    self.free.len()
                )));
            }
        }
        Ok(())
    }

    /// Make entry `l` of `vol` private: a shared or layered entry is copied into a cluster
    /// of its own; with `all`, an unmapped one gets a zeroed cluster too (inflate).
    pub(crate) fn privatize_entry(&mut self, vol: u32, l: u32, all: bool) -> Result<()> {
        match &self.meta.volumes[&vol].map[l as usize] {
            Entry::Unmapped if all => {
                let c = self
                    .alloc()
                    .ok_or_else(|| LvolError::NoSpace("inflate".into()))?;
                let off = self.geo.cluster_at(c);
                let cs = self.geo.cluster_size;
                self.sync.run(
                    self.base.as_mut(),
                    "zero a cluster",
                    IoOp::WriteZeroes { len: cs },
                    off,
                    None,
                    cs,
                )?;
                if let Some(v) = self.meta.volumes.get_mut(&vol) {
                    v.map[l as usize] = Entry::Full(c);
                }
                self.dirty.insert((vol, l));
            }
            Entry::Full(c) if self.refs[*c as usize] > 1 => {
                self.collapse(vol, l)?;
            }
            Entry::Layered(_) => {
                self.collapse(vol, l)?;
            }
            _ => {}
        }
        Ok(())
    }
}
