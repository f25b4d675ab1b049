//! Loading: defaults ← `spillway.toml` ← `SPILLWAY_*` environment, then validation.
//!
//! Environment keys nest with `__` (`SPILLWAY_SERVER__LISTEN`). Table names contain a
//! dot, which figment would read as nesting, so per-table variables have their own
//! shape, `SPILLWAY_TABLES__<schema>__<table>__<key>`, read by [`TableEnv`].

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};

use super::Config;

pub const ENV_PREFIX: &str = "SPILLWAY_";
pub const DEFAULT_CONFIG_FILE: &str = "spillway.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Syntax, type or unknown-key errors; each names its key and source.
    #[error("{}", format_figment(.0))]
    Parse(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(#[from] spillway_policies::config::ValidationError),
}

fn format_figment(err: &figment::Error) -> String {
    err.clone()
        .into_iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

impl Config {
    /// Loads from `path` (which must exist) or, without one, from `spillway.toml` in
    /// the working directory if present; then the environment; then validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        match path {
            Some(p) => {
                // Figment skips missing files silently; an explicit path must exist.
                std::fs::metadata(p).map_err(|error| ConfigError::Read {
                    path: p.to_owned(),
                    error,
                })?;
                fig = fig.merge(Toml::file_exact(p));
            }
            None => {
                if Path::new(DEFAULT_CONFIG_FILE).exists() {
                    fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE));
                }
            }
        }
        Self::from_figment(fig.merge(env_provider()).merge(TableEnv::from_process()))
    }

    /// Loads from TOML text only (no environment); for tests and the demo.
    pub fn from_toml_str(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(toml)))
    }

    fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let config: Config = fig.extract().map_err(|e| ConfigError::Parse(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }
}

fn env_provider() -> NamedEnv {
    NamedEnv(
        Env::prefixed(ENV_PREFIX)
            // SPILLWAY_CONFIG names the file (clap reads it); tables have their own reader.
            .filter(|k| is_general_key(k.as_str()))
            .split("__"),
    )
}

/// Whether `SPILLWAY_<key>` belongs to the general reader. figment hands the name over
/// as written (upper case), so the comparison ignores case. Not config: `CONFIG` (the
/// file, read by clap), `TABLES__*` (their own reader), and the tooling variables
/// `PG_BIN` (where the throwaway PostgreSQL's binaries are) and `BIN` (which spillway
/// binary the benchmark scripts run).
fn is_general_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    !matches!(k.as_str(), "config" | "pg_bin" | "bin") && !k.starts_with("tables__")
}

/// figment's `Env`, but errors name the variable (`SPILLWAY_SERVER__LISTEN`) rather
/// than figment's dotted upper-case rendering of the key.
struct NamedEnv(Env);

impl Provider for NamedEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named("environment variable").interpolater(|_: &Profile, keys: &[&str]| {
            let upper: Vec<String> = keys.iter().map(|k| k.to_ascii_uppercase()).collect();
            format!("{ENV_PREFIX}{}", upper.join("__"))
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        self.0.data()
    }
}

/// Reads `SPILLWAY_TABLES__<schema>__<table>__<key>=value` into `tables."schema.table".key`.
struct TableEnv {
    vars: Vec<(String, String)>,
}

impl TableEnv {
    fn from_process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }
}

