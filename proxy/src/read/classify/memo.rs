//! The [`Classifier`]: [`analyze`] behind a memo keyed by the exact statement text,
//! so each distinct text is parsed once (SPEC §4), and a size limit that keeps
//! oversized texts away from the parser.
//!
//! Invariants:
//! - Text longer than `max_parse_bytes` is never parsed nor memoised: it gets one
//!   shared `unanalysed` [`Analysis`].
//! - The memo is bounded both in entries and in bytes. moka bounds one weighted
//!   capacity, so every entry weighs at least `ceil(memo_bytes / memo_entries)`
//!   (its approximate size otherwise) and the capacity is `memo_bytes`: the weights
//!   sum to at most `memo_bytes`, hence at most `memo_entries` entries fit and their
//!   approximate bytes stay under `memo_bytes`. moka enforces the capacity
//!   asynchronously (on later operations or `run_pending_tasks`), so the bounds can be
//!   overshot briefly by the entries inserted since.
//! - A hit does not allocate: the lookup borrows the text as `&str`.
//! - `Classifier` is `Send + Sync`; parse results are shared as `Arc<Analysis>`.

use std::mem::size_of;
use std::sync::Arc;

use moka::sync::Cache;

use super::{Analysis, analyze};

/// Fixed per-entry cost on top of text and analysis: key box, Arc header, and moka's
/// own bookkeeping (entry, deque nodes, frequency sketch), roughly.
const ENTRY_OVERHEAD_BYTES: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassifierLimits {
    /// Texts longer than this (bytes) are passed through unanalysed, never parsed.
    pub max_parse_bytes: usize,
    /// At most this many memoised texts (0 disables the memo).
    pub memo_entries: u64,
    /// At most this many bytes of memoised texts and analyses, approximately
    /// (0 disables the memo).
    pub memo_bytes: u64,
}

/// Classifies statement texts, parsing each distinct text once. Shared by all session
/// workers behind an `Arc`.
pub struct Classifier {
    limits: ClassifierLimits,
    /// `None` when the limits disable memoisation.
    memo: Option<Cache<Box<str>, Arc<Analysis>>>,
    /// Handed out for every oversized text, so those cost no allocation.
    unanalysed: Arc<Analysis>,
}

impl Classifier {
    pub fn new(limits: ClassifierLimits) -> Self {
        let memo = (limits.memo_entries > 0 && limits.memo_bytes > 0).then(|| {
            // The weight floor that turns the byte capacity into an entry bound too;
            // moka weights are u32, and clamping the floor must not loosen the entry
            // bound, hence the capacity of at most `memo_entries` floors.
            let floor = limits
                .memo_bytes
                .div_ceil(limits.memo_entries)
                .min(u64::from(u32::MAX));
            let capacity = limits
                .memo_bytes
                .min(limits.memo_entries.saturating_mul(floor));
            Cache::<Box<str>, Arc<Analysis>>::builder()
                .name("spillway-classify")
                .max_capacity(capacity)
                .weigher(move |text, analysis| -> u32 {
                    let bytes = text.len() + analysis.approx_bytes() + ENTRY_OVERHEAD_BYTES;
                    let weight = u64::try_from(bytes).unwrap_or(u64::MAX).max(floor);
                    u32::try_from(weight).unwrap_or(u32::MAX)
                })
                .build()
        });
        Self {
            limits,
            memo,
            unanalysed: Arc::new(Analysis::unanalysed()),
        }
    }

    pub fn limits(&self) -> &ClassifierLimits {
        &self.limits
    }

    /// The analysis of `sql`: memoised if seen before, else parsed (and memoised).
    pub fn classify(&self, sql: &str) -> Arc<Analysis> {
        if sql.len() > self.limits.max_parse_bytes {
            return Arc::clone(&self.unanalysed);
        }
        let Some(memo) = &self.memo else {
            return Arc::new(analyze(sql));
        };
        if let Some(hit) = memo.get(sql) {
            return hit;
        }
        // Two workers missing on one text both parse it; the later insert wins. Not
        // worth coalescing: parsing is cheap next to a round trip upstream.
        let analysis = Arc::new(analyze(sql));
        memo.insert(Box::from(sql), Arc::clone(&analysis));
        analysis
    }

