//! Shadow doorbells and EventIdx (NVMe base 2.0 §5.8, Doorbell Buffer Config): the host
//! keeps a copy of every doorbell in a page of its own memory, and the controller keeps an
//! EventIdx per doorbell in a second page telling the host when a real doorbell write is
//! needed.
//!
//! Our data plane polls, so it never needs a doorbell write to notice work: after reading a
//! new shadow value `v` it sets EventIdx to `v - 1`, which makes the host's check
//! `(u16)(new - ei - 1) < (u16)(new - old)` false for any `new`, so a host that follows
//! EventIdx (Linux) stops writing the doorbell register. A host that writes the register
//! anyway is also served: whichever of the two copies changed last wins.

use std::sync::Arc;

use crate::doorbell::Doorbells;
use crate::memory::{AccessError, MemoryMap};
use crate::ring_view::RingView;

/// Guest addresses of the shadow doorbell and EventIdx pages (PRP1 and PRP2 of the command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowDoorbells {
    pub shadow: u64,
    pub event_idx: u64,
}

/// What the controller last saw of one doorbell, through either copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellSeen {
    /// Last value read from the doorbell register page.
    pub register: u32,
    /// Last value read from the shadow page.
    pub shadow: u32,
    /// The doorbell's current value (the most recent change of either copy).
    pub value: u32,
}

impl ShadowDoorbells {
    /// Read shadow doorbell `index` (SQ y tail = 2y, CQ y head = 2y + 1; stride 4 bytes).
    pub fn read(&self, mem: &MemoryMap, index: usize) -> Result<u32, AccessError> {
        let mut b = [0u8; 4];
        mem.read(self.shadow + index as u64 * 4, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Write shadow doorbell `index` (set up of a queue's copy).
    pub fn write(&self, mem: &MemoryMap, index: usize, value: u32) -> Result<(), AccessError> {
        mem.write(self.shadow + index as u64 * 4, &value.to_le_bytes())
    }

    /// Write EventIdx `index`.
    pub fn write_event_idx(
        &self,
        mem: &MemoryMap,
        index: usize,
        value: u32,
    ) -> Result<(), AccessError> {
        mem.write(self.event_idx + index as u64 * 4, &value.to_le_bytes())
    }

    /// Start tracking doorbell `index` whose current value is `value`: the shadow copy and
    /// EventIdx are brought in line with it. A register holding a newer value still counts as
    /// a change.
    pub fn attach(
        &self,
        mem: &MemoryMap,
        index: usize,
        value: u32,
    ) -> Result<DoorbellSeen, AccessError> {
        self.write(mem, index, value)?;
        self.write_event_idx(mem, index, value.wrapping_sub(1))?;
        Ok(DoorbellSeen {
            register: value,
            shadow: value,
            value,
        })
    }
}

/// The shadow doorbell and EventIdx pages seen through host pointers, found once per DMA map
/// as a queue's ring is ([`RingView`]): a doorbell read per queue per poll without a region
/// lookup. Either page may have no view (not in one region, not aligned): its accesses then
/// go through the map, which reports the fault.
#[derive(Debug)]
pub struct ShadowView {
    pages: ShadowDoorbells,
    map: Arc<MemoryMap>,
    shadow: Option<RingView>,
    event_idx: Option<RingView>,
}

impl ShadowView {
    /// The view of `pages` (each `page_size` bytes) in `map`.
    pub fn new(map: &Arc<MemoryMap>, pages: ShadowDoorbells, page_size: u64) -> Self {
        Self {
            pages,
            map: Arc::clone(map),
            shadow: RingView::new(map, pages.shadow, page_size, false),
            event_idx: RingView::new(map, pages.event_idx, page_size, true),
        }
    }

    /// True when this is the view of `pages` in `map`.
    pub fn is_current(&self, pages: &ShadowDoorbells, map: &MemoryMap) -> bool {
        self.pages == *pages && std::ptr::eq(Arc::as_ptr(&self.map), map)
    }
}

/// The current value of doorbell `index`. Without a shadow buffer that is the register; with
/// one, the copy that changed since the last look (the shadow when both did). `view` is the
/// pages' view in `mem`, if any.
#[inline]
pub fn current(
    regs: &Doorbells,
    shadow: Option<&ShadowDoorbells>,
    view: Option<&ShadowView>,
    mem: &MemoryMap,
    index: usize,
    seen: &mut DoorbellSeen,
) -> u32 {
    let register = regs.load(index);
    match shadow {
        None => register, // inlined: a register load per queue per poll
        Some(sh) => current_with_shadow(register, sh, view, mem, index, seen),
    }
}

/// [`current`] with a shadow buffer: `register` is the register's value.
#[inline(never)]
fn current_with_shadow(
    register: u32,
    sh: &ShadowDoorbells,
    view: Option<&ShadowView>,
    mem: &MemoryMap,
    index: usize,
    seen: &mut DoorbellSeen,
) -> u32 {
    // (a view of other pages: Doorbell Buffer Config ran earlier in this pass)
    let view = view.filter(|v| v.pages == *sh);
    let viewed = view.and_then(|v| v.shadow.as_ref()?.read_u32(index * 4));
    let value = viewed
        .or_else(|| sh.read(mem, index).ok())
        .unwrap_or(seen.shadow);
    if value != seen.shadow {
        seen.shadow = value;
        seen.register = register;
        seen.value = value;
        // best effort: an unwritable EventIdx page only costs the host extra register writes
        let ei = value.wrapping_sub(1);
        let written = view
            .and_then(|v| v.event_idx.as_ref())
            .is_some_and(|v| v.write_u32(index * 4, ei));
        if !written {
            let _ = sh.write_event_idx(mem, index, ei);
        }
    } else if register != seen.register {
        seen.register = register;
        seen.value = register;
    }
    seen.value
}