impl Provider for TableEnv {
    fn metadata(&self) -> Metadata {
        Metadata::named(format!("`{ENV_PREFIX}TABLES__*` environment variable(s)"))
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let prefix = format!("{ENV_PREFIX}TABLES__");
        let mut tables = Dict::new();
        for (k, v) in &self.vars {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            let parts: Vec<&str> = rest.split("__").collect();
            let [schema, table, key] = parts[..] else {
                return Err(figment::Error::from(format!(
                    "environment variable {k}: expected {prefix}<schema>__<table>__<key>"
                )));
            };
            let name = format!("{}.{}", schema.to_lowercase(), table.to_lowercase());
            let value: Value = v.parse().unwrap_or_else(|_| Value::from(v.clone()));
            if let Value::Dict(_, entry) = tables
                .entry(name)
                .or_insert_with(|| Value::from(Dict::new()))
            {
                entry.insert(key.to_lowercase(), value);
            }
        }
        let mut root = Dict::new();
        if !tables.is_empty() {
            root.insert("tables".to_owned(), Value::from(tables));
        }
        Ok(Profile::Default.collect(root))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_policies::Policy;

    #[test]
    fn defaults_are_valid() {
        let c = Config::from_toml_str("").expect("defaults load");
        assert_eq!(c.server.listen.port(), 6432);
        assert_eq!(c.cache.max_bytes.as_u64(), 256 * 1024 * 1024);
    }

    #[test]
    fn spec_sketch_parses_except_deferred_policy() {
        let toml = r#"
            [server]
            listen = "127.0.0.1:6432"
            [backend]
            url = "postgres://spillway@127.0.0.1:5432/app"
            [cache]
            max_bytes = "256MiB"
            ttl = "60s"
            [journal]
            dir = "spillway-data"
            fsync = "always"
            [flush]
            interval = "100ms"
            batch_size = 1000
            [metrics]
            listen = "127.0.0.1:9187"
            [tables."public.events"]
            policy = "write-through"
            consistency = "strong"
            cache = true
            ttl = "5m"
        "#;
        let c = Config::from_toml_str(toml).expect("loads");
        let t = &c.tables["public.events"];
        assert_eq!(t.policy, Policy::WriteThrough);
        assert_eq!(t.ttl, Some(std::time::Duration::from_secs(300)));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[server]\nlisten_addr = \"x\"\n").expect_err("unknown");
        let msg = err.to_string();
        assert!(msg.contains("listen_addr"), "{msg}");
        assert!(msg.contains("server"), "{msg}");
    }

    #[test]
    fn wrong_type_names_key() {
        let err = Config::from_toml_str("[flush]\nbatch_size = \"lots\"\n").expect_err("type");
        assert!(err.to_string().contains("flush.batch_size"), "{err}");
    }

    #[test]
    fn printed_backend_url_hides_the_password() {
        let c = Config::from_toml_str("[backend]\nurl = \"postgres://u:secret@db:5433/app\"\n")
            .expect("loads");
        let shown = c.backend.redacted_url();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("u:****@db:5433/app"), "{shown}");
    }

    #[test]
    fn bad_backend_url() {
        let err = Config::from_toml_str("[backend]\nurl = \"mysql://x\"\n").expect_err("scheme");
        assert!(err.to_string().contains("backend.url"), "{err}");
    }

    #[test]
    fn env_errors_name_the_variable() {
        let env = NamedEnv(Env::prefixed("SPILLWAY_TEST_ENV_").split("__"));
        let fig = Figment::new()
            .merge(env)
            .merge(figment::providers::Serialized::default(
                "server.listen",
                "not-an-address",
            ));
        // Serialized wins here; the interpolation itself is what is checked.
        let meta = NamedEnv(Env::prefixed("X")).metadata();
        let shown = meta.interpolate(&Profile::Default, &["server", "listen"]);
        assert_eq!(shown, "SPILLWAY_SERVER__LISTEN");
        assert!(fig.extract::<Config>().is_err());
    }

    #[test]
    fn config_and_tables_are_left_to_their_own_readers() {
        assert!(!is_general_key("CONFIG"));
        assert!(!is_general_key("TABLES__public__t__TTL"));
        assert!(!is_general_key("tables__public__t__ttl"));
        assert!(!is_general_key("PG_BIN"));
        assert!(is_general_key("CACHE__TTL"));
        assert!(is_general_key("CACHEE__TTL"), "typos are still reported");
    }

    #[test]
    fn table_env_nests_under_dotted_name() {
        let env = TableEnv {
            vars: vec![
                (
                    "SPILLWAY_TABLES__public__events__POLICY".into(),
                    "write-through".into(),
                ),
                ("SPILLWAY_TABLES__public__events__TTL".into(), "5m".into()),
                ("UNRELATED".into(), "1".into()),
            ],
        };
        let c: Config = Figment::new().merge(env).extract().expect("extracts");
        assert_eq!(
            c.tables["public.events"].ttl,
            Some(std::time::Duration::from_secs(300))
        );
    }

    #[test]
    fn table_env_with_wrong_shape_is_an_error() {
        let env = TableEnv {
            vars: vec![("SPILLWAY_TABLES__events__POLICY".into(), "x".into())],
        };
        let err = Figment::new()
            .merge(env)
            .extract::<Config>()
            .expect_err("shape");
        assert!(
            err.to_string().contains("SPILLWAY_TABLES__events__POLICY"),
            "{err}"
        );
    }
}
