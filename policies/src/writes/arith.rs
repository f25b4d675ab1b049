//! Exact arithmetic on values kept as PostgreSQL text, for write-back's coalescing:
//! `c = 5` then `c = c + 1` becomes `c = 6`, and two deltas become their sum.
//!
//! Invariant: an answer is given only when it is exactly what PostgreSQL would store
//! after applying the operations one by one; everything else is `None` and the
//! operations stay separate (PostgreSQL then decides, errors included). So: integer
//! columns (`smallint`, `integer`, `bigint`) with the result in the column's range;
//! `numeric` with at most [`MAX_DIGITS`] digits and, for `numeric(p,s)`, operands with
//! at most `s` fractional digits (so no intermediate rounding can differ) and a result
//! that fits `p`. Floats, NaN, infinities and exponent notation are never combined.

/// Digits an operand or result may have (fits an `i128` with room to align scales).
const MAX_DIGITS: usize = 30;

/// `a + b` (or `a - b` when `subtract`) for a column of type `column_type` (as
/// `format_type` spells it), when exact; `None` otherwise.
pub fn add(column_type: &str, a: &str, b: &str, subtract: bool) -> Option<String> {
    match column_type {
        "smallint" => int(a, b, subtract, i128::from(i16::MIN), i128::from(i16::MAX)),
        "integer" => int(a, b, subtract, i128::from(i32::MIN), i128::from(i32::MAX)),
        "bigint" => int(a, b, subtract, i128::from(i64::MIN), i128::from(i64::MAX)),
        t => {
            let typmod = numeric_typmod(t)?;
            numeric(a, b, subtract, typmod)
        }
    }
}

/// Whether values of `column_type` can ever be combined (so a delta on such a column is
/// worth trying to merge).
pub fn combinable(column_type: &str) -> bool {
    matches!(column_type, "smallint" | "integer" | "bigint")
        || numeric_typmod(column_type).is_some()
}

fn int(a: &str, b: &str, subtract: bool, min: i128, max: i128) -> Option<String> {
    let a = parse_int(a)?;
    let b = parse_int(b)?;
    let r = if subtract {
        a.checked_sub(b)?
    } else {
        a.checked_add(b)?
    };
    (min..=max).contains(&r).then(|| r.to_string())
}

/// Digits with an optional sign and surrounding spaces (what `int4in` accepts, minus
/// the rarer spellings: those are left to PostgreSQL).
fn parse_int(s: &str) -> Option<i128> {
    let s = s.trim();
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    s.strip_prefix('+').unwrap_or(s).parse().ok()
}

/// `Some(None)` for unconstrained `numeric`, `Some(Some((p, s)))` for `numeric(p,s)`.
#[allow(clippy::option_option)]
fn numeric_typmod(t: &str) -> Option<Option<(usize, usize)>> {
    if t == "numeric" {
        return Some(None);
    }
    let inner = t.strip_prefix("numeric(")?.strip_suffix(')')?;
    let (p, s) = inner.split_once(',').unwrap_or((inner, "0"));
    let p: usize = p.trim().parse().ok()?;
    let s: usize = s.trim().parse().ok()?;
    // A negative or larger-than-precision scale (PostgreSQL 15+) is left alone.
    (s <= p).then_some(Some((p, s)))
}

/// A decimal as `mantissa × 10^-scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

fn parse_decimal(s: &str) -> Option<Decimal> {
    let s = s.trim();
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (whole, frac) = body.split_once('.').unwrap_or((body, ""));
    if whole.is_empty() && frac.is_empty()
        || whole.len() + frac.len() > MAX_DIGITS
        || !whole
            .bytes()
            .chain(frac.bytes())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let digits = format!("{whole}{frac}");
    let magnitude: i128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    Some(Decimal {
        mantissa: if negative { -magnitude } else { magnitude },
        scale: u32::try_from(frac.len()).ok()?,
    })
}

impl Decimal {
    fn rescale(self, scale: u32) -> Option<i128> {
        self.mantissa
            .checked_mul(10i128.checked_pow(scale.checked_sub(self.scale)?)?)
    }