    /// Memoised texts right now (approximate until moka's pending work has run).
    pub fn memo_entry_count(&self) -> u64 {
        self.memo.as_ref().map_or(0, Cache::entry_count)
    }

    /// Memo weight right now (≥ the approximate bytes held).
    pub fn memo_weighted_size(&self) -> u64 {
        self.memo.as_ref().map_or(0, Cache::weighted_size)
    }

    /// Runs moka's pending evictions now (tests, metrics snapshots).
    pub fn run_pending_tasks(&self) {
        if let Some(memo) = &self.memo {
            memo.run_pending_tasks();
        }
    }
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("limits", &self.limits)
            .field("memo_entries", &self.memo_entry_count())
            .finish_non_exhaustive()
    }
}

// Keeps the estimate honest about what an entry holds inline.
const _: () = assert!(size_of::<Box<str>>() + size_of::<Arc<Analysis>>() <= ENTRY_OVERHEAD_BYTES);

#[cfg(test)]
mod tests {
    use super::super::Kind;
    use super::*;

    fn limits(max_parse_bytes: usize, memo_entries: u64, memo_bytes: u64) -> ClassifierLimits {
        ClassifierLimits {
            max_parse_bytes,
            memo_entries,
            memo_bytes,
        }
    }

    #[test]
    fn oversized_text_is_not_parsed() {
        let c = Classifier::new(limits(16, 100, 1 << 20));
        // Unparsable garbage too: the size check comes first.
        let a = c.classify("SELECT * FROM a_long_table_name");
        assert!(a.unanalysed && a.statements.is_empty());
        let b = c.classify("SELECT some other long text");
        assert!(Arc::ptr_eq(&a, &b), "one shared unanalysed analysis");
        c.run_pending_tasks();
        assert_eq!(c.memo_entry_count(), 0);
        assert_eq!(
            c.classify("SELECT 1").single().map(|s| &s.kind),
            Some(&Kind::Select)
        );
    }

    #[test]
    fn memo_returns_the_same_analysis() {
        let c = Classifier::new(limits(1 << 20, 100, 1 << 20));
        let first = c.classify("SELECT * FROM t WHERE id = $1");
        let second = c.classify("SELECT * FROM t WHERE id = $1");
        assert!(Arc::ptr_eq(&first, &second));
        let other = c.classify("SELECT * FROM t WHERE id = $2");
        assert!(!Arc::ptr_eq(&first, &other));
        // Parse errors are memoised as well.
        assert!(Arc::ptr_eq(&c.classify("SELEC"), &c.classify("SELEC")));
        // A disabled memo still classifies.
        let off = Classifier::new(limits(1 << 20, 0, 0));
        assert!(off.classify("SELECT 1").is_cacheable_shape());
    }

    #[test]
    fn memo_is_bounded_in_entries_and_bytes() {
        let bound = 20;
        let c = Classifier::new(limits(1 << 20, bound, 1 << 20));
        for i in 0..500 {
            c.classify(&format!("SELECT {i} FROM t"));
        }
        c.run_pending_tasks();
        assert!(c.memo_entry_count() > 0);
        assert!(
            c.memo_entry_count() <= bound,
            "{} entries",
            c.memo_entry_count()
        );
        assert!(c.memo_weighted_size() <= 1 << 20);

        // Byte-bound: big texts evict to stay under memo_bytes, whatever the entry bound.
        let bytes = 8 * 1024;
        let c = Classifier::new(limits(1 << 20, 1000, bytes));
        for i in 0..100 {
            c.classify(&format!("SELECT {i} AS {}", "x".repeat(1000)));
        }
        c.run_pending_tasks();
        assert!(
            c.memo_weighted_size() <= bytes,
            "{} bytes",
            c.memo_weighted_size()
        );
        assert!(c.memo_entry_count() <= 8);
    }

    #[test]
    fn classifier_is_shareable() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<Classifier>();
        shareable::<Arc<Analysis>>();
    }
}
