//! The part of a session that decides whose results it may share: the cache-key prefix
//! (database, role, startup parameters, result-affecting settings) and the reasons it
//! must not use the cache at all.
//!
//! Settings PostgreSQL reports (TimeZone, DateStyle, IntervalStyle, client_encoding,
//! standard_conforming_strings) are taken from ParameterStatus, which is exact. The
//! others (search_path, extra_float_digits, bytea_output, and any other setting the
//! session changed) are tracked from the SET/RESET statements spillway relays; where
//! that cannot be exact, the session stops using the cache instead of guessing:
//! - SET ROLE / SET SESSION AUTHORIZATION (SPEC §5), or `set_config()`: for good
//!   (DISCARD ALL restores the session's defaults and lifts it);
//! - a SET inside a transaction block or a multi-statement string: a SET LOCAL until
//!   the transaction ends, a plain SET for good (it survives COMMIT but not ROLLBACK);
//! - a request containing a SET that failed: for good.
//!
//! A SET alone in its request but sent behind requests still unanswered upstream (a
//! driver pipelining) is applied at its own ReadyForQuery: status idle means it ran in
//! autocommit ([`KeyContext::settle`]).
//!
//! Invariant: [`KeyContext::prefix`] and its hash state are rebuilt by every change of
//! what it is made of, so the hit path reads them as fields, and hashes only its
//! request's own bytes, without building the key or allocating. Each rebuild takes a
//! generation no other prefix in the process has had, and a statement's memo of the
//! hash state after the prefix and the statement ([`StmtHash`]) is used only under the
//! generation it was computed in.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use spillway_policies::cache::{CachedResult, KeyParts, KeyStream, ResultCache};

use crate::read::classify::SessionCommand;

/// The most parts a request adds to its key ([`KeyContext::get`]).
pub const MAX_PARTS: usize = 6;

/// ParameterStatus names that are part of the key.
const REPORTED: [&str; 5] = [
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "client_encoding",
    "standard_conforming_strings",
];

/// Prefix generations handed out so far (see the module's invariant).
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// A statement's memo for [`KeyContext::get_memo`]: the key's hash state after a
/// prefix, the request kind and the statement's own parts, with the prefix's
/// generation. A std mutex held only to copy the state in or out.
#[derive(Default)]
pub struct StmtHash(Mutex<Option<(u64, KeyStream)>>);

impl StmtHash {
    fn get(&self, generation: u64) -> Option<KeyStream> {
        let memo = self.0.lock().ok()?;
        memo.as_ref()
            .filter(|(g, _)| *g == generation)
            .map(|(_, h)| h.clone())
    }

    fn set(&self, generation: u64, hash: &KeyStream) {
        if let Ok(mut memo) = self.0.lock() {
            *memo = Some((generation, hash.clone()));
        }
    }
}

impl std::fmt::Debug for StmtHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StmtHash")
    }
}

pub struct KeyContext {
    /// Database, user and startup parameters: fixed for the session.
    base: Vec<u8>,
    /// The [`REPORTED`] settings, as PostgreSQL last reported them.
    reported: [String; REPORTED.len()],
    /// Settings changed by the session's own SET statements (lowercase names).
    set: BTreeMap<String, String>,
    /// The key prefix for the current settings. Read-only outside this file.
    pub prefix: Vec<u8>,
    /// Where a request's key is built (the prefix, then the request), reused: only
    /// a miss builds its key.
    pub scratch: Vec<u8>,
    /// The cache's hash state with nothing written, and with [`KeyContext::prefix`].
    seed: KeyStream,
    prefix_hash: KeyStream,
    /// Unique to this prefix in the process (see the invariant).
    generation: u64,
    /// Set for good: role change, set_config, or a SET spillway could not follow.
    pub bypass: Option<&'static str>,
    /// SET LOCAL in the current transaction.
    pub local_override: bool,
    /// Default isolation for new transactions is above READ COMMITTED.
    pub default_snapshot_isolation: bool,
    /// A request containing SET/RESET is outstanding.
    in_flight: bool,
    /// One of them was applied as certain (autocommit, alone).
    certain: bool,
    /// Session commands forwarded behind outstanding requests, in order: whether they
    /// ran in autocommit is known only at their own ReadyForQuery.
    waiting: VecDeque<Waiting>,
}

