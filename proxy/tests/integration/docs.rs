//! The operator documentation cannot drift from the code: `docs/configuration.md` lists
//! exactly the keys the config structs have, each default it shows is the one spillway
//! uses, its reload column is what `config::reload::applies` says, and every TOML
//! example in the docs loads; `docs/operations.md` lists exactly
//! the metric names of `spillway::metrics`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use spillway::config::Config;
use spillway::config::reload::{Applies, leaves_of};
use spillway_policies::TableConfig;

/// The table name that stands for any in `tables."s.t".key`.
const ANY_TABLE: &str = "s.t";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Rows of every Markdown table whose header starts with `first_header`, as cells with
/// `\|` unescaped.
fn table_rows(markdown: &str, first_header: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut inside = false;
    for line in markdown.lines() {
        let line = line.trim();
        if !line.starts_with('|') {
            inside = false;
            continue;
        }
        let cells: Vec<String> = line
            .replace("\\|", "\u{0}")
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().replace('\u{0}', "|"))
            .collect();
        if cells.first().map(String::as_str) == Some(first_header) {
            inside = true;
            continue;
        }
        if inside && !cells.iter().all(|c| c.chars().all(|ch| ch == '-')) {
            rows.push(cells);
        }
    }
    rows
}

fn unquote(cell: &str) -> Option<&str> {
    cell.strip_prefix('`')?.strip_suffix('`')
}

/// A config with every optional key set, so that serializing it shows every key.
fn full_config() -> Config {
    let mut c = Config::default();
    c.server.tls_cert = Some("cert.pem".into());
    c.server.tls_key = Some("key.pem".into());
    c.pool.reset_query = Some("DISCARD ALL".into());
    c.pool
        .databases
        .insert("db".into(), spillway::config::pool::PoolOverride::default());
    c.pool.users.insert(
        "role".into(),
        spillway::config::pool::PoolOverride::default(),
    );
    c.auth.file = Some("users.txt".into());
    c.auth.user = Some("auth".into());
    c.tables.insert(
        ANY_TABLE.to_owned(),
        TableConfig {
            ttl: Some(std::time::Duration::from_secs(1)),
            ..TableConfig::default()
        },
    );
    c
}

/// `key = value` as TOML in its section: `server.listen` → `[server]`,
/// `tables."s.t".ttl` → `[tables."s.t"]`.
fn toml_for(key: &str, value: &str) -> String {
    let (section, leaf) = key.rsplit_once('.').expect("dotted key");
    format!("[{section}]\n{leaf} = {value}\n")
}

#[test]
fn configuration_doc_lists_every_key_with_its_default() {
    let doc = read("docs/configuration.md");
    let rows = table_rows(&doc, "key");
    assert!(rows.len() > 30, "too few rows parsed: {}", rows.len());
    let mut documented = BTreeMap::new();
    for row in &rows {
        let [key, ty, default, reload, what] = row.as_slice() else {
            panic!("row {row:?} does not have five cells");
        };
        let key = unquote(key).unwrap_or_else(|| panic!("key cell {key:?}"));
        assert!(!ty.is_empty() && !what.is_empty(), "{key}: empty cell");
        let expected = match spillway::config::reload::applies(key) {
            Applies::Reload => "reload",
            Applies::Restart => "restart",
        };
        assert_eq!(
            reload, expected,
            "{key}: the reload column disagrees with spillway::config::reload::applies"
        );
        assert!(
            documented.insert(key.to_owned(), default.clone()).is_none(),
            "{key} listed twice"
        );
    }

    let full = leaves_of(&full_config());
    let defaults = {
        let mut c = Config::default();
        c.tables
            .insert(ANY_TABLE.to_owned(), TableConfig::default());
        leaves_of(&c)
    };
    let missing: Vec<&String> = full
        .keys()
        .filter(|k| !documented.contains_key(*k))
        .collect();
    let unknown: Vec<&String> = documented
        .keys()
        .filter(|k| !full.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
    assert!(
        unknown.is_empty(),
        "documented but not config keys: {unknown:?}"
    );

    for (key, default) in &documented {
        match unquote(default) {
            Some(literal) => {
                let toml = toml_for(key, literal);
                let loaded = Config::from_toml_str(&toml)
                    .unwrap_or_else(|e| panic!("{key}: documented default does not load: {e}"));
                let shown = leaves_of(&loaded).remove(key);
                assert_eq!(
                    shown.as_ref(),
                    defaults.get(key),
                    "{key}: docs say {literal}, spillway's default differs"
                );
            }
            None => {
                assert!(
                    default.starts_with("unset"),
                    "{key}: default {default:?} is neither a TOML literal nor unset"
                );
                assert!(
                    defaults.get(key).is_none_or(Value::is_null),
                    "{key}: documented unset, default is {:?}",
                    defaults.get(key)
                );
            }
        }
    }
}

/// Every ```toml block of the operator docs is a loadable config.
#[test]
fn toml_examples_in_the_docs_load() {
    let mut blocks = 0;
    for file in ["README.md", "docs/configuration.md", "docs/operations.md"] {
        let text = read(file);
        let mut parts = text.split("```toml\n").skip(1);
        for part in parts.by_ref() {
            let block = part.split("```").next().unwrap_or_default();
            Config::from_toml_str(block)
                .unwrap_or_else(|e| panic!("{file}: example does not load: {e}\n{block}"));
            blocks += 1;
        }
    }
    assert!(blocks >= 3, "{blocks} examples");
}

#[test]
fn operations_doc_lists_every_metric() {
    let doc = read("docs/operations.md");
    let listed: Vec<String> = table_rows(&doc, "metric")
        .iter()
        .map(|r| {
            unquote(&r[0])
                .unwrap_or_else(|| panic!("metric cell {:?}", r[0]))
                .to_owned()
        })
        .collect();
    for name in spillway::metrics::ALL {
        assert!(
            listed.iter().any(|l| l == name),
            "{name} not in docs/operations.md"
        );
    }
    for name in &listed {
        assert!(
            spillway::metrics::ALL.contains(&name.as_str()),
            "docs/operations.md lists {name}, which spillway does not export"
        );
    }
}
