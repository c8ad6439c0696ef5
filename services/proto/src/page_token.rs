//! Page tokens of `ListDailyExposure` (docs/query-routing.md, "Listing").
//!
//! A token is the last merchant-day of a page, bound to the query that produced
//! it: it carries a hash of every request parameter that shapes the listing
//! (merchant filter, day range, consistency; not the page size, which a client may
//! change between pages) and a checksum over all of it. So a token sent with
//! another query is refused instead of resuming at a position that query never
//! reached (it used to answer an empty page), and a corrupted or hand-edited token
//! is refused instead of listing from wherever it happens to point.
//!
//! The checksum is unkeyed on purpose. A token grants nothing: whoever can list a
//! range can ask for any position in it directly with `merchant_id` and
//! `from_day`, so a client that computes a valid checksum gains no rows it could
//! not already read, and the position is still checked against the query. Without
//! a key there is no secret to share between query replicas or to rotate, and a
//! token stays valid across restarts and rolling updates. The leading version byte
//! lets a later layout (a keyed one, say) refuse this one cleanly.
//!
//! Layout, then base64url without padding: `version: u8 | query: u64 LE | day: i32
//! LE | merchant_id: UTF-8 | checksum: u64 LE` (the checksum over every byte before
//! it).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use payledger_semantics::Day;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const VERSION: u8 = 1;
/// Seeds keep the two hashes apart, so a query hash is never a valid checksum.
const QUERY_SEED: u64 = 0x7061_6765_5f71_7279;
const CHECKSUM_SEED: u64 = 0x7061_6765_5f73_756d;
const FIXED_LEN: usize = 1 + 8 + 4 + 8;

/// What a listing is over: every parameter but the page token and the page size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageQuery<'a> {
    /// Empty: every merchant.
    pub merchant_id: &'a str,
    pub from_day: Day,
    pub to_day: Day,
    /// The resolved consistency (`Unspecified` already read as `Auto`).
    pub consistency: i32,
}

/// The last merchant-day a page held; the next page starts after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagePosition {
    pub merchant_id: String,
    pub day: Day,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    #[error("page_token: page token is not valid; start without one")]
    NotValid,
    #[error(
        "page_token: page token belongs to another query (another merchant, day range or consistency); start without one"
    )]
    OtherQuery,
}

impl PageTokenError {
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::invalid_argument(self.to_string())
    }
}

impl PageQuery<'_> {
    fn hash(&self) -> u64 {
        let mut bytes = Vec::with_capacity(8 + self.merchant_id.len() + 12);
        // The length first, so that no two filters give the same bytes.
        bytes.extend_from_slice(&(self.merchant_id.len() as u64).to_le_bytes());
        bytes.extend_from_slice(self.merchant_id.as_bytes());
        bytes.extend_from_slice(&self.from_day.0.to_le_bytes());
        bytes.extend_from_slice(&self.to_day.0.to_le_bytes());
        bytes.extend_from_slice(&self.consistency.to_le_bytes());
        xxh3_64_with_seed(&bytes, QUERY_SEED)
    }

    /// Whether a listing of this query can have stopped at `position`.
    fn holds(&self, position: &PagePosition) -> bool {
        (self.merchant_id.is_empty() || self.merchant_id == position.merchant_id)
            && self.from_day <= position.day
            && position.day <= self.to_day
    }
}