/// A session command waiting for its request's ReadyForQuery.
struct Waiting {
    command: SessionCommand,
    /// Tracker index of the ReadyForQuery that ends its request.
    ready: u64,
    /// Another statement joined its request, or a request failed: not certain.
    spoiled: bool,
}

fn put(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl KeyContext {
    /// `reported`: the ParameterStatus values PostgreSQL sent during startup; `seed`:
    /// the cache's key hash state ([`ResultCache::stream`]).
    pub fn new(
        database: &str,
        user: &str,
        startup: &[(String, String)],
        reported: &BTreeMap<String, String>,
        seed: KeyStream,
    ) -> Self {
        let mut base = Vec::with_capacity(128);
        put(&mut base, database);
        put(&mut base, user);
        let mut params: Vec<&(String, String)> = startup
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "user" | "database" | "application_name"))
            .collect();
        params.sort();
        for (k, v) in params {
            put(&mut base, k);
            put(&mut base, v);
        }
        let mut key = Self {
            base,
            reported: REPORTED.map(|name| reported.get(name).cloned().unwrap_or_default()),
            set: BTreeMap::new(),
            prefix: Vec::new(),
            scratch: Vec::new(),
            prefix_hash: seed.clone(),
            generation: 0,
            seed,
            bypass: None,
            local_override: false,
            default_snapshot_isolation: false,
            in_flight: false,
            certain: false,
            waiting: VecDeque::new(),
        };
        key.rebuild();
        key
    }

    /// PostgreSQL reported `name = value` (ParameterStatus).
    pub fn report(&mut self, name: &str, value: &str) {
        if let Some(i) = REPORTED.iter().position(|r| *r == name)
            && self.reported[i] != value
        {
            value.clone_into(&mut self.reported[i]);
            self.rebuild();
        }
    }

    fn rebuild(&mut self) {
        self.prefix.clear();
        self.prefix.extend_from_slice(&self.base);
        for value in &self.reported {
            put(&mut self.prefix, value);
        }
        for (k, v) in &self.set {
            put(&mut self.prefix, k);
            put(&mut self.prefix, v);
        }
        self.prefix_hash = self.seed.clone();
        self.prefix_hash.write(&self.prefix);
        self.generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
    }

    /// The entry under the key [`KeyContext::key`] would build of `kind` and `parts`
    /// (at most [`MAX_PARTS`]), looked up without building it.
    pub fn get(
        &self,
        cache: &ResultCache,
        kind: u8,
        parts: &[&[u8]],
        now: Instant,
    ) -> Option<Arc<CachedResult>> {
        let kind = [kind];
        let mut all: [&[u8]; MAX_PARTS + 2] = [&[]; MAX_PARTS + 2];
        all[0] = &self.prefix;
        all[1] = &kind;
        let n = parts.len().min(MAX_PARTS);
        all[2..2 + n].copy_from_slice(&parts[..n]);
        let mut hash = self.prefix_hash.clone();
        for p in &all[1..2 + n] {
            hash.write(p);
        }
        cache.get_parts(&KeyParts::new(hash.finish(), &all[..2 + n]), now)
    }

    /// As [`KeyContext::get`] with `parts` = `fixed` then `rest`, where `fixed` is the
    /// same for every request of one statement: the hash state after the prefix, `kind`
    /// and `fixed` is taken from `memo` when it was computed under this prefix, and
    /// kept there otherwise, so a hit hashes only `rest`.
    pub fn get_memo(
        &self,
        cache: &ResultCache,
        memo: &StmtHash,
        kind: u8,
        fixed: &[&[u8]],
        rest: &[&[u8]],
        now: Instant,
    ) -> Option<Arc<CachedResult>> {
        let kind = [kind];
        let mut all: [&[u8]; MAX_PARTS + 2] = [&[]; MAX_PARTS + 2];
        all[0] = &self.prefix;
        all[1] = &kind;
        let nf = fixed.len().min(MAX_PARTS);
        let nr = rest.len().min(MAX_PARTS - nf);
        all[2..2 + nf].copy_from_slice(&fixed[..nf]);
        all[2 + nf..2 + nf + nr].copy_from_slice(&rest[..nr]);
        let mut hash = match memo.get(self.generation) {
            Some(h) => h,
            None => {
                let mut h = self.prefix_hash.clone();
                for p in &all[1..2 + nf] {
                    h.write(p);
                }
                memo.set(self.generation, &h);
                h
            }
        };
        for p in &all[2 + nf..2 + nf + nr] {
            hash.write(p);
        }
        cache.get_parts(&KeyParts::new(hash.finish(), &all[..2 + nf + nr]), now)
    }

    /// The key of a request: the prefix, `kind`, then `parts` (built in
    /// [`KeyContext::scratch`]).
    pub fn key(&mut self, kind: u8, parts: &[&[u8]]) -> &[u8] {
        self.scratch.clear();
        self.scratch.extend_from_slice(&self.prefix);
        self.scratch.push(kind);
        for p in parts {
            self.scratch.extend_from_slice(p);
        }
        &self.scratch
    }

    /// Whether results may be shared at all right now (transaction rules aside).
    pub fn usable(&self) -> bool {
        self.bypass.is_none() && !self.local_override
    }

    /// Applies a session command being forwarded. `certain`: the command runs alone,
    /// outside a transaction block, so it takes effect exactly when acknowledged.
    pub fn apply(&mut self, cmd: &SessionCommand, certain: bool) {
        match cmd {
            SessionCommand::Set { name, value, local } => {
                if name == "default_transaction_isolation" || name == "transaction_isolation" {
                    let snapshot = snapshot_isolation(value);
                    if *local || name == "transaction_isolation" {
                        // Affects only the current transaction.
                        self.local_override |= snapshot;
                        return;
                    }
                    if !certain {
                        self.bypass = Some("isolation changed inside a transaction");
                        return;
                    }
                    self.default_snapshot_isolation = snapshot;
                    return;
                }
                if *local {
                    self.local_override = true;
                } else if !certain {
                    self.bypass = Some("setting changed inside a transaction");
                } else if value.eq_ignore_ascii_case("default") {
                    self.set.remove(name);
                    self.rebuild();
                } else {
                    self.set.insert(name.clone(), value.clone());
                    self.rebuild();
                }
            }
            SessionCommand::Reset { name } => {
                if !certain {
                    self.bypass = Some("setting changed inside a transaction");
                } else {
                    self.set.remove(name);
                    self.rebuild();
                }
            }
            SessionCommand::ResetAll => {
                if !certain {
                    self.bypass = Some("setting changed inside a transaction");
                } else {
                    self.set.clear();
                    self.default_snapshot_isolation = false;
                    self.rebuild();
                }
            }
            SessionCommand::Role => self.bypass = Some("role changed"),
            SessionCommand::Discard(crate::read::classify::DiscardTarget::All) if certain => {
                // DISCARD ALL cannot run in a transaction block; it restores the role
                // and every setting to the session's defaults.
                self.set.clear();
                self.default_snapshot_isolation = false;
                self.bypass = None;
                self.rebuild();
            }
            _ => {}
        }
    }

    /// `set_config()` or a failed SET: settings are no longer known.
    pub fn lose_track(&mut self, why: &'static str) {
        self.bypass = Some(why);
    }

    /// The transaction ended: SET LOCAL values are gone.
    pub fn transaction_ended(&mut self) {
        self.local_override = false;
    }

    /// A session command goes upstream in a request. `certain`: it runs alone in
    /// autocommit (applied now as exact); `behind`: not certain only because requests
    /// are still outstanding, so its own ReadyForQuery (id `behind`) decides.
    pub fn forwarded(&mut self, cmd: &SessionCommand, certain: bool, behind: Option<u64>) {
        self.in_flight = true;
        self.certain |= certain;
        match behind {
            Some(ready) => self.waiting.push_back(Waiting {
                command: cmd.clone(),
                ready,
                spoiled: false,
            }),
            None => self.apply(cmd, certain),
        }
    }

    /// Another statement joins the request whose ReadyForQuery has id `open`: its
    /// waiting commands can no longer be taken as autocommit.
    pub fn shared_request(&mut self, open: u64) {
        for w in self.waiting.iter_mut().filter(|w| w.ready == open) {
            w.spoiled = true;
        }
    }

    /// A request failed: if it changed settings, they are not known any more.
    pub fn request_failed(&mut self) {
        if self.in_flight {
            self.lose_track("a request that changed settings failed");
            for w in &mut self.waiting {
                w.spoiled = true;
            }
        }
    }

    /// Commands whose requests ended with the request `done` (ids grow in send
    /// order), with `status` (`None`: unknown).
    pub fn settle(&mut self, done: u64, status: Option<u8>) {
        while self.waiting.front().is_some_and(|w| w.ready <= done) {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            // Alone in a request that left the session idle, without error: it ran
            // in autocommit (a session command cannot end a transaction block). Its
            // own request's ReadyForQuery only: a later one says nothing about it.
            let certain = !w.spoiled && w.ready == done && status == Some(b'I');
            self.apply(&w.command, certain);
        }
    }

    /// A ReadyForQuery reported a transaction block: a setting applied as certain
    /// ran in it after all (a BEGIN pipelined in the same cycle) and may be rolled back.
    pub fn in_transaction_after_all(&mut self) {
        if self.certain {
            self.lose_track("a setting changed in what became a transaction");
        }
    }

    /// Nothing is outstanding upstream: no settings in flight any more.
    pub fn quiet(&mut self) {
        self.in_flight = false;
        self.certain = false;
    }
}

