//! ListDailyExposure's page tokens (`payledger_proto::page_token`): any token is
//! refused with an error, or names a position of its query and is exactly the
//! token the service issues for it; every issued token resumes its own query.
//!
//! The input is text, one field a line: merchant filter, from day, to day,
//! consistency, token, then a position (merchant, day) to issue a token for. Days
//! are day numbers, so the fuzzer reaches every one, not only those that parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use payledger_proto::page_token::{
    PagePosition, PageQuery, PageTokenError, decode_page_token, encode_page_token,
};
use payledger_semantics::Day;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let mut fields = text.split('\n');
    let mut next = || fields.next().unwrap_or_default();
    let number = |s: &str| s.parse::<i32>().unwrap_or_default();
    let merchant_id = next();
    let (from, to, consistency) = (number(next()), number(next()), number(next()));
    let token = next();
    let (after_merchant, after_day) = (next().to_string(), number(next()));
    let query = PageQuery {
        merchant_id,
        from_day: Day(from),
        to_day: Day(to),
        consistency,
    };
    if let Ok(Some(position)) = decode_page_token(&query, token) {
        assert_eq!(encode_page_token(&query, &position), token, "canonical");
    }
    let within = (merchant_id.is_empty() || merchant_id == after_merchant)
        && from <= after_day
        && after_day <= to;
    let position = PagePosition {
        merchant_id: after_merchant,
        day: Day(after_day),
    };
    let issued = encode_page_token(&query, &position);
    let expected = if within {
        Ok(Some(position))
    } else {
        Err(PageTokenError::NotValid)
    };
    assert_eq!(decode_page_token(&query, &issued), expected);
});
