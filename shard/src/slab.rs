//! A generational slab: the shard's table of connections.
//!
//! A [`ConnId`] names a slot and the generation it was issued in, so a message that names
//! a connection which closed meanwhile (and whose slot was reused) finds nothing instead
//! of the wrong connection.

/// A connection of one shard: slot index and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    idx: u32,
    gen: u32,
}

impl ConnId {
    /// Packs into 64 bits (for socket ids).
    pub fn as_u64(self) -> u64 {
        (self.gen as u64) << 32 | self.idx as u64
    }

    /// Unpacks [`ConnId::as_u64`].
    pub fn from_u64(v: u64) -> ConnId {
        ConnId { idx: v as u32, gen: (v >> 32) as u32 }
    }
}

struct Slot<T> {
    gen: u32,
    val: Option<T>,
}

/// Slots reused through a free list; lookups are an index and a generation compare.
pub struct Slab<T> {
    slots: Vec<Slot<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab { slots: Vec::new(), free: Vec::new(), len: 0 }
    }
}

impl<T> Slab<T> {
    /// Stores `val` and returns its id.
    pub fn insert(&mut self, val: T) -> ConnId {
        self.len += 1;
        if let Some(idx) = self.free.pop() {
            let slot = &mut self.slots[idx as usize];
            slot.gen = slot.gen.wrapping_add(1);
            slot.val = Some(val);
            ConnId { idx, gen: slot.gen }
        } else {
            self.slots.push(Slot { gen: 0, val: Some(val) });
            ConnId { idx: (self.slots.len() - 1) as u32, gen: 0 }
        }
    }

    /// Removes and returns the value of `id`, if still present.
    pub fn remove(&mut self, id: ConnId) -> Option<T> {
        let slot = self.slots.get_mut(id.idx as usize)?;
        if slot.gen != id.gen {
            return None;
        }
        let val = slot.val.take()?;
        self.free.push(id.idx);
        self.len -= 1;
        Some(val)
    }

    /// The value of `id`, if still present.
    pub fn get(&self, id: ConnId) -> Option<&T> {
        self.slots.get(id.idx as usize).filter(|s| s.gen == id.gen).and_then(|s| s.val.as_ref())
    }

    /// The value of `id`, if still present.
    pub fn get_mut(&mut self, id: ConnId) -> Option<&mut T> {
        self.slots.get_mut(id.idx as usize).filter(|s| s.gen == id.gen).and_then(|s| s.val.as_mut())
    }

    /// Number of live values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Visits every live value.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (ConnId, &mut T)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let gen = s.gen;
            s.val.as_mut().map(|v| (ConnId { idx: i as u32, gen }, v))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_ids_find_nothing() {
        let mut s = Slab::default();
        let a = s.insert("a");
        assert_eq!(s.remove(a), Some("a"));
        let b = s.insert("b");
        assert_eq!(s.get(a), None);
        assert_eq!(s.get(b), Some(&"b"));
        assert_eq!(s.len(), 1);
        assert_ne!(a.as_u64(), b.as_u64());
    }
}