fn snapshot_isolation(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.contains("repeatable") || v.contains("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> KeyStream {
        ResultCache::new(1 << 20, 1 << 16).stream()
    }

    fn ctx() -> KeyContext {
        KeyContext::new(
            "app",
            "alice",
            &[("user".into(), "alice".into())],
            &BTreeMap::new(),
            seed(),
        )
    }

    #[test]
    fn a_key_is_found_without_being_built() {
        use spillway_policies::cache::{Deps, Lookup};
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let mut c = KeyContext::new("app", "alice", &[], &BTreeMap::new(), cache.stream());
        c.report("TimeZone", "UTC");
        let parts: [&[u8]; 3] = [b"SELECT $1", b"\0\0\0\x17", b"params"];
        let built = c.key(b'X', &parts).to_vec();
        let Lookup::Lead(ticket) = cache.lookup(&built) else {
            panic!("a new key leads its fill");
        };
        assert!(ticket.complete(CachedResult {
            row_description: None,
            statement: None,
            body: bytes::Bytes::from_static(b"rows"),
            deps: Deps::default(),
            ttl: std::time::Duration::from_secs(60),
        }));
        let hit = c
            .get(&cache, b'X', &parts, Instant::now())
            .expect("found by its parts");
        assert_eq!(&hit.body[..], b"rows");
        // Other bytes, or the same bytes cut elsewhere but another kind, miss.
        assert!(c.get(&cache, b'Q', &parts, Instant::now()).is_none());
        assert!(
            c.get(&cache, b'X', &[b"SELECT $1", b"\0\0\0\x17"], Instant::now())
                .is_none()
        );
        let cut: [&[u8]; 2] = [b"SELECT $1\0\0", b"\0\x17params"];
        assert!(
            c.get(&cache, b'X', &cut, Instant::now()).is_some(),
            "only the bytes count"
        );
        // A setting the key is made of changes it.
        c.report("TimeZone", "Europe/Paris");
        assert!(c.get(&cache, b'X', &parts, Instant::now()).is_none());
    }

    #[test]
    fn a_statement_memo_is_used_only_under_its_prefix() {
        use spillway_policies::cache::{Deps, Lookup};
        let cache = ResultCache::new(1 << 20, 1 << 16);
        let mut c = KeyContext::new("app", "alice", &[], &BTreeMap::new(), cache.stream());
        c.report("TimeZone", "UTC");
        let fixed: [&[u8]; 2] = [b"SELECT $1", b"\0\0\0\x17"];
        let store = |c: &mut KeyContext, rest: &[u8], body: &'static [u8]| {
            let built = c.key(b'X', &[fixed[0], fixed[1], rest]).to_vec();
            let Lookup::Lead(ticket) = cache.lookup(&built) else {
                panic!("a new key leads its fill");
            };
            assert!(ticket.complete(CachedResult {
                row_description: None,
                statement: None,
                body: bytes::Bytes::from_static(body),
                deps: Deps::default(),
                ttl: std::time::Duration::from_secs(60),
            }));
        };
        store(&mut c, b"one", b"utc");
        let memo = StmtHash::default();
        let hit = |c: &KeyContext, rest: &[u8]| {
            c.get_memo(&cache, &memo, b'X', &fixed, &[rest], Instant::now())
                .map(|r| r.body.clone())
        };
        assert_eq!(hit(&c, b"one").as_deref(), Some(&b"utc"[..]));
        // The memo now holds the statement's state: other parameters still hash apart.
        assert_eq!(hit(&c, b"two"), None);
        assert_eq!(hit(&c, b"one").as_deref(), Some(&b"utc"[..]));
        // Another prefix: the memo of the old one must not be used.
        c.report("TimeZone", "Europe/Paris");
        assert_eq!(hit(&c, b"one"), None);
        store(&mut c, b"one", b"paris");
        assert_eq!(hit(&c, b"one").as_deref(), Some(&b"paris"[..]));
        // Another session with the first prefix computes its own state.
        let mut d = KeyContext::new("app", "alice", &[], &BTreeMap::new(), cache.stream());
        d.report("TimeZone", "UTC");
        assert_eq!(hit(&d, b"one").as_deref(), Some(&b"utc"[..]));
        assert_eq!(hit(&c, b"one").as_deref(), Some(&b"paris"[..]));
    }

    fn set(name: &str, value: &str, local: bool) -> SessionCommand {
        SessionCommand::Set {
            name: name.into(),
            value: value.into(),
            local,
        }
    }

    #[test]
    fn reported_and_set_values_change_the_prefix() {
        let mut c = ctx();
        c.report("TimeZone", "UTC");
        let a = c.prefix.clone();
        c.report("TimeZone", "Europe/Paris");
        let b = c.prefix.clone();
        assert_ne!(a, b);
        c.report("application_name", "x");
        assert_eq!(c.prefix, b, "not part of the key");
        c.apply(&set("search_path", "a", false), true);
        let d = c.prefix.clone();
        assert_ne!(b, d);
        c.apply(
            &SessionCommand::Reset {
                name: "search_path".into(),
            },
            true,
        );
        assert_eq!(c.prefix, b);
        assert_eq!(c.key(b'Q', &[b"SELECT 1"]), [&b[..], b"QSELECT 1"].concat());
    }

    #[test]
    fn roles_and_users_and_databases_differ() {
        let p = BTreeMap::new();
        let a = KeyContext::new("app", "alice", &[], &p, seed());
        let b = KeyContext::new("app", "bob", &[], &p, seed());
        let c = KeyContext::new("other", "alice", &[], &p, seed());
        assert_ne!(a.prefix, b.prefix);
        assert_ne!(a.prefix, c.prefix);
    }

    #[test]
    fn role_change_bypasses_until_discard_all() {
        let mut c = ctx();
        c.apply(&SessionCommand::Role, true);
        assert!(!c.usable());
        c.apply(
            &SessionCommand::Discard(crate::read::classify::DiscardTarget::All),
            true,
        );
        assert!(c.usable());
    }

    #[test]
    fn set_in_transaction_is_not_guessed() {
        let mut c = ctx();
        c.apply(&set("search_path", "a", true), false);
        assert!(!c.usable());
        c.transaction_ended();
        assert!(c.usable());
        c.apply(&set("search_path", "a", false), false);
        c.transaction_ended();
        assert!(!c.usable());
    }

    #[test]
    fn a_command_behind_others_waits_for_its_own_ready() {
        let mut c = ctx();
        c.forwarded(&set("search_path", "a", false), false, Some(3));
        assert_eq!(c.prefix, ctx().prefix, "not applied yet");
        c.settle(2, Some(b'I'));
        assert_eq!(c.prefix, ctx().prefix, "an earlier request's ready");
        c.settle(3, Some(b'I'));
        assert!(c.usable());
        assert_ne!(c.prefix, ctx().prefix, "applied as certain");
        // Spoiled by a statement joining its request: not certain, bypass for good.
        let mut c = ctx();
        c.forwarded(&set("search_path", "a", false), false, Some(1));
        c.shared_request(1);
        c.settle(1, Some(b'I'));
        assert!(!c.usable());
    }

    #[test]
    fn default_isolation_is_followed() {
        let mut c = ctx();
        c.apply(
            &set("default_transaction_isolation", "'repeatable read'", false),
            true,
        );
        assert!(c.default_snapshot_isolation);
        assert!(c.usable());
    }
}
