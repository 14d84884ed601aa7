//! Exact fixed-point decimals with eight places, the precision Binance
//! quotes prices and quantities in. Prices, quantities and their sums stay
//! integers all the way to the final division, so bars are exact.

/// Digits after the decimal point.
pub const SCALE: i8 = 8;
/// One unit in fixed point.
pub const ONE: i128 = 100_000_000;
/// Decimal digits an Arrow `Decimal128` price or quantity holds: Arrow's
/// most, 30 before the point. A low-priced coin trades tens of billions of
/// units at once, past what 18 digits (10 before the point) hold (SPEC §1).
pub const PRECISION: u8 = 38;
/// The precision archives were written with before it was widened; they
/// are read as they are, the values being the same units.
pub const PRECISION_BEFORE_2026_12: u8 = 18;
/// The largest value that fits `PRECISION` digits.
const MAX: i128 = 10i128.pow(PRECISION as u32) - 1;
/// Digits before the point that fit `PRECISION`.
const MAX_WHOLE_DIGITS: usize = PRECISION as usize - SCALE as usize;

/// Parses a plain non-negative decimal string such as `"61837.63000000"`
/// into units of 1e-8. Rejects signs, exponents, empty parts, more than eight
/// significant fraction digits and values beyond 38 digits.
///
/// Up to 18 digits before the point (every price and nearly every quantity)
/// in 64-bit integers: this runs twice per trade decoded.
pub fn parse(text: &str) -> Option<i128> {
    let bytes = text.as_bytes();
    let (int, frac) = match bytes.iter().position(|&b| b == b'.') {
        Some(dot) => (&bytes[..dot], &bytes[dot + 1..]),
        None => (bytes, &[][..]),
    };
    if int.is_empty() || int.len() > MAX_WHOLE_DIGITS {
        return None;
    }
    let whole = if int.len() <= 18 {
        // At most 18 digits: below 10^18, no overflow.
        let mut whole: u64 = 0;
        for &b in int {
            whole = whole * 10 + u64::from(digit(b)?);
        }
        i128::from(whole)
    } else {
        // At most 30 digits: below 10^30, no overflow.
        let mut whole: i128 = 0;
        for &b in int {
            whole = whole * 10 + i128::from(digit(b)?);
        }
        whole
    };
    let mut fraction: u64 = 0;
    for (i, &b) in frac.iter().enumerate() {
        let d = digit(b)?;
        if i < SCALE as usize {
            fraction = fraction * 10 + u64::from(d);
        } else if d != 0 {
            return None;
        }
    }
    fraction *= 10u64.pow((SCALE as usize).saturating_sub(frac.len()) as u32);
    let value = whole * ONE + i128::from(fraction);
    (value <= MAX).then_some(value)
}

fn digit(b: u8) -> Option<u8> {
    let d = b.wrapping_sub(b'0');
    (d < 10).then_some(d)
}

/// Formats units of 1e-`scale` with all `scale` places: `format(6183763000000, 8)`
/// is `"61837.63000000"`.
pub fn format(units: i128, scale: u32) -> String {
    let mut out = String::new();
    let _ = write(&mut out, units, scale);
    out
}

/// [`format`] appended to `out`, without a string of its own. Values that
/// fit 64 bits (every price and volume of a bar) are split in 64-bit
/// arithmetic, a fraction of the cost of a 128-bit division.
pub fn write(out: &mut impl std::fmt::Write, units: i128, scale: u32) -> std::fmt::Result {
    let sign = if units < 0 { "-" } else { "" };
    let abs = units.unsigned_abs();
    if scale == 0 {
        return write!(out, "{sign}{abs}");
    }
    let width = scale as usize;
    match (u64::try_from(abs), 10u64.checked_pow(scale)) {
        (Ok(abs), Some(div)) => write!(out, "{sign}{}.{:0width$}", abs / div, abs % div),
        _ => {
            let div = 10u128.pow(scale);
            write!(out, "{sign}{}.{:0width$}", abs / div, abs % div)
        }
    }
}