    /// Digits left of the point.
    fn whole_digits(self) -> usize {
        let whole = self.mantissa.unsigned_abs() / 10u128.pow(self.scale);
        if whole == 0 {
            0
        } else {
            whole.to_string().len()
        }
    }

    fn render(self) -> String {
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (whole, frac) = padded.split_at(padded.len() - scale);
        let sign = if self.mantissa < 0 { "-" } else { "" };
        if frac.is_empty() {
            format!("{sign}{whole}")
        } else {
            format!("{sign}{whole}.{frac}")
        }
    }
}

fn numeric(a: &str, b: &str, subtract: bool, typmod: Option<(usize, usize)>) -> Option<String> {
    let a = parse_decimal(a)?;
    let b = parse_decimal(b)?;
    if let Some((_, s)) = typmod
        && (a.scale as usize > s || b.scale as usize > s)
    {
        return None;
    }
    let scale = a.scale.max(b.scale);
    let (x, y) = (a.rescale(scale)?, b.rescale(scale)?);
    let mantissa = if subtract {
        x.checked_sub(y)?
    } else {
        x.checked_add(y)?
    };
    let r = Decimal { mantissa, scale };
    if r.mantissa.unsigned_abs().to_string().len() > MAX_DIGITS {
        return None;
    }
    if let Some((p, s)) = typmod
        && r.whole_digits() > p - s
    {
        return None;
    }
    Some(r.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_add_within_the_column_range_only() {
        assert_eq!(add("integer", "5", "1", false).as_deref(), Some("6"));
        assert_eq!(add("integer", " +5 ", "-7", false).as_deref(), Some("-2"));
        assert_eq!(add("bigint", "5", "7", true).as_deref(), Some("-2"));
        assert_eq!(add("smallint", "32767", "1", false), None);
        assert_eq!(
            add("integer", "2147483647", "0", false).as_deref(),
            Some("2147483647")
        );
        assert_eq!(add("integer", "2147483647", "1", false), None);
        assert_eq!(
            add("bigint", "-9223372036854775808", "1", true),
            None,
            "below bigint's range"
        );
        // Spellings PostgreSQL may accept but we do not interpret are left alone.
        assert_eq!(add("integer", "0x10", "1", false), None);
        assert_eq!(add("integer", "1_000", "1", false), None);
        assert_eq!(add("integer", "1.5", "1", false), None);
        assert_eq!(add("integer", "", "1", false), None);
    }

    #[test]
    fn numerics_add_exactly() {
        assert_eq!(
            add("numeric", "1.5", "2.25", false).as_deref(),
            Some("3.75")
        );
        assert_eq!(add("numeric", "0.1", "0.2", false).as_deref(), Some("0.3"));
        assert_eq!(add("numeric", "1", "1.50", true).as_deref(), Some("-0.50"));
        assert_eq!(
            add("numeric", "-0.05", "0.04", false).as_deref(),
            Some("-0.01")
        );
        assert_eq!(add("numeric", ".5", "5.", false).as_deref(), Some("5.5"));
        assert_eq!(
            add("numeric(10,2)", "1.25", "0.75", false).as_deref(),
            Some("2.00")
        );
        // Scales beyond the column's would round at each step in PostgreSQL.
        assert_eq!(add("numeric(10,2)", "1.00", "0.005", false), None);
        // Past the precision: PostgreSQL raises 22003 on its own.
        assert_eq!(add("numeric(3,1)", "99.5", "0.5", false), None);
        assert_eq!(
            add("numeric(3,1)", "99.0", "0.5", false).as_deref(),
            Some("99.5")
        );
        assert_eq!(add("numeric", "NaN", "1", false), None);
        assert_eq!(add("numeric", "1e3", "1", false), None);
        assert_eq!(add("numeric", "Infinity", "1", false), None);
        assert_eq!(add("numeric", "-", "1", false), None);
    }

    #[test]
    fn other_types_are_never_combined() {
        for t in [
            "double precision",
            "real",
            "text",
            "money",
            "numeric(5,-2)",
            "myint",
        ] {
            assert_eq!(add(t, "1", "1", false), None, "{t}");
        }
        assert!(combinable("integer") && combinable("numeric(12,4)"));
        assert!(!combinable("double precision"));
    }
}
