//! The reasons a top-level INSERT/UPDATE/DELETE has no deferrable shape. They are
//! metric labels (`reason="…"`), so the set is small and fixed, snake_case, and every
//! `Err` of a shape is one of [`ALL`]: adding a reason is fine, renaming one breaks
//! dashboards.

/// `WITH …` before the statement (a CTE may hide a write or a volatile read).
pub const WITH_CLAUSE: &str = "with_clause";
/// `RETURNING …` of something other than plain columns of the target or `*` (an
/// expression, a function, `old.`/`new.`): its values may be unknown until the row
/// is written.
pub const RETURNING: &str = "returning";
/// `INSERT … ON CONFLICT` in a form not otherwise labelled (kept: a dashboard label).
pub const ON_CONFLICT: &str = "on_conflict";
/// `ON CONFLICT` without an arbiter (any unique constraint), or with an expression,
/// collation, operator class or WHERE in it.
pub const ON_CONFLICT_TARGET: &str = "on_conflict_target";
/// `ON CONFLICT … DO UPDATE … WHERE`.
pub const ON_CONFLICT_WHERE: &str = "on_conflict_where";
/// A `DO UPDATE SET` item other than a value, `EXCLUDED.c` or `c ± either`.
pub const ON_CONFLICT_SET: &str = "on_conflict_set";
/// `INSERT … OVERRIDING SYSTEM|USER VALUE`.
pub const OVERRIDING: &str = "overriding";
/// `INSERT … DEFAULT VALUES`.
pub const DEFAULT_VALUES: &str = "default_values";
/// `INSERT … SELECT`, or a VALUES list with ORDER BY/LIMIT/set operations.
pub const INSERT_SELECT: &str = "insert_select";
/// `INSERT INTO t VALUES …` without a column list.
pub const NO_COLUMN_LIST: &str = "no_column_list";
/// A VALUES row whose width is not the column list's.
pub const COLUMN_COUNT_MISMATCH: &str = "column_count_mismatch";
/// A column named twice in the column list, SET list or key.
pub const DUPLICATE_COLUMN: &str = "duplicate_column";
/// A subscripted or field target (`a[1]`, `c.f`).
pub const INDIRECTION: &str = "indirection";
/// `DEFAULT` as a value.
pub const DEFAULT_VALUE: &str = "default_value";
/// A value that is neither a constant nor a parameter (maybe cast).
pub const EXPRESSION: &str = "expression";
/// A function call or SQL value function (`now()`, `CURRENT_TIMESTAMP`).
pub const FUNCTION: &str = "function";
/// A subquery.
pub const SUBQUERY: &str = "subquery";
/// A string constant holding a date/time word that reads the clock (`'now'`).
pub const CLOCK_LITERAL: &str = "clock_literal";
/// `UPDATE … FROM` or `DELETE … USING`.
pub const FROM_OR_USING: &str = "from_or_using";
/// UPDATE/DELETE without WHERE (every row).
pub const NO_WHERE: &str = "no_where";
/// `WHERE CURRENT OF cursor`.
pub const CURRENT_OF: &str = "current_of";
/// A WHERE that is not `col = value [AND col = value …]`.
pub const WHERE_NOT_KEY_EQUALITY: &str = "where_not_key_equality";
/// `col = NULL` in the key (never true).
pub const NULL_KEY: &str = "null_key";
/// A column reference qualified by something other than the target's name or alias.
pub const COLUMN_REFERENCE: &str = "column_reference";
/// A SET value other than a value or `col ± value` of the same column.
pub const SET_EXPRESSION: &str = "set_expression";
/// `SET (a, b) = (…)`.
pub const MULTIPLE_ASSIGNMENT: &str = "multiple_assignment";
/// A parse tree this module did not expect.
pub const UNSUPPORTED: &str = "unsupported";

/// Every reason, for registering metric labels up front.
pub const ALL: [&str; 27] = [
    WITH_CLAUSE,
    RETURNING,
    ON_CONFLICT,
    ON_CONFLICT_TARGET,
    ON_CONFLICT_WHERE,
    ON_CONFLICT_SET,
    OVERRIDING,
    DEFAULT_VALUES,
    INSERT_SELECT,
    NO_COLUMN_LIST,
    COLUMN_COUNT_MISMATCH,
    DUPLICATE_COLUMN,
    INDIRECTION,
    DEFAULT_VALUE,
    EXPRESSION,
    FUNCTION,
    SUBQUERY,
    CLOCK_LITERAL,
    FROM_OR_USING,
    NO_WHERE,
    CURRENT_OF,
    WHERE_NOT_KEY_EQUALITY,
    NULL_KEY,
    COLUMN_REFERENCE,
    SET_EXPRESSION,
    MULTIPLE_ASSIGNMENT,
    UNSUPPORTED,
];
