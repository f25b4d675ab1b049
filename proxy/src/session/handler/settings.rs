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
//! autocommit (the handler's `Deferred`).

use std::collections::BTreeMap;

use crate::read::classify::SessionCommand;

/// ParameterStatus names that are part of the key.
const REPORTED: [&str; 5] = [
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "client_encoding",
    "standard_conforming_strings",
];

pub struct KeyContext {
    /// Database, user and startup parameters: fixed for the session.
    base: Vec<u8>,
    /// Settings changed by the session's own SET statements (lowercase names).
    set: BTreeMap<String, String>,
    prefix: Vec<u8>,
    dirty: bool,
    /// Set for good: role change, set_config, or a SET spillway could not follow.
    pub bypass: Option<&'static str>,
    /// SET LOCAL in the current transaction.
    pub local_override: bool,
    /// Default isolation for new transactions is above READ COMMITTED.
    pub default_snapshot_isolation: bool,
}

fn put(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&u32::try_from(s.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

impl KeyContext {
    pub fn new(database: &str, user: &str, startup: &[(String, String)]) -> Self {
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
        Self {
            base,
            set: BTreeMap::new(),
            prefix: Vec::new(),
            dirty: true,
            bypass: None,
            local_override: false,
            default_snapshot_isolation: false,
        }
    }

    /// A reported parameter may have changed.
    pub fn parameters_changed(&mut self) {
        self.dirty = true;
    }

    /// The key prefix for the current settings.
    pub fn prefix(&mut self, reported: &BTreeMap<String, String>) -> &[u8] {
        if self.dirty {
            self.prefix.clear();
            self.prefix.extend_from_slice(&self.base);
            for name in REPORTED {
                put(
                    &mut self.prefix,
                    reported.get(name).map_or("", String::as_str),
                );
            }
            for (k, v) in &self.set {
                put(&mut self.prefix, k);
                put(&mut self.prefix, v);
            }
            self.dirty = false;
        }
        &self.prefix
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
                    self.dirty = true;
                } else {
                    self.set.insert(name.clone(), value.clone());
                    self.dirty = true;
                }
            }
            SessionCommand::Reset { name } => {
                if !certain {
                    self.bypass = Some("setting changed inside a transaction");
                } else {
                    self.set.remove(name);
                    self.dirty = true;
                }
            }
            SessionCommand::ResetAll => {
                if !certain {
                    self.bypass = Some("setting changed inside a transaction");
                } else {
                    self.set.clear();
                    self.default_snapshot_isolation = false;
                    self.dirty = true;
                }
            }
            SessionCommand::Role => self.bypass = Some("role changed"),
            SessionCommand::Discard(crate::read::classify::DiscardTarget::All) if certain => {
                // DISCARD ALL cannot run in a transaction block; it restores the role
                // and every setting to the session's defaults.
                self.set.clear();
                self.default_snapshot_isolation = false;
                self.bypass = None;
                self.dirty = true;
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
}

fn snapshot_isolation(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    v.contains("repeatable") || v.contains("serializable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> KeyContext {
        KeyContext::new("app", "alice", &[("user".into(), "alice".into())])
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
        let mut params = BTreeMap::new();
        params.insert("TimeZone".to_owned(), "UTC".to_owned());
        let a = c.prefix(&params).to_vec();
        params.insert("TimeZone".to_owned(), "Europe/Paris".to_owned());
        c.parameters_changed();
        let b = c.prefix(&params).to_vec();
        assert_ne!(a, b);
        c.apply(&set("search_path", "a", false), true);
        let d = c.prefix(&params).to_vec();
        assert_ne!(b, d);
        c.apply(
            &SessionCommand::Reset {
                name: "search_path".into(),
            },
            true,
        );
        assert_eq!(c.prefix(&params), &b[..]);
    }

    #[test]
    fn roles_and_users_and_databases_differ() {
        let p = BTreeMap::new();
        let mut a = KeyContext::new("app", "alice", &[]);
        let mut b = KeyContext::new("app", "bob", &[]);
        let mut c = KeyContext::new("other", "alice", &[]);
        assert_ne!(a.prefix(&p), b.prefix(&p));
        assert_ne!(a.prefix(&p).to_vec(), c.prefix(&p).to_vec());
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