/// Fraction digits worked out by long division in [`ratio`]: beyond the 17
/// significant digits a float needs to be rounded correctly.
const RATIO_DIGITS: usize = 24;

/// The ratio of two fixed-point values, `numerator / denominator /
/// 10^scale_difference`, as the float nearest to the exact quotient (e.g. a
/// VWAP from Σp·q at scale 16 and Σq at scale 8). Long division in integers,
/// then one correctly rounded decimal-to-float conversion.
pub fn ratio(numerator: i128, denominator: i128, scale_difference: i32) -> f64 {
    if denominator == 0 {
        return f64::NAN;
    }
    let negative = (numerator < 0) != (denominator < 0);
    let (n, d) = (numerator.unsigned_abs(), denominator.unsigned_abs());
    let mut text = format!("{}{}.", if negative { "-" } else { "" }, n / d);
    let mut rest = n % d;
    for _ in 0..RATIO_DIGITS {
        match rest.checked_mul(10) {
            Some(r) => {
                text.push(char::from(b'0' + (r / d) as u8));
                rest = r % d;
            }
            None => return numerator as f64 / denominator as f64 / 10f64.powi(scale_difference),
        }
    }
    text.push_str(&format!("e-{scale_difference}"));
    text.parse().unwrap_or(f64::NAN)
}

/// Fixed-point units as a float.
pub fn to_f64(units: i128) -> f64 {
    units as f64 / ONE as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binance_decimals() {
        let cases: &[(&str, Option<i128>)] = &[
            ("61837.63000000", Some(6_183_763_000_000)),
            ("0.00200000", Some(200_000)),
            ("1", Some(ONE)),
            ("1.5", Some(150_000_000)),
            ("0.000000010", Some(1)),
            ("0.000000011", None),
            ("-1.0", None),
            ("+1.0", None),
            ("1e5", None),
            ("NaN", None),
            ("inf", None),
            ("", None),
            (".5", None),
            ("1.2.3", None),
            ("1.", Some(ONE)),
            ("007.50", Some(750_000_000)),
            ("0.12345678000000000000", Some(12_345_678)),
            ("1.00000000x", None),
            ("999999999999999999", Some(999_999_999_999_999_999 * ONE)),
            ("1234567890123456789", Some(1_234_567_890_123_456_789 * ONE)),
            (" 1.0", None),
            // Past the 18 digits archives used to hold: a real trade size.
            ("25000000000.5", Some(2_500_000_000_050_000_000)),
            ("9999999999.99999999", Some(999_999_999_999_999_999)),
            ("999999999999999999999999999999.99999999", Some(MAX)),
            ("1000000000000000000000000000000", None),
            ("12a45678901234567890", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), *expected, "{text:?}");
        }
    }

    #[test]
    fn formats_with_all_places() {
        assert_eq!(format(6_183_763_000_000, 8), "61837.63000000");
        assert_eq!(format(200_000, 8), "0.00200000");
        assert_eq!(format(-5, 8), "-0.00000005");
        assert_eq!(format(42, 0), "42");
        // Past 64 bits (a quote volume at scale 16): the 128-bit path.
        assert_eq!(format(i128::from(u64::MAX) * 10 + 7, 8), "1844674407370.95516157");
        assert_eq!(format(-i128::from(u64::MAX) - 1, 8), "-184467440737.09551616");
    }

    #[test]
    fn ratio_divides_across_scales() {
        // 2 * 3.5 = 7 at scale 16, over 2 at scale 8: 3.5
        assert_eq!(ratio(7 * ONE * ONE, 2 * ONE, 8), 3.5);
        assert_eq!(ratio(-1, 3, 0), -1.0 / 3.0);
        assert!(ratio(1, 0, 0).is_nan());
        // Σp·q / Σq of the first BTCUSDT bar of the fixtures: the float
        // nearest to the exact 61834.3756833612556211974252711...
        assert_eq!(ratio(140_252_730_925_000_000_000, 22_682_000, 8), "61834.3756833612556211974252711".parse::<f64>().unwrap());
    }
}