/// The token of the page of `query` that ended at `after`.
pub fn encode_page_token(query: &PageQuery<'_>, after: &PagePosition) -> String {
    let mut bytes = Vec::with_capacity(FIXED_LEN + after.merchant_id.len());
    bytes.push(VERSION);
    bytes.extend_from_slice(&query.hash().to_le_bytes());
    bytes.extend_from_slice(&after.day.0.to_le_bytes());
    bytes.extend_from_slice(after.merchant_id.as_bytes());
    let checksum = xxh3_64_with_seed(&bytes, CHECKSUM_SEED);
    bytes.extend_from_slice(&checksum.to_le_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Where the next page of `query` starts: `None` for an empty token (the first
/// page), else the position the token's page ended at.
pub fn decode_page_token(
    query: &PageQuery<'_>,
    token: &str,
) -> Result<Option<PagePosition>, PageTokenError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| PageTokenError::NotValid)?;
    if bytes.len() < FIXED_LEN || bytes[0] != VERSION {
        return Err(PageTokenError::NotValid);
    }
    let (body, checksum) = bytes.split_at(bytes.len() - 8);
    if xxh3_64_with_seed(body, CHECKSUM_SEED).to_le_bytes() != checksum {
        return Err(PageTokenError::NotValid);
    }
    let query_hash = u64::from_le_bytes(body[1..9].try_into().expect("8 bytes"));
    if query_hash != query.hash() {
        return Err(PageTokenError::OtherQuery);
    }
    let day = Day(i32::from_le_bytes(body[9..13].try_into().expect("4 bytes")));
    let merchant_id =
        String::from_utf8(body[13..].to_vec()).map_err(|_| PageTokenError::NotValid)?;
    let position = PagePosition { merchant_id, day };
    if !query.holds(&position) {
        return Err(PageTokenError::NotValid);
    }
    Ok(Some(position))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(merchant_id: &str, from: i32, to: i32) -> PageQuery<'_> {
        PageQuery {
            merchant_id,
            from_day: Day(from),
            to_day: Day(to),
            consistency: 1,
        }
    }

    fn at(merchant_id: &str, day: i32) -> PagePosition {
        PagePosition {
            merchant_id: merchant_id.to_string(),
            day: Day(day),
        }
    }

    #[test]
    fn a_token_resumes_its_own_query() {
        for (q, p) in [
            (query("", 20_000, 20_030), at("m-00001", 20_010)),
            (query("m-7", 20_000, 20_000), at("m-7", 20_000)),
            (query("", 20_000, 20_030), at("", 20_030)),
        ] {
            let token = encode_page_token(&q, &p);
            assert_eq!(decode_page_token(&q, &token), Ok(Some(p)));
        }
        assert_eq!(decode_page_token(&query("", 1, 2), ""), Ok(None));
    }

    #[test]
    fn another_query_is_refused() {
        let q = query("", 20_000, 20_030);
        let token = encode_page_token(&q, &at("m-1", 20_010));
        let others = [
            query("", 20_001, 20_030),
            query("", 20_000, 20_029),
            query("m-1", 20_000, 20_030),
            PageQuery {
                consistency: 2,
                ..q.clone()
            },
        ];
        for other in others {
            assert_eq!(
                decode_page_token(&other, &token),
                Err(PageTokenError::OtherQuery),
                "{other:?}"
            );
        }
    }

    #[test]
    fn corrupted_and_forged_tokens_are_refused() {
        let q = query("", 20_000, 20_030);
        let token = encode_page_token(&q, &at("m-1", 20_010));
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        // The day moved by one, checksum left as it was.
        bytes[9] ^= 1;
        let edited = URL_SAFE_NO_PAD.encode(&bytes);
        // What the query service issued before tokens were bound.
        let unbound = format!("{}.2026-11-25", URL_SAFE_NO_PAD.encode("m-1"));
        let mut wrong_version = URL_SAFE_NO_PAD.decode(&token).unwrap();
        wrong_version[0] = 2;
        for bad in [
            edited,
            unbound,
            URL_SAFE_NO_PAD.encode(wrong_version),
            token[..token.len() - 2].to_string(),
            "!!".to_string(),
            "AA".to_string(),
        ] {
            assert_eq!(
                decode_page_token(&q, &bad),
                Err(PageTokenError::NotValid),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_well_formed_token_outside_its_query_is_refused() {
        // A token whose checksum and query hash are right but whose position the
        // query cannot reach: computed by hand, since the service never issues one.
        let q = query("m-1", 20_000, 20_030);
        for p in [at("m-1", 20_031), at("m-2", 20_010)] {
            let token = encode_page_token(&q, &p);
            assert_eq!(decode_page_token(&q, &token), Err(PageTokenError::NotValid));
        }
    }
}
