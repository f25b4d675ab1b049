//! One value of a deferred write as PostgreSQL would store it (`super` builds the row
//! operations from these): a literal or a Bind parameter converted to the column's
//! type as PostgreSQL text ([`value`]), and a clock or random function's value when
//! spillway decides the statement ([`clock`], ADR 0030).
//!
//! Invariants:
//! - A value passes through up to three types (the parameter's, the client's cast,
//!   the column's) and each step is taken only where PostgreSQL's conversion keeps it
//!   exactly ([`types::step`]); its text is checked against every type it passes
//!   through, so a value PostgreSQL would refuse is a fallback, never a dead letter.
//! - Date and time values leave here in `datetime`'s canonical text, independent of
//!   the flusher's session settings; `'now'` and the like (read when PostgreSQL
//!   converts them) are never deferred.
//! - A clock reads spillway's clock at the decision: the transaction's start
//!   (`Settings::now`), the statement's, the moment, or a fresh v4 uuid.

use crate::read::classify::{Clock, Operand, Value};
use crate::write::datetime::{self, Settings};
use crate::write::fallbacks::Fallback;
use crate::write::params::{self, Bound};
use crate::write::tables::DeferredTable;
use crate::write::types;
use spillway_policies::writes::Val;

/// One value for `column`: a literal or a Bind parameter, as PostgreSQL text.
///
/// A value reaches its column through up to three types: the parameter's (declared
/// at Parse, else the cast's or the column's, as PostgreSQL infers it), the client's
/// cast, and the column's assignment. Each step is accepted only where PostgreSQL's
/// conversion keeps the value exactly ([`types::step`]), the text is checked against
/// every type it passes through, and date/time text is put in its canonical form.
pub(super) fn value(
    v: &Value,
    column: &str,
    table: &DeferredTable,
    bound: &Bound,
    settings: Settings<'_>,
) -> Result<Val, Fallback> {
    let column_oid = table.type_oids.get(column).copied().unwrap_or(0);
    let typmod = table.typmods.get(column).copied().unwrap_or(-1);
    let cast = match &v.cast {
        Some(c) => Some(
            types::cast(c)
                .filter(|c| c.keeps(column_oid, typmod))
                .ok_or(Fallback::Cast)?,
        ),
        None => None,
    };
    if let Some(labels) = table.enum_types.get(&column_oid) {
        return enum_value(v, column, column_oid, labels, table, bound);
    }
    if !types::validated(column_oid) {
        return Err(Fallback::Value(types::VALUE_TYPE));
    }
    // The type the value is read in first.
    let (text, first) = match &v.operand {
        Operand::Literal(t) => (t.clone(), cast.map_or(column_oid, |c| c.oid)),
        Operand::Param(n) => parameter(usize::from(*n), cast, column_oid, bound)?,
        Operand::Clock(c) => {
            // A cast to another type than the column's would convert twice.
            if cast.is_some_and(|c| c.oid != column_oid) {
                return Err(Fallback::ClockType);
            }
            return Ok(Val {
                text: Some(clock(*c, column_oid, typmod, settings)?),
                cast: None,
            });
        }
    };
    let Some(mut text) = text else {
        if table.not_null.iter().any(|c| c == column) {
            return Err(Fallback::NullInNotNullColumn);
        }
        return Ok(Val {
            text: None,
            cast: None,
        });
    };
    // 'now', 'today'… read the clock when PostgreSQL converts them: at apply time,
    // not when the client wrote. Not deferrable.
    if (params::is_clock_type(first) || params::is_clock_type(column_oid))
        && params::is_clock_word(&text)
    {
        return Err(Fallback::ClockLiteral);
    }
    let mut chain = vec![(first, -1)];
    if let Some(c) = cast {
        chain.push((c.oid, c.typmod));
    }
    chain.push((column_oid, typmod));
    for pair in chain.windows(2) {
        let ((from, _), (to, to_mod)) = (pair[0], pair[1]);
        if !types::step(from, to) {
            return Err(if v.cast.is_some() {
                Fallback::Cast
            } else {
                Fallback::ParameterType
            });
        }
        // An interval column with a precision or fields (`interval(0)`, `interval day`)
        // rounds or truncates: not converted here.
        if to == datetime::INTERVAL && to_mod != -1 {
            return Err(Fallback::DatetimeValue);
        }
        if params::is_datetime_type(to) {
            text = datetime::canonical(&text, from, to, settings).ok_or(Fallback::DatetimeValue)?;
            continue;
        }
        // Values PostgreSQL would refuse run write-through, so the client gets
        // PostgreSQL's own error instead of an acknowledgement and a dead letter.
        if !params::accepts(&text, from, -1) || !params::accepts(&text, to, to_mod) {
            return Err(Fallback::InvalidValue);
        }
    }
    Ok(Val {
        text: Some(text),
        cast: None,
    })
}

