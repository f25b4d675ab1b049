//! The session-level settings transaction mode replays on each lease: which
//! statements are a `SET` or `RESET` of the session (ADR 0028). The classifier's
//! session-command recognition (`read/classify/`, `SessionCommand`) decides what a
//! statement is; nothing here parses SQL.

use std::sync::Arc;

use crate::read::classify::{Analysis, Kind, SessionCommand};

/// A session-level `SET` or `RESET` (what transaction mode replays).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SessionSet {
    /// The parameter (lower case) and the statement.
    Set(String, String),
    Reset(String),
    ResetAll,
    /// A session-level setting changed among other statements, or one that cannot be
    /// replayed (`SET … FROM CURRENT`): the session keeps its connection (pinned).
    Pin,
}

/// How a statement text is analysed: the cache's memoised classifier when the cache
/// is on, else a parse of its own.
pub(super) type Classify<'a> = &'a dyn Fn(&str) -> Arc<Analysis>;

/// The session-level `SET` or `RESET` the text of a simple Query or a Parse carries:
/// a `SET` (not `SET LOCAL`, `SET TRANSACTION`, `SET SESSION CHARACTERISTICS`) or
/// `RESET` alone in its text. `SET ROLE`/`SET SESSION AUTHORIZATION` are not one
/// (they pin the session, `PINNING_SQL`). Only texts that start with SET, RESET or a
/// comment, or hold several statements and mention SET, are analysed. The caller read
/// the message once and passes its text.
pub(super) fn set_statement(sql: &str, classify: Classify<'_>) -> Option<SessionSet> {
    // Decided from bytes, without a copy: this runs for every Query and Parse.
    let text = sql.trim_start().as_bytes();
    let head = &text[..text.len().min(5)];
    let starts = head
        .get(..3)
        .is_some_and(|h| h.eq_ignore_ascii_case(b"set"))
        || head.eq_ignore_ascii_case(b"reset");
    let commented = head.starts_with(b"/*") || head.starts_with(b"--");
    // A `;` before the end (a trailing one ends the only statement).
    let several = || {
        sql.trim_end().trim_end_matches(';').contains(';')
            && text.windows(3).any(|w| w.eq_ignore_ascii_case(b"set"))
    };
    if !(starts || commented || several()) {
        return None;
    }
    let analysis = classify(sql);
    let session = |k: &Kind| match k {
        Kind::Session(
            c @ (SessionCommand::Set { local: false, .. }
            | SessionCommand::Reset { .. }
            | SessionCommand::ResetAll),
        ) => Some(c.clone()),
        _ => None,
    };
    let commands: Vec<SessionCommand> = analysis
        .statements
        .iter()
        .filter_map(|s| session(&s.kind))
        .collect();
    let real: Vec<&crate::read::classify::Statement> = analysis
        .statements
        .iter()
        .filter(|s| s.kind != Kind::Empty)
        .collect();
    if real.len() == 1
        && matches!(real[0].kind, Kind::Session(SessionCommand::Other))
        && sql.to_ascii_lowercase().contains("from current")
    {
        // SET … FROM CURRENT: the value is the connection's of the moment.
        return Some(SessionSet::Pin);
    }
    match (commands.as_slice(), real.len()) {
        ([], _) => None,
        ([one], 1) => Some(match one {
            SessionCommand::Set { name, .. } => {
                let text = sql.trim().trim_end_matches(';').trim_end();
                SessionSet::Set(name.clone(), text.to_owned())
            }
            SessionCommand::Reset { name } => SessionSet::Reset(name.clone()),
            _ => SessionSet::ResetAll,
        }),
        _ => Some(SessionSet::Pin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend;

    fn set(sql: &str) -> Option<SessionSet> {
        let msg = frontend::query_message(sql);
        let classify = |sql: &str| Arc::new(crate::read::classify::analyze(sql));
        set_statement(frontend::query(frontend::body(&msg))?, &classify)
    }

    #[test]
    fn a_parse_is_read_past_its_statement_name() {
        let parse = |name: &str, sql: &str| {
            let msg = frontend::build::parse(name, sql, &[]);
            let classify = |sql: &str| Arc::new(crate::read::classify::analyze(sql));
            let parse = frontend::parse(frontend::body(&msg))?;
            set_statement(parse.sql, &classify)
        };
        assert_eq!(
            parse("s1", "  \n reset work_mem"),
            Some(SessionSet::Reset("work_mem".into()))
        );
        assert!(
            matches!(parse("", "SeT search_path = a"), Some(SessionSet::Set(n, _)) if n == "search_path")
        );
        // A name that looks like a SET does not make the statement one.
        assert_eq!(parse("set", "SELECT 1"), None);
        assert_eq!(parse("s2", "SELECT 'set x = 1'"), None);
        assert_eq!(set("se"), None);
        assert_eq!(set("   "), None);
    }

    #[test]
    fn session_level_sets_are_recognised() {
        assert_eq!(
            set("SET statement_timeout = '1s';"),
            Some(SessionSet::Set(
                "statement_timeout".into(),
                "SET statement_timeout = '1s'".into()
            ))
        );
        assert_eq!(
            set("set search_path=a,b"),
            Some(SessionSet::Set(
                "search_path".into(),
                "set search_path=a,b".into()
            ))
        );
        assert!(
            matches!(set("SET SESSION DateStyle TO ISO"), Some(SessionSet::Set(n, _)) if n == "datestyle")
        );
        assert!(
            matches!(set("SET TIME ZONE 'UTC'"), Some(SessionSet::Set(n, _)) if n == "timezone")
        );
        assert!(
            matches!(set("/* c */ SET work_mem = '8MB'"), Some(SessionSet::Set(n, _)) if n == "work_mem"),
            "a comment first is the parser's business"
        );
        assert!(
            matches!(set("SET work_mem = '8MB' -- why"), Some(SessionSet::Set(n, _)) if n == "work_mem"),
            "a trailing comment is the parser's business"
        );
        assert_eq!(
            set("RESET work_mem"),
            Some(SessionSet::Reset("work_mem".into()))
        );
        assert_eq!(set("RESET ALL"), Some(SessionSet::ResetAll));
        for other in [
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "SET ROLE app",
            "SET SESSION AUTHORIZATION app",
            "SELECT set_config('a.b', '1', false)",
            "SELECT 1; SELECT 'offset'",
            "UPDATE t SET a = 1",
        ] {
            assert_eq!(set(other), None, "{other}");
        }
        for pinning in [
            "SET a.b = 1; SELECT 1",
            "SELECT 1; RESET work_mem",
            "SET work_mem = '1MB'; SET a.b = 2",
            "SET work_mem FROM CURRENT",
        ] {
            assert_eq!(set(pinning), Some(SessionSet::Pin), "{pinning}");
        }
    }
}
