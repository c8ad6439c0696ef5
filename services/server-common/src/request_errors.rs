//! Requests a server cannot read are the caller's to fix. tonic answers a body
//! that does not decode INTERNAL (which tells the caller the server broke, and
//! that retrying may help) and one over the size limit OUT_OF_RANGE (which the
//! protos do not promise, for a limit it does not name). This layer answers both
//! INVALID_ARGUMENT, saying what was wrong and what to do about it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::server::NamedService;
use tonic::{Code, Status};

/// tonic's message for a body that prost could not decode (prost's
/// `DecodeError` display), and for a unary call with no message at all.
const UNDECODABLE_PREFIX: &str = "failed to decode Protobuf message";
const NO_MESSAGE: &str = "Missing request message.";
/// tonic's message for a request over `max_decoding_message_size`.
const TOO_LARGE_PREFIX: &str = "Error, decoded message length too large: found ";

/// The tower layer for a whole server (see [`RequestErrors`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestErrorsLayer {
    limit_setting: Option<&'static str>,
}

impl RequestErrorsLayer {
    /// `limit_setting` is the flag that sets the size limit, named in the refusal.
    pub fn new(limit_setting: Option<&'static str>) -> Self {
        Self { limit_setting }
    }
}

impl<S> tower::Layer<S> for RequestErrorsLayer {
    type Service = RequestErrors<S>;

    fn layer(&self, inner: S) -> RequestErrors<S> {
        RequestErrors {
            inner,
            limit_setting: self.limit_setting,
        }
    }
}

/// Rewrites tonic's answers to unreadable requests as INVALID_ARGUMENT. Wrap one
/// service in it (it keeps the service's name) to name that service's own
/// limit setting.
#[derive(Clone, Debug)]
pub struct RequestErrors<S> {
    inner: S,
    limit_setting: Option<&'static str>,
}

impl<S> RequestErrors<S> {
    pub fn new(inner: S, limit_setting: Option<&'static str>) -> Self {
        Self {
            inner,
            limit_setting,
        }
    }
}

impl<S: NamedService> NamedService for RequestErrors<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for RequestErrors<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().trim_start_matches('/').to_string();
        let limit_setting = self.limit_setting;
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            // The request is read before the handler runs, so its refusal is
            // always a trailers-only answer: the status is in the headers.
            if let Some(status) = Status::from_header_map(response.headers())
                && let Some(rewritten) = caller_error(&method, &status, limit_setting)
            {
                let headers = response.headers_mut();
                headers.remove("grpc-message");
                headers.remove("grpc-status-details-bin");
                if rewritten.add_header(headers).is_ok() {
                    response.extensions_mut().insert(rewritten);
                }
            }
            Ok(response)
        })
    }
}

/// The INVALID_ARGUMENT that replaces tonic's answer to an unreadable request,
/// or None when `status` is about something else.
pub fn caller_error(method: &str, status: &Status, limit_setting: Option<&str>) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::Internal if message.starts_with(UNDECODABLE_PREFIX) || message == NO_MESSAGE => {
            Some(Status::invalid_argument(format!(
                "the request to {method} is not a valid message of its request type ({message}); \
                 build it from the payledger.v1 protos this server serves (see reflection)"
            )))
        }
        Code::OutOfRange if message.starts_with(TOO_LARGE_PREFIX) => {
            let (found, limit) = sizes(message);
            let setting = limit_setting.map(|s| format!(" ({s})")).unwrap_or_default();
            Some(Status::invalid_argument(format!(
                "the request to {method} is {found} bytes, over this server's limit of {limit} \
                 bytes{setting}; split it into smaller calls"
            )))
        }
        _ => None,
    }
}

/// "found N bytes, the limit is: M bytes" → (N, M), as text ("?" if tonic's
/// wording changed, so the answer still names the refusal).
fn sizes(message: &str) -> (String, String) {
    let number_after = |marker: &str| {
        message
            .split_once(marker)
            .map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect())
            .filter(|n: &String| !n.is_empty())
            .unwrap_or_else(|| "?".to_string())
    };
    (number_after("found "), number_after("the limit is: "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undecodable_and_missing_requests_are_invalid_arguments() {
        for tonic_says in [
            "failed to decode Protobuf message: invalid wire type value: 6",
            "failed to decode Protobuf message: PublishRequest.events: buffer underflow",
            "Missing request message.",
        ] {
            let status = caller_error(
                "payledger.v1.IngestService/Publish",
                &Status::internal(tonic_says),
                None,
            )
            .expect(tonic_says);
            assert_eq!(status.code(), Code::InvalidArgument, "{tonic_says}");
            assert!(
                status
                    .message()
                    .contains("payledger.v1.IngestService/Publish")
                    && status.message().contains(tonic_says),
                "{status:?}"
            );
        }
    }

    #[test]
    fn an_oversized_request_names_its_size_the_limit_and_the_setting() {
        let tonic_says = Status::out_of_range(
            "Error, decoded message length too large: found 20512 bytes, the limit is: 16384 bytes",
        );
        let status = caller_error("m", &tonic_says, Some("--max-request-bytes")).unwrap();
        assert_eq!(status.code(), Code::InvalidArgument);
        for part in ["20512 bytes", "16384 bytes", "--max-request-bytes", "split"] {
            assert!(status.message().contains(part), "{part}: {status:?}");
        }
        let without = caller_error("m", &tonic_says, None).unwrap();
        assert!(!without.message().contains("--"), "{without:?}");
    }

    #[test]
    fn the_handlers_own_errors_are_left_alone() {
        for status in [
            Status::internal("jetstream rejected the batch: stream not found"),
            Status::out_of_range("event_time_us: beyond the dedup horizon"),
            Status::out_of_range(
                "Error, encoded message length too large: found 9 bytes, the limit is: 8 bytes",
            ),
            Status::unavailable("failed to decode Protobuf message"),
        ] {
            assert!(caller_error("m", &status, None).is_none(), "{status:?}");
        }
    }
}
