//! What one pooled server connection holds of the statements spillway prepared there
//! for its clients, and which of them to close to make room.

/// What a statement's Parse sent on this connection will make it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// PostgreSQL confirmed it.
    Held,
    /// Its Parse went in cycle `n`, not confirmed yet.
    Pending(u64),
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) slot: Slot,
    /// Last use, for eviction (the connection's clock).
    pub(super) used: u64,
}

/// The statements one server connection holds under spillway's names. It travels
/// with the connection between leases.
#[derive(Debug, Default)]
pub struct ServerStatements {
    /// aHash: looked up at every Bind of a named statement.
    pub(super) held: ahash::AHashMap<Box<str>, Entry>,
    pub(super) clock: u64,
}

impl ServerStatements {
    /// How many statements the connection holds or is preparing.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The connection holds none of spillway's statements any more (`DISCARD ALL`).
    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Whether `name` may be used by a message sent now, in cycle `cycle` (confirmed,
    /// or its Parse ahead in the same cycle), and if so marked used now: one lookup.
    pub(super) fn touch_if_usable(&mut self, name: &str, cycle: u64) -> bool {
        let Some(e) = self.held.get_mut(name) else {
            return false;
        };
        if e.slot != Slot::Held && e.slot != Slot::Pending(cycle) {
            return false;
        }
        self.clock += 1;
        e.used = self.clock;
        true
    }

    pub(super) fn pending(&mut self, name: &str, cycle: u64) {
        self.clock += 1;
        self.held.insert(
            name.into(),
            Entry {
                slot: Slot::Pending(cycle),
                used: self.clock,
            },
        );
    }

    /// The least recently used statement PostgreSQL confirmed, other than `keep`.
    pub(super) fn victim(&self, keep: &str) -> Option<Box<str>> {
        self.held
            .iter()
            .filter(|(name, e)| e.slot == Slot::Held && &***name != keep)
            .min_by_key(|(_, e)| e.used)
            .map(|(name, _)| name.clone())
    }
}