/// A value for an enum column (ADR 0038): one of the type's labels exactly, as
/// PostgreSQL's `enum_in` accepts it (a label's text and binary forms are the same
/// bytes), from a literal or a parameter of unspecified type or of the enum's own;
/// NULL where the column allows it. Anything else falls back: a text-typed parameter
/// or a cast (PostgreSQL has no assignment cast from text to an enum), a clock, a
/// label the type does not have as loaded (PostgreSQL's 22P02 comes from PostgreSQL),
/// or a type whose name cannot be spliced into the flush's cast.
fn enum_value(
    v: &Value,
    column: &str,
    enum_oid: u32,
    labels: &[String],
    table: &DeferredTable,
    bound: &Bound,
) -> Result<Val, Fallback> {
    if v.cast.is_some() {
        return Err(Fallback::Cast);
    }
    let spliceable = table
        .meta
        .types
        .get(column)
        .is_some_and(|t| spillway_policies::writes::plan::safe_type(t));
    if !spliceable {
        return Err(Fallback::Value(types::VALUE_TYPE));
    }
    let text = match &v.operand {
        Operand::Literal(t) => t.clone(),
        Operand::Param(n) => {
            let bad = Fallback::Value(params::BAD_VALUE);
            let i = usize::from(*n).checked_sub(1).ok_or(bad)?;
            let raw = bound.values.get(i).ok_or(bad)?;
            let declared = bound.types.get(i).copied().unwrap_or(0);
            if declared != 0 && declared != enum_oid {
                return Err(Fallback::ParameterType);
            }
            match raw {
                None => None,
                Some(bytes) => Some(String::from_utf8(bytes.clone()).map_err(|_| bad)?),
            }
        }
        Operand::Clock(_) => return Err(Fallback::ClockType),
    };
    match text {
        None if table.not_null.iter().any(|c| c == column) => Err(Fallback::NullInNotNullColumn),
        None => Ok(Val::plain(None)),
        Some(label) if labels.contains(&label) => Ok(Val::plain(Some(&label))),
        Some(_) => Err(Fallback::InvalidValue),
    }
}

/// The value clock function `c` has when spillway decides the statement (ADR 0030),
/// assigned to a column of type `column_oid` (`typmod`): its canonical text.
pub(super) fn clock(
    c: Clock,
    column_oid: u32,
    typmod: i32,
    settings: Settings<'_>,
) -> Result<String, Fallback> {
    use datetime::{DATE, TIME, TIMESTAMP, TIMESTAMPTZ, TIMETZ};
    let (t, natural) = match c {
        Clock::RandomUuid => {
            return if column_oid == params::UUID {
                Ok(random_uuid())
            } else {
                Err(Fallback::ClockType)
            };
        }
        Clock::TransactionStart => (settings.now, TIMESTAMPTZ),
        Clock::StatementStart => (settings.statement, TIMESTAMPTZ),
        Clock::Now => (std::time::SystemTime::now(), TIMESTAMPTZ),
        Clock::LocalTimestamp => (settings.now, TIMESTAMP),
        Clock::CurrentDate => (settings.now, DATE),
        Clock::CurrentTime => (settings.now, TIMETZ),
        Clock::LocalTime => (settings.now, TIME),
    };
    datetime::from_clock(t, natural, column_oid, typmod, settings.utc()).map_err(|e| match e {
        datetime::ClockError::TimeZone => Fallback::ClockTimeZone,
        datetime::ClockError::Type => Fallback::ClockType,
    })
}

/// A version 4 (random) uuid, as `gen_random_uuid()` makes one: 122 random bits from
/// a cryptographically secure generator, in PostgreSQL's output form.
fn random_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Bind parameter `$n` as text, and the type PostgreSQL reads it in: declared at
/// Parse, else inferred from the cast around it or the column it is assigned to.
fn parameter(
    n: usize,
    cast: Option<types::Cast>,
    column_oid: u32,
    bound: &Bound,
) -> Result<(Option<String>, u32), Fallback> {
    let bad = Fallback::Value(params::BAD_VALUE);
    let i = n.checked_sub(1).ok_or(bad)?;
    let raw = bound.values.get(i).ok_or(bad)?;
    let declared = bound.types.get(i).copied().unwrap_or(0);
    let oid = match (declared, cast) {
        (0, Some(c)) => c.oid,
        (0, None) => column_oid,
        (d, _) => d,
    };
    let binary = bound.binary.get(i).copied().unwrap_or(false);
    let text = params::to_text(raw.as_deref(), binary, oid).map_err(Fallback::Value)?;
    Ok((text, oid))
}
