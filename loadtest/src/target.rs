//! A target (a name and a PostgreSQL URL), connecting to it with an error a person
//! can act on, and reading which dataset of a table group it holds (`lt_meta`).
//!
//! URLs are shown and recorded with any password replaced by `****`.

use std::time::Duration;

use anyhow::{Context as _, anyhow};
use tokio_postgres::Config;

use crate::cli::{Mode, TargetArg};
use crate::db::Session;
use crate::scenario::{Group, Scenario};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The whole connect, startup and authentication included (tokio-postgres' own
/// timeout covers only the TCP connect), so a target that accepts and then says
/// nothing cannot hang the run.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// The URL with its password hidden.
    pub url: String,
    pub config: Config,
    pub metrics: Option<String>,
}

impl Target {
    pub fn new(arg: &TargetArg, metrics: Option<String>) -> Target {
        let mut config = arg.config.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Target {
            name: arg.name.clone(),
            url: redact(&arg.url),
            config,
            metrics,
        }
    }

    /// Connects, or says which target failed, where it points and what to check.
    pub async fn connect(&self, mode: Mode) -> anyhow::Result<Session> {
        match tokio::time::timeout(LOGIN_TIMEOUT, Session::connect(&self.config, mode)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(anyhow!(self.connect_error(&e))),
            Err(_) => Err(anyhow!(
                "target {} ({}): cannot connect: no answer to the login within {}s. \
                 Is it a PostgreSQL server, and is it responsive?",
                self.name,
                self.url,
                LOGIN_TIMEOUT.as_secs()
            )),
        }
    }

    fn connect_error(&self, cause: &crate::wire::Fail) -> String {
        format!(
            "target {} ({}): cannot connect: {cause}. Is it running and reachable?",
            self.name, self.url
        )
    }

    /// The dataset id and scale of `scenario`'s tables on this target.
    pub async fn dataset(&self, s: &mut Session, scenario: Scenario) -> anyhow::Result<Dataset> {
        let group = scenario.group();
        let rows = s
            .text_rows(&format!(
                "SELECT scale, dataset FROM lt_meta WHERE name = '{}'",
                group.name()
            ))
            .await;
        let missing = || {
            anyhow!(
                "target {} ({}): the tables of scenario {} ({}) are not set up. Run\n  \
                 spillway-loadtest setup --target URL --scenario {}\n\
                 with the URL of the PostgreSQL behind it, or add --setup to this run",
                self.name,
                self.url,
                scenario.name(),
                group.tables().join(", "),
                scenario.name()
            )
        };
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) if e.code == "42P01" => return Err(missing()),
            Err(e) => {
                return Err(anyhow!(
                    "target {} ({}): reading lt_meta: {} ({})",
                    self.name,
                    self.url,
                    e.message,
                    e.code
                ));
            }
        };
        let row = rows.first().ok_or_else(missing)?;
        let scale = row
            .first()
            .cloned()
            .flatten()
            .and_then(|s| s.parse().ok())
            .context("lt_meta.scale is not a number")?;
        let id = row
            .get(1)
            .cloned()
            .flatten()
            .context("lt_meta.dataset is empty")?;
        Ok(Dataset { group, id, scale })
    }
}

/// Which copy of a table group a target reaches: targets with the same `id` share the
/// same tables (typically PostgreSQL directly and spillway in front of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    pub group: Group,
    pub id: String,
    pub scale: u32,
}

/// The URL with its password replaced by `****`.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://app:secret@127.0.0.1:5432/app"),
            "postgres://app:****@127.0.0.1:5432/app"
        );
        assert_eq!(
            redact("postgres://app@127.0.0.1:5432/app"),
            "postgres://app@127.0.0.1:5432/app"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_target_that_never_answers_the_login_times_out() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            // Accepts and then says nothing.
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let url = format!("postgres://app@127.0.0.1:{port}/app");
        let arg = TargetArg {
            name: "silent".to_owned(),
            url: url.clone(),
            config: Config::from_str(&url).expect("url"),
        };
        let err = Target::new(&arg, None)
            .connect(Mode::Simple)
            .await
            .err()
            .expect("times out");
        assert!(
            err.to_string()
                .contains("no answer to the login within 10s"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_target_that_is_down_gives_a_clear_message() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("postgres://app:pw@127.0.0.1:{port}/app");
        let arg = TargetArg {
            name: "spillway".to_owned(),
            url: url.clone(),
            config: Config::from_str(&url).expect("url"),
        };
        let err = Target::new(&arg, None)
            .connect(Mode::Simple)
            .await
            .err()
            .expect("nothing listens there");
        let msg = err.to_string();
        assert!(
            msg.starts_with("target spillway (postgres://app:****@127.0.0.1:"),
            "{msg}"
        );
        assert!(msg.contains("cannot connect"), "{msg}");
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
        assert!(!msg.contains("pw@"), "{msg}");
    }
}
