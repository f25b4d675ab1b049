//! Which config keys a hot reload applies and which take effect at restart: the single
//! source of truth for the reload column of `docs/configuration.md` (a test compares
//! them) and for what `crate::ops::reload` does.
//!
//! Invariant: [`effective`] takes from the new config exactly the keys
//! [`applies`] calls [`Applies::Reload`], and everything else from the old one (a unit
//! test checks this for every key).

use serde_json::Value;

use super::Config;

/// When a changed key takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applies {
    /// At the next reload (SIGHUP, the console's RELOAD).
    Reload,
    /// Only when spillway starts again; a reload logs that it changed and keeps the
    /// running value.
    Restart,
}

/// Keys a reload applies, besides every `tables."schema.name".*` key.
///
/// Everything else is fixed at start: listeners and sockets, the backend, TLS files,
/// the journal, the metrics listener, the admin console, the log format, and the
/// cache's sizes (its map is built with its capacity), its on/off switch, its
/// invalidation mode and the statement memo.
pub const RELOADABLE: &[&str] = &[
    "cache.ttl",
    "cache.invalidate_on_unknown",
    "flush.interval",
    "flush.batch_size",
    "flush.max_dirty_keys",
    "log.level",
];

/// When a change of `key` (dotted, tables as `tables."s.t".key`) takes effect.
pub fn applies(key: &str) -> Applies {
    if key.starts_with("tables.") || RELOADABLE.contains(&key) {
        Applies::Reload
    } else {
        Applies::Restart
    }
}

/// The config a reload puts in force: the reloadable keys of `new`, the rest of `old`.
pub fn effective(old: &Config, new: Config) -> Config {
    let mut e = old.clone();
    e.cache.ttl = new.cache.ttl;
    e.cache.invalidate_on_unknown = new.cache.invalidate_on_unknown;
    e.flush = new.flush;
    e.log.level = new.log.level;
    e.tables = new.tables;
    e
}

/// Every leaf key whose value differs between `old` and `new`, dotted, in order
/// (a table added or removed counts as each of its keys).
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (leaves_of(old), leaves_of(new));
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Leaf keys of a serialized config, dotted; table entries as `tables."s.t".key`.
pub fn leaves_of(config: &Config) -> std::collections::BTreeMap<String, Value> {
    let mut out = std::collections::BTreeMap::new();
    // A Config always serializes (plain data, string map keys); an empty map would
    // only make a reload report no changed keys.
    if let Ok(value) = serde_json::to_value(config) {
        leaves(&value, "", &mut out);
    }
    out
}

fn leaves(value: &Value, prefix: &str, out: &mut std::collections::BTreeMap<String, Value>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if matches!(prefix, "tables" | "pool.databases" | "pool.users") {
                    format!("{prefix}.\"{k}\"")
                } else if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                leaves(v, &key, out);
            }
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config in which every key differs from the default.
    fn everything_changed() -> Config {
        let toml = r#"
            [server]
            listen = "127.0.0.1:7000"
            max_client_conn = 7
            workers = 3
            pin_workers = false
            tls_cert = "c.pem"
            tls_key = "k.pem"
            max_message_bytes = "2MiB"
            max_parse_bytes = "2KiB"
            startup_timeout = "7s"
            shutdown_timeout = "7s"
            [backend]
            url = "postgres://u@127.0.0.1:7001/d"
            connect_timeout = "7s"
            [cache]
            enabled = false
            max_bytes = "7MiB"
            max_entry_bytes = "1MiB"
            ttl = "7s"
            invalidation = "notify"
            invalidate_on_unknown = false
            memo_entries = 7
            memo_bytes = "7MiB"
            [journal]
            backend = "nats"
            dir = "elsewhere"
            fsync = "interval"
            fsync_interval = "7ms"
            max_bytes = "7MiB"
            [journal.nats]
            servers = ["nats://127.0.0.1:7003"]
            replicas = 1
            stream = "s7"
            ack_timeout = "7s"
            [flush]
            interval = "7ms"
            batch_size = 7
            max_dirty_keys = 7
            [key_index]
            enabled = false
            max_bytes = "7MiB"
            chunk_rows = 7
            [metrics]
            listen = "127.0.0.1:7002"
            [log]
            level = "debug"
            format = "json"
            [admin]
            users = ["ops"]
            password = "secret"
            [replication]
            publication = "p7"
            slot = "s7"
            create = false
            max_retained_wal = "7MiB"
            poll_interval = "7ms"
            [pool]
            mode = "transaction"
            size = 7
            max_db_connections = 7
            queue_timeout = "7s"
            idle_timeout = "7s"
            lifetime = "7s"
            reset_query = "DISCARD ALL"
            max_prepared_statements = 7
            notify_queue = 7
            [pool.databases.d]
            mode = "session"
            size = 7
            [pool.users.u]
            mode = "session"
            size = 7
            [auth]
            file = "users.txt"
            user = "auth"
            query = "SELECT 1"
            [tables."public.t"]
            ttl = "7s"
        "#;
        Config::from_toml_str(toml).expect("loads")
    }

    #[test]
    fn effective_takes_exactly_the_reloadable_keys() {
        let old = Config::default();
        let new = everything_changed();
        let changed = changed_keys(&old, &new);
        let all = leaves_of(&new);
        // Every key except the unset-by-default ones that stay unset is covered.
        for key in all.keys() {
            assert!(
                changed.contains(key),
                "{key} does not differ in the test config"
            );
        }
        let applied = changed_keys(&old, &effective(&old, new));
        for key in &changed {
            assert_eq!(
                applied.contains(key),
                applies(key) == Applies::Reload,
                "{key}: effective() and applies() disagree"
            );
        }
    }

    #[test]
    fn tables_and_listed_keys_reload() {
        assert_eq!(applies("tables.\"public.t\".policy"), Applies::Reload);
        assert_eq!(applies("cache.ttl"), Applies::Reload);
        assert_eq!(applies("cache.max_bytes"), Applies::Restart);
        assert_eq!(applies("server.listen"), Applies::Restart);
    }
}
