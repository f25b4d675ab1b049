//! The session-level settings transaction mode replays on each lease: which
//! statements are a `SET` or `RESET` of the session (ADR 0028).

use crate::protocol::frontend;

/// A session-level `SET` or `RESET` (what transaction mode replays).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum SessionSet {
    /// The parameter (lower case) and the statement.
    Set(String, String),
    Reset(String),
    ResetAll,
}

/// The session-level `SET` or `RESET` a simple Query or a Parse carries, if it is one
/// statement: not `SET LOCAL`, `SET TRANSACTION`, `SET SESSION CHARACTERISTICS`, nor
/// `SET ROLE`/`SET SESSION AUTHORIZATION` (those pin the session instead).
pub(super) fn set_statement(tag: u8, body: &[u8]) -> Option<SessionSet> {
    // Most statements are neither: decided from their first bytes, before the message
    // is decoded (a Parse's text follows its statement name).
    let text = match tag {
        frontend::QUERY => body,
        _ => body.get(memchr::memchr(0, body)? + 1..)?,
    };
    let start = text.iter().position(|b| !b.is_ascii_whitespace())?;
    let head = text.get(start..(start + 5).min(text.len()))?;
    if !head
        .get(..3)
        .is_some_and(|h| h.eq_ignore_ascii_case(b"set"))
        && !head.eq_ignore_ascii_case(b"reset")
    {
        return None;
    }
    let sql = match tag {
        frontend::QUERY => frontend::query(body)?,
        _ => frontend::parse(body)?.sql,
    };
    let sql = sql.trim().trim_end_matches(';').trim_end();
    if sql.contains(';') || sql.contains("--") || sql.contains("/*") {
        return None;
    }
    let lower = sql.to_ascii_lowercase();
    let words: Vec<&str> = lower.split_whitespace().collect();
    let name = |w: &str| w.split('=').next().unwrap_or_default().to_owned();
    match words.as_slice() {
        ["reset", "all"] => Some(SessionSet::ResetAll),
        ["reset", "role" | "session"] | ["reset", "session", ..] => None,
        ["reset", param] => Some(SessionSet::Reset(name(param))),
        ["set", "local" | "transaction" | "role", ..]
        | [
            "set",
            "session",
            "characteristics" | "authorization" | "role",
            ..,
        ]
        | ["set", "session", "local", ..] => None,
        ["set", "time", "zone", ..] | ["set", "session", "time", "zone", ..] => {
            Some(SessionSet::Set("timezone".to_owned(), sql.to_owned()))
        }
        ["set", "session", param, ..] | ["set", param, ..] if !name(param).is_empty() => {
            Some(SessionSet::Set(name(param), sql.to_owned()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frontend;

    fn set(sql: &str) -> Option<SessionSet> {
        let msg = frontend::query_message(sql);
        set_statement(frontend::QUERY, frontend::body(&msg))
    }

    #[test]
    fn a_parse_is_read_past_its_statement_name() {
        let parse = |name: &str, sql: &str| {
            let msg = frontend::build::parse(name, sql, &[]);
            set_statement(frontend::PARSE, frontend::body(&msg))
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
            "SET a = 1; SELECT 1",
            "SELECT set_config('a.b', '1', false)",
        ] {
            assert_eq!(set(other), None, "{other}");
        }
    }
}
