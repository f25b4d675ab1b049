//! One table's part of the key index: its key set, the keys the stream touched while
//! it loads, the keys that are unknown, spillway's pinned keys, and how each source of
//! changes moves them (the rules are in the parent module's header).
//!
//! Invariants: `set` is `Some` exactly while the table loads or is ready; `touched`
//! is empty unless it loads; a pin is active while its batch is above the released
//! one, and an active pin's key moves only through spillway's own batches.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use super::Phase;
use super::set::{Cursor, Key, KeyKind, KeySet};
use crate::engine::table::DeferredTable;
use crate::{KeyIndexConfig, RowCounts};

/// A key spillway's own batch wrote: its existence then, and the batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pin {
    pub(super) exists: bool,
    pub(super) batch: u64,
}

/// Progress of a table's load.
#[derive(Default)]
pub(super) struct Load {
    /// The WAL position read after the last chunk: the table is ready once the stream
    /// passed it.
    pub(super) end: Option<u64>,
    pub(super) cursor: Option<Cursor>,
    pub(super) chunks_done: bool,
    pub(super) began: Option<Instant>,
}

pub(super) struct TableIndex {
    pub(super) kind: Option<KeyKind>,
    pub(super) off: Option<&'static str>,
    /// Key columns and their type OIDs: a reload that changes them starts over.
    pub(super) signature: Vec<(String, u32)>,
    pub(super) phase: Phase,
    pub(super) set: Option<KeySet>,
    pub(super) touched: HashSet<Key>,
    pub(super) unknown: HashSet<Key>,
    pub(super) pins: HashMap<Key, Pin>,
    /// Bumped whenever a load starts or the index is dropped: a chunk read for an
    /// earlier generation is not applied.
    pub(super) generation: u64,
    pub(super) load: Load,
    pub(super) bytes: usize,
}

pub(super) fn signature(t: &DeferredTable) -> Vec<(String, u32)> {
    t.meta
        .key
        .iter()
        .map(|c| (c.clone(), t.type_oids.get(c).copied().unwrap_or(0)))
        .collect()
}

impl TableIndex {
    pub(super) fn new(t: &DeferredTable, config: &KeyIndexConfig) -> Self {
        let kind = KeyKind::of(t);
        let off = if !config.enabled {
            Some("key_index.enabled = false")
        } else if t.config.row_counts != RowCounts::Exact {
            Some("row_counts = \"assumed\"")
        } else if kind.is_none() {
            Some("a key column type without a canonical form")
        } else {
            None
        };
        TableIndex {
            kind,
            off,
            signature: signature(t),
            phase: if off.is_some() {
                Phase::Off
            } else {
                Phase::Untrusted
            },
            set: None,
            touched: HashSet::new(),
            unknown: HashSet::new(),
            pins: HashMap::new(),
            generation: 0,
            load: Load::default(),
            bytes: 0,
        }
    }

    pub(super) fn has_data(&self) -> bool {
        matches!(self.phase, Phase::Loading | Phase::Ready)
    }

    /// Drops everything and goes to `phase` (a new generation).
    pub(super) fn reset(&mut self, phase: Phase) {
        self.generation += 1;
        self.set = None;
        self.touched = HashSet::new();
        self.unknown = HashSet::new();
        self.pins = HashMap::new();
        self.load = Load::default();
        self.bytes = 0;
        self.phase = phase;
    }

    /// Starts loading again from the first key; false for a table without an index.
    pub(super) fn restart(&mut self) -> bool {
        let Some(kind) = self.kind.filter(|_| self.off.is_none()) else {
            return false;
        };
        let pins = std::mem::take(&mut self.pins);
        self.reset(Phase::Loading);
        // Pins outlive a restart: the stream may still deliver changes older than
        // spillway's writes to those keys.
        self.pins = pins;
        self.set = Some(KeySet::new(kind));
        true
    }

    /// The key's existence is now `exists`, from the stream or spillway's own batch.
    pub(super) fn put(&mut self, key: Key, exists: bool) {
        if let Some(set) = &mut self.set {
            if exists {
                set.insert(key.clone());
            } else {
                set.remove(&key);
            }
        }
        self.unknown.remove(&key);
        if self.phase == Phase::Loading {
            self.touched.insert(key);
        }
    }

    /// A committed change from the stream (`own`: spillway's flush), with pins of
    /// batches up to `released` released.
    pub(super) fn deliver(&mut self, key: Key, exists: bool, own: bool, released: u64) {
        if let Some(pin) = self.pins.get(&key).copied() {
            if pin.batch > released {
                // Older than the batch, or newer than it: only a disagreeing change
                // of another writer tells, and it cannot tell which.
                if pin.exists != exists && !own {
                    self.unknown.insert(key);
                }
                return;
            }
            self.pins.remove(&key);
        }
        self.put(key, exists);
    }

    pub(super) fn key(&self, canonical: &[String]) -> Option<Key> {
        Key::parse(self.kind?, canonical)
    }

    pub(super) fn measure(&mut self) {
        let aux = (self.touched.capacity() + self.unknown.capacity())
            * (std::mem::size_of::<Key>() + 1)
            + self.pins.capacity() * (std::mem::size_of::<(Key, Pin)>() + 1);
        self.bytes = self.set.as_ref().map_or(0, KeySet::bytes) + aux;
    }
}
