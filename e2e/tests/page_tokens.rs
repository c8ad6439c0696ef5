//! ListDailyExposure's page tokens against the real query binary: a token resumes
//! the query it came from (also with another page size), and is refused with
//! INVALID_ARGUMENT when sent with another query or when it was not issued by the
//! service (docs/query-routing.md, "Listing").

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use payledger_e2e::{AcceptedLog, Harness, assert_converges, ingest_client, now_us, query_client};
use payledger_proto::v1;
use payledger_semantics::{Day, MICROS_PER_DAY, Settings};
use tonic::Code;
use tonic::transport::Channel;
use v1::query_service_client::QueryServiceClient;

const MERCHANTS: [&str; 3] = ["m-a", "m-b", "m-c"];

fn request(
    merchant_id: &str,
    from: Day,
    to: Day,
    page_size: u32,
    page_token: &str,
) -> v1::ListDailyExposureRequest {
    v1::ListDailyExposureRequest {
        merchant_id: merchant_id.to_string(),
        from_day: from.to_string(),
        to_day: to.to_string(),
        consistency: v1::Consistency::Provisional as i32,
        page_size,
        page_token: page_token.to_string(),
    }
}

async fn refused(
    client: &mut QueryServiceClient<Channel>,
    request: v1::ListDailyExposureRequest,
    message: &str,
) -> anyhow::Result<()> {
    let status = client
        .list_daily_exposure(request.clone())
        .await
        .expect_err("the token is refused");
    anyhow::ensure!(
        status.code() == Code::InvalidArgument && status.message().contains(message),
        "{request:?}: expected INVALID_ARGUMENT \"{message}\", got {status:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_token_resumes_only_its_own_query() -> anyhow::Result<()> {
    let mut h = Harness::start()?;
    let ingest = h
        .spawn("payledger-ingest", &["--heartbeat-interval", "0s"])
        .await?;
    let store = h.store();
    let _projector = h.spawn("payledger-projector", &["--store", &store]).await?;
    let query = h.spawn("payledger-query", &[]).await?;

    // Two days of each merchant: six merchant-days.
    let now = now_us();
    let events: Vec<v1::Event> = MERCHANTS
        .iter()
        .flat_map(|m| {
            [0, 1].map(|days_ago| v1::Event {
                event_id: format!("ev-{days_ago}"),
                merchant_id: m.to_string(),
                kind: v1::EventKind::PaymentCaptured as i32,
                amount_minor: 1_000,
                currency: "EUR".into(),
                event_time_us: now - days_ago * MICROS_PER_DAY,
                corrects_event_id: String::new(),
            })
        })
        .collect();
    let mut log = AcceptedLog::default();
    log.publish(&mut ingest_client(&ingest.url()).await?, events)
        .await?;
    assert_eq!(log.records.len(), 6);
    let mut client = query_client(&query.url()).await?;
    assert_converges(
        &mut client,
        &log.fold(Settings::default())?,
        Duration::from_secs(60),
    )
    .await?;

    let today = Day::of_micros(now);
    let (from, to) = (Day(today.0 - 1), today);
    // Pages of 2, then of 3: the page size is not part of the query.
    let first = client
        .list_daily_exposure(request("", from, to, 2, ""))
        .await?
        .into_inner();
    assert_eq!(first.items.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let token = first.next_page_token.clone();
    let second = client
        .list_daily_exposure(request("", from, to, 3, &token))
        .await?
        .into_inner();
    assert_eq!(second.items.len(), 3);
    let third = client
        .list_daily_exposure(request("", from, to, 3, &second.next_page_token))
        .await?
        .into_inner();
    assert!(third.next_page_token.is_empty());
    let listed: Vec<(String, String)> = [first.items, second.items, third.items]
        .concat()
        .into_iter()
        .map(|i| (i.merchant_id, i.day))
        .collect();
    let expected: Vec<(String, String)> = MERCHANTS
        .iter()
        .flat_map(|m| [from, to].map(|d| (m.to_string(), d.to_string())))
        .collect();
    assert_eq!(listed, expected);

    // The same token with another range, merchant or consistency.
    let another = "page token belongs to another query";
    refused(
        &mut client,
        request("", from, Day(to.0 + 1), 2, &token),
        another,
    )
    .await?;
    refused(&mut client, request("", to, to, 2, &token), another).await?;
    refused(&mut client, request("m-a", from, to, 2, &token), another).await?;
    let mut authoritative = request("", from, to, 2, &token);
    authoritative.consistency = v1::Consistency::Auto as i32;
    refused(&mut client, authoritative, another).await?;

    // Tokens the service did not issue: edited, truncated, the unbound form of
    // earlier releases, and garbage.
    let not_valid = "page token is not valid";
    let mut bytes = URL_SAFE_NO_PAD.decode(&token)?;
    bytes[10] ^= 0x01;
    let forged = [
        URL_SAFE_NO_PAD.encode(&bytes),
        token[..token.len() - 4].to_string(),
        format!("{}.{to}", URL_SAFE_NO_PAD.encode("m-b")),
        "not a token".to_string(),
    ];
    for bad in forged {
        refused(&mut client, request("", from, to, 2, &bad), not_valid).await?;
    }
    Ok(())
}
