//! The archive's Parquet column names (docs/storage.md, "Column contract"), written
//! once: the archive writer, its readers and the SQL of other engines (`e2e/sql/`,
//! checked against a written segment by `e2e/tests/archive_sql.rs`) use these.

/// `archive/events/p{N}/…`, in file order.
pub mod events {
    pub const SEQ: &str = "seq";
    pub const PARTITION: &str = "partition";
    pub const RECORD_TYPE: &str = "record_type";
    pub const EVENT_ID: &str = "event_id";
    pub const MERCHANT_ID: &str = "merchant_id";
    pub const KIND: &str = "kind";
    pub const AMOUNT_MINOR: &str = "amount_minor";
    pub const CURRENCY: &str = "currency";
    pub const EVENT_TIME: &str = "event_time";
    pub const CORRECTS_EVENT_ID: &str = "corrects_event_id";
    pub const INGEST_TIME: &str = "ingest_time";

    pub const ALL: [&str; 11] = [
        SEQ,
        PARTITION,
        RECORD_TYPE,
        EVENT_ID,
        MERCHANT_ID,
        KIND,
        AMOUNT_MINOR,
        CURRENCY,
        EVENT_TIME,
        CORRECTS_EVENT_ID,
        INGEST_TIME,
    ];

    /// The values of [`RECORD_TYPE`].
    pub const FACT: &str = "fact";
    pub const HEARTBEAT: &str = "heartbeat";
}

/// `archive/dims/…`, in file order.
pub mod dims {
    pub const SEQ: &str = "seq";
    pub const DIM_TYPE: &str = "dim_type";
    pub const CURRENCY: &str = "currency";
    pub const RATE: &str = "rate";
    pub const MERCHANT_ID: &str = "merchant_id";
    pub const TIER: &str = "tier";
    pub const RESERVE_BPS: &str = "reserve_bps";
    pub const EFFECTIVE_DATE: &str = "effective_date";
    pub const VERSION: &str = "version";
    pub const INGEST_TIME: &str = "ingest_time";

    pub const ALL: [&str; 10] = [
        SEQ,
        DIM_TYPE,
        CURRENCY,
        RATE,
        MERCHANT_ID,
        TIER,
        RESERVE_BPS,
        EFFECTIVE_DATE,
        VERSION,
        INGEST_TIME,
    ];

    /// The values of [`DIM_TYPE`].
    pub const FX: &str = "fx";
    pub const RISK: &str = "risk";
}
