//! SQLSTATE codes spillway itself emits, so every code an operator sees from spillway
//! is listed here in one place; and the few of PostgreSQL's that spillway must
//! recognise. Errors relayed from PostgreSQL keep their own code untouched.

/// A five-character SQLSTATE, as in PostgreSQL's errcodes.txt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState(&'static str);

impl SqlState {
    pub const PROTOCOL_VIOLATION: SqlState = SqlState("08P01");
    pub const CONNECTION_FAILURE: SqlState = SqlState("08006");
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState("0A000");
    pub const PROGRAM_LIMIT_EXCEEDED: SqlState = SqlState("54000");
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState("53300");
    pub const ADMIN_SHUTDOWN: SqlState = SqlState("57P01");
    /// Deferred writes: back-pressure (`when_full`, `journal.max_bytes`).
    pub const INSUFFICIENT_RESOURCES: SqlState = SqlState("53000");
    /// Deferred writes: the journal's disk is full (`when_full` other than
    /// `write-through`).
    pub const DISK_FULL: SqlState = SqlState("53100");
    /// Deferred writes with `row_counts = "exact"`: the key exists already.
    pub const UNIQUE_VIOLATION: SqlState = SqlState("23505");
    /// A statement in a transaction that already failed.
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState("25P02");
    /// A held transaction whose answers no longer hold (retryable).
    pub const SERIALIZATION_FAILURE: SqlState = SqlState("40001");
    /// Deferred writes: the journal or the flush worker stopped.
    pub const INTERNAL_ERROR: SqlState = SqlState("XX000");
    /// Admin console: a role not in `admin.users`.
    pub const INVALID_AUTHORIZATION: SqlState = SqlState("28000");
    /// Admin console: a wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState("28P01");
    /// Admin console: an unknown command.
    pub const SYNTAX_ERROR: SqlState = SqlState("42601");
    /// Admin console: `FLUSH`/`INVALIDATE` of a table it does not know.
    pub const UNDEFINED_TABLE: SqlState = SqlState("42P01");
    /// Admin console: a bare table name that matches several deferred tables.
    pub const AMBIGUOUS: SqlState = SqlState("42702");
    /// Admin console: `INVALIDATE` with the read cache off.
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: SqlState = SqlState("55000");
    /// Admin console: `RELOAD` of a configuration that is invalid or refused.
    pub const CONFIG_FILE_ERROR: SqlState = SqlState("F0000");
    /// Not sent by spillway: PostgreSQL's refusal of new sessions while it starts,
    /// stops or recovers, which tells a detaching session that PostgreSQL is gone.
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState("57P03");
    /// Not sent by spillway: PostgreSQL ends every backend after one crashed.
    pub const CRASH_SHUTDOWN: SqlState = SqlState("57P02");

    /// Every code above, for [`SqlState::of`].
    const ALL: [SqlState; 21] = [
        Self::PROTOCOL_VIOLATION,
        Self::CONNECTION_FAILURE,
        Self::FEATURE_NOT_SUPPORTED,
        Self::PROGRAM_LIMIT_EXCEEDED,
        Self::TOO_MANY_CONNECTIONS,
        Self::ADMIN_SHUTDOWN,
        Self::INSUFFICIENT_RESOURCES,
        Self::DISK_FULL,
        Self::UNIQUE_VIOLATION,
        Self::IN_FAILED_SQL_TRANSACTION,
        Self::SERIALIZATION_FAILURE,
        Self::INTERNAL_ERROR,
        Self::INVALID_AUTHORIZATION,
        Self::INVALID_PASSWORD,
        Self::SYNTAX_ERROR,
        Self::UNDEFINED_TABLE,
        Self::AMBIGUOUS,
        Self::OBJECT_NOT_IN_PREREQUISITE_STATE,
        Self::CONFIG_FILE_ERROR,
        Self::CANNOT_CONNECT_NOW,
        Self::CRASH_SHUTDOWN,
    ];

    pub fn code(&self) -> &'static str {
        self.0
    }

    /// The code spelled `code`, if it is one of these: where a code arrives as text
    /// (a lower layer's error, PostgreSQL's ErrorResponse), it becomes a type once, here.
    pub fn of(code: &str) -> Option<SqlState> {
        Self::ALL.into_iter().find(|s| s.0 == code)
    }

    /// Whether PostgreSQL's `code` on a FATAL says the server or the connection goes
    /// away (admin shutdown, crash shutdown, cannot connect now, class 08), rather than
    /// this session alone failing.
    pub fn ends_connection(code: &str) -> bool {
        matches!(
            Self::of(code),
            Some(Self::ADMIN_SHUTDOWN | Self::CRASH_SHUTDOWN | Self::CANNOT_CONNECT_NOW)
        ) || code.starts_with("08")
    }

    /// Class 08 (connection), 40 (rollback), 53 (resources) and 57 (operator
    /// intervention) are worth retrying; the rest are the caller's to fix.
    pub fn is_transient(&self) -> bool {
        matches!(&self.0[..2], "08" | "40" | "53" | "57")
    }
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::SqlState;

    #[test]
    fn transient_classes() {
        assert!(SqlState::CONNECTION_FAILURE.is_transient());
        assert!(SqlState::ADMIN_SHUTDOWN.is_transient());
        assert!(SqlState::PROTOCOL_VIOLATION.is_transient());
        assert!(!SqlState::FEATURE_NOT_SUPPORTED.is_transient());
    }

    #[test]
    fn codes_that_end_the_connection() {
        for code in ["57P01", "57P02", "57P03", "08006", "08003"] {
            assert!(SqlState::ends_connection(code), "{code}");
        }
        for code in ["25P03", "57014", "42601", ""] {
            assert!(!SqlState::ends_connection(code), "{code}");
        }
    }

    #[test]
    fn every_code_is_found_by_its_text() {
        for s in SqlState::ALL {
            assert_eq!(SqlState::of(s.code()), Some(s));
        }
        assert_eq!(SqlState::of("00000"), None);
    }
}
