//! The AUTO routing rule (docs/query-routing.md, "AUTO") as a pure function: which
//! source answers a merchant-day, and why. The gRPC handler gathers what it knows
//! (the covering commit's rows, the stream's rows) and asks [`auto_source`].

/// What AUTO knows of one stream row of the merchant-day.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StreamRow<'a> {
    pub currency: &'a str,
    pub log_position: u64,
}

/// The commit covering the day under the union rule (docs/storage.md, commits),
/// when the service has a store.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CoveringCommit<'a> {
    pub log_cutoff: u64,
    /// The currencies of the snapshot's rows for the merchant-day (none: it has no rows).
    pub currencies: &'a [&'a str],
}

/// The source of an AUTO answer. A stream answer with no stream rows is NOT_FOUND.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AutoSource {
    Snapshot,
    Stream(WhyStream),
}

/// Why the stream answers rather than a snapshot, in the order the rule checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WhyStream {
    /// No commit covers the day, or the service has no `--store`.
    NoCommitCoversTheDay,
    /// Condition 1: the snapshot has no rows for the merchant-day.
    SnapshotHasNoRows,
    /// Condition 2: a stream row's `log_position` is above the commit's cutoff.
    StreamPastCutoff,
    /// Condition 3: the stream has a currency the snapshot lacks.
    CurrencyOnlyInStream,
}

/// The AUTO rule of docs/query-routing.md: the covering snapshot answers when it
/// has rows for the merchant-day (1), no stream row is past its cutoff (2), and
/// every stream currency is in it (3); the stream answers otherwise. A currency
/// only in the snapshot does not stop it from answering.
pub(crate) fn auto_source(
    covering: Option<CoveringCommit<'_>>,
    stream: &[StreamRow<'_>],
) -> AutoSource {
    let Some(commit) = covering else {
        return AutoSource::Stream(WhyStream::NoCommitCoversTheDay);
    };
    if commit.currencies.is_empty() {
        AutoSource::Stream(WhyStream::SnapshotHasNoRows)
    } else if stream.iter().any(|r| r.log_position > commit.log_cutoff) {
        AutoSource::Stream(WhyStream::StreamPastCutoff)
    } else if stream
        .iter()
        .any(|r| !commit.currencies.contains(&r.currency))
    {
        AutoSource::Stream(WhyStream::CurrencyOnlyInStream)
    } else {
        AutoSource::Snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::{AutoSource, CoveringCommit, StreamRow, WhyStream, auto_source};

    fn row(currency: &str, log_position: u64) -> StreamRow<'_> {
        StreamRow {
            currency,
            log_position,
        }
    }

    fn covered<'a>(log_cutoff: u64, currencies: &'a [&'a str]) -> Option<CoveringCommit<'a>> {
        Some(CoveringCommit {
            log_cutoff,
            currencies,
        })
    }

    /// Every row of the rule as docs/query-routing.md states it, and its edges.
    #[test]
    fn auto_routes_as_the_rule_states() {
        use AutoSource::{Snapshot, Stream};
        use WhyStream::*;
        let eur = row("EUR", 100);
        let cases: &[(&str, Option<CoveringCommit>, &[StreamRow], AutoSource)] = &[
            (
                "no store or no commit covers the day",
                None,
                &[eur],
                Stream(NoCommitCoversTheDay),
            ),
            ("nothing at all", None, &[], Stream(NoCommitCoversTheDay)),
            (
                "1: snapshot without rows",
                covered(200, &[]),
                &[eur],
                Stream(SnapshotHasNoRows),
            ),
            (
                "1: neither side has rows",
                covered(200, &[]),
                &[],
                Stream(SnapshotHasNoRows),
            ),
            ("all hold", covered(200, &["EUR"]), &[eur], Snapshot),
            (
                "2: stream row at the cutoff",
                covered(100, &["EUR"]),
                &[eur],
                Snapshot,
            ),
            (
                "2: stream row past the cutoff",
                covered(99, &["EUR"]),
                &[eur],
                Stream(StreamPastCutoff),
            ),
            (
                "2: one of two stream rows past it",
                covered(150, &["EUR", "USD"]),
                &[eur, row("USD", 151)],
                Stream(StreamPastCutoff),
            ),
            (
                "3: currency only in the stream",
                covered(200, &["EUR"]),
                &[eur, row("USD", 50)],
                Stream(CurrencyOnlyInStream),
            ),
            (
                "2 before 3",
                covered(99, &["EUR"]),
                &[eur, row("USD", 50)],
                Stream(StreamPastCutoff),
            ),
            (
                "currency only in the snapshot",
                covered(200, &["EUR", "GBP"]),
                &[eur],
                Snapshot,
            ),
            (
                "snapshot rows, no stream rows",
                covered(200, &["EUR"]),
                &[],
                Snapshot,
            ),
        ];
        for (name, snapshots, stream, expected) in cases {
            assert_eq!(auto_source(*snapshots, stream), *expected, "{name}");
        }
    }
}
