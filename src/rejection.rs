//! Why a record is not a usable trade: the reasons every stage that turns a
//! record away shares (the decoder, the windows' late trades, the dead-letter
//! topic, the error type), in a module of their own so none of them depends
//! on another for it.

use std::fmt;

/// Why a record is not a usable trade; the `reason` header of a dead-letter
/// record carries [`Reject::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not JSON, or JSON cut short.
    MalformedJson,
    /// A required key is absent.
    MissingField,
    /// A key holds the wrong JSON type (a number where a string belongs).
    WrongType,
    /// `e` is not `trade`.
    WrongEventType,
    /// `s` is not an upper-case symbol.
    BadSymbol,
    /// `t` is negative.
    BadId,
    /// `T` is not a positive time.
    BadTime,
    /// `p` is not a positive finite decimal.
    BadPrice,
    /// `q` is not a positive finite decimal.
    BadQty,
    /// The trade is for a bar that is already final (SPEC §5).
    Late,
    /// The record is larger than its topic takes (SPEC §2, §9).
    TooLarge,
    /// A symbol this process does not follow: the producer did not
    /// subscribe to it, or it is not in the consumer's `--symbols` (SPEC §9).
    UnknownSymbol,
    /// The trade's partition holds `--max-symbols` symbols already (SPEC §9).
    TooManySymbols,
    /// The trade would take its bar's sums past what they hold exactly
    /// (SPEC §1): a wrong bar is never written instead.
    Overflow,
}

impl Reject {
    /// The stable name used in dead-letter headers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::MalformedJson => "malformed_json",
            Reject::MissingField => "missing_field",
            Reject::WrongType => "wrong_type",
            Reject::WrongEventType => "wrong_event_type",
            Reject::BadSymbol => "bad_symbol",
            Reject::BadId => "bad_id",
            Reject::BadTime => "bad_time",
            Reject::BadPrice => "bad_price",
            Reject::BadQty => "bad_qty",
            Reject::Late => "late",
            Reject::TooLarge => "too_large",
            Reject::UnknownSymbol => "unknown_symbol",
            Reject::TooManySymbols => "too_many_symbols",
            Reject::Overflow => "overflow",
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected payload's reason and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reject,
    pub detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: Reject, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}
