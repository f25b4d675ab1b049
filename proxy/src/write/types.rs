//! Which type conversions of a deferred write's values spillway may carry out itself:
//! the client's casts (by the type name the classifier rendered) and the steps from a
//! parameter's declared type through a cast to the column's type. A step is allowed
//! only where PostgreSQL's conversion keeps the value exactly (the text read in one
//! type means the same in the next), so journaling the text for the column's own
//! input function writes what PostgreSQL would have written.
//!
//! Invariants: integers move between int2/int4/int8/numeric (the range of every type
//! on the way is checked by the caller, as PostgreSQL checks it); text and varchar
//! into each other (varchar's length is checked, never truncated: an explicit cast
//! with a length is accepted only when the value fits); anything else only into its
//! own type. Types whose input spillway cannot validate are [`VALUE_TYPE`]: a value
//! PostgreSQL would refuse must never be journaled.

use super::datetime::{DATE, INTERVAL, TIME, TIMESTAMP, TIMESTAMPTZ};
use super::params::{
    BOOL, BPCHAR, BYTEA, FLOAT4, FLOAT8, INT2, INT4, INT8, JSON, JSONB, NUMERIC, TEXT, UUID,
    VARCHAR,
};

/// Fallback label: a column whose type's input spillway does not validate (enums,
/// arrays, user types…).
pub const VALUE_TYPE: &str = "value_type";

/// A client's cast: the type and its modifier (-1 without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    pub oid: u32,
    pub typmod: i32,
}

const NAMES: [(&str, u32); 19] = [
    ("int2", INT2),
    ("int4", INT4),
    ("int8", INT8),
    ("text", TEXT),
    ("varchar", VARCHAR),
    ("bpchar", BPCHAR),
    ("bool", BOOL),
    ("uuid", UUID),
    ("json", JSON),
    ("jsonb", JSONB),
    ("numeric", NUMERIC),
    ("float4", FLOAT4),
    ("float8", FLOAT8),
    ("bytea", BYTEA),
    ("date", DATE),
    ("time", TIME),
    ("timestamp", TIMESTAMP),
    ("timestamptz", TIMESTAMPTZ),
    ("interval", INTERVAL),
];

/// The cast named `text` (as `read::classify` renders it: `int8`, `varchar(32)`,
/// `numeric(10,2)`, `uuid`), if it is one of the types above.
pub fn cast(text: &str) -> Option<Cast> {
    let (name, mods) = match text.split_once('(') {
        Some((name, rest)) => (name, Some(rest.strip_suffix(')')?)),
        None => (text, None),
    };
    let name = name.strip_prefix("pg_catalog.").unwrap_or(name);
    let oid = NAMES.iter().find(|(n, _)| *n == name)?.1;
    let typmod = match mods {
        None => -1,
        Some(m) => {
            let nums: Vec<i32> = m
                .split(',')
                .map(|p| p.trim().parse().ok())
                .collect::<Option<_>>()?;
            match (oid, nums.as_slice()) {
                (VARCHAR | BPCHAR, [n]) if *n > 0 => n.checked_add(4)?,
                (NUMERIC, [p]) if (1..=1000).contains(p) => (p << 16) + 4,
                (NUMERIC, [p, s]) if (1..=1000).contains(p) && (0..=*p).contains(s) => {
                    (p << 16) + s + 4
                }
                _ => return None,
            }
        }
    };
    Some(Cast { oid, typmod })
}

impl Cast {
    /// Whether a value cast to `self` and then assigned to a column of `column` type
    /// (`typmod`) is the value read by the column's input alone: a typmod only when the
    /// column's is the same (numeric rounds to it) or it only bounds a length the
    /// caller checks (varchar).
    pub fn keeps(self, column: u32, typmod: i32) -> bool {
        if self.typmod == -1 {
            return self.oid != BPCHAR;
        }
        match self.oid {
            VARCHAR => true,
            NUMERIC | BPCHAR => self.oid == column && self.typmod == typmod,
            _ => false,
        }
    }
}

fn integer(oid: u32) -> bool {
    matches!(oid, INT2 | INT4 | INT8)
}

/// Whether a value of type `from` becomes the same value of type `to` under
/// PostgreSQL's implicit, assignment or explicit conversion between them.
pub fn step(from: u32, to: u32) -> bool {
    from == to
        || (integer(from) && (integer(to) || to == NUMERIC))
        || (matches!(from, TEXT | VARCHAR) && matches!(to, TEXT | VARCHAR))
        || (from == TIMESTAMP && to == TIMESTAMPTZ)
}

/// Column types whose input spillway validates (`params::accepts`,
/// `datetime::canonical`): values of any other type are not deferred.
pub fn validated(oid: u32) -> bool {
    NAMES.iter().any(|(_, o)| *o == oid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn casts_orms_send_are_known() {
        assert_eq!(
            cast("int8"),
            Some(Cast {
                oid: INT8,
                typmod: -1
            })
        );
        assert_eq!(
            cast("varchar(32)"),
            Some(Cast {
                oid: VARCHAR,
                typmod: 36
            })
        );
        assert_eq!(
            cast("numeric(10,2)"),
            Some(Cast {
                oid: NUMERIC,
                typmod: (10 << 16) + 2 + 4
            })
        );
        assert_eq!(cast("order_status"), None);
        assert_eq!(cast("text[]"), None);
        assert!(cast("varchar(32)").is_some_and(|c| c.keeps(TEXT, -1)));
        assert!(!cast("numeric(5,1)").is_some_and(|c| c.keeps(NUMERIC, (10 << 16) + 6)));
        assert!(!cast("bpchar").is_some_and(|c| c.keeps(BPCHAR, -1)));
    }

    #[test]
    fn only_value_keeping_steps() {
        assert!(step(INT2, INT8) && step(INT8, INT2) && step(INT4, NUMERIC));
        assert!(step(TEXT, VARCHAR) && step(TIMESTAMP, TIMESTAMPTZ));
        assert!(!step(FLOAT4, FLOAT8) && !step(NUMERIC, INT4) && !step(TEXT, UUID));
        assert!(!step(TIMESTAMPTZ, TIMESTAMP) && !step(TEXT, BPCHAR));
        assert!(validated(JSONB) && !validated(1009));
    }
}
