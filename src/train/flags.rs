//! Range checks for command-line and config-file settings, with messages that give the allowed
//! range. Integers are checked twice: by a clap value parser (so `--steps -1` says what is
//! allowed instead of clap's "unexpected argument"; pair it with `allow_negative_numbers`) and
//! after merging a config file; floats once, after merging (NaN and ±inf fail every range).

use anyhow::{bail, Result};
use std::fmt::Display;

/// clap value parser for a whole number in `[LO, HI]`.
pub fn whole<T: TryFrom<u64>, const LO: u64, const HI: u64>(s: &str) -> std::result::Result<T, String> {
    let t = s.trim();
    let v: i128 = match t.parse() {
        Ok(v) => v,
        Err(_) => return Err(format!("expected a whole number in [{LO}, {HI}], got {t:?}")),
    };
    if v < LO as i128 || v > HI as i128 {
        return Err(format!("{v} is out of range: allowed [{LO}, {HI}]"));
    }
    T::try_from(v as u64).map_err(|_| format!("{v} does not fit on this machine"))
}

/// Checks a whole-number setting against `[lo, hi]`.
pub fn int_in<T: Copy + Display + TryInto<u64>>(flag: &str, v: T, lo: u64, hi: u64) -> Result<T> {
    match v.try_into() {
        Ok(x) if (lo..=hi).contains(&x) => Ok(v),
        _ => bail!("{flag} {v} is out of range: allowed [{lo}, {hi}]"),
    }
}

/// Whether an end of a float range is included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    Open,
}

/// Checks a float setting against a range with closed or open ends; NaN and infinities never
/// pass.
pub fn float_in(flag: &str, v: f64, lo: f64, lo_end: End, hi: f64, hi_end: End) -> Result<f64> {
    let above = match lo_end {
        End::Closed => v >= lo,
        End::Open => v > lo,
    };
    let below = match hi_end {
        End::Closed => v <= hi,
        End::Open => v < hi,
    };
    if !(v.is_finite() && above && below) {
        let l = if lo_end == End::Closed { '[' } else { '(' };
        let r = if hi_end == End::Closed { ']' } else { ')' };
        bail!("{flag} {v} is out of range: allowed {l}{lo}, {hi}{r}");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_give_the_range() {
        assert_eq!(whole::<u64, 1, 10>("3"), Ok(3));
        assert_eq!(whole::<u64, 1, 10>("-1").unwrap_err(), "-1 is out of range: allowed [1, 10]");
        assert!(whole::<usize, 1, 10>("1.5").unwrap_err().contains("whole number in [1, 10]"));
        assert!(float_in("--beta1", 1.0, 0.0, End::Closed, 1.0, End::Open)
            .unwrap_err()
            .to_string()
            .contains("allowed [0, 1)"));
        assert!(float_in("--lr", f64::NAN, 0.0, End::Open, 1.0, End::Closed).is_err());
        assert!(float_in("--lr", f64::INFINITY, 0.0, End::Open, f64::INFINITY, End::Closed).is_err());
        assert_eq!(
            int_in("--grad-accum", 0usize, 1, 5).unwrap_err().to_string(),
            "--grad-accum 0 is out of range: allowed [1, 5]"
        );
    }
}
