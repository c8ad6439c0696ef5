//! What a server built by `serve_grpc` answers a request it cannot read, over a
//! real connection, so that a change in tonic's own answers shows here.

use bytes::{Buf, BufMut, Bytes};
use payledger_server_common::serve::{ServerOptions, serve_grpc};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

#[derive(Clone, Copy, Default)]
struct RawCodec;
struct RawEncoder;
struct RawDecoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

const HEALTH_CHECK: &str = "/grpc.health.v1.Health/Check";

/// A server of health and reflection only, on a free loopback port; it stops
/// when the returned sender is dropped.
async fn server() -> (String, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = ServerOptions {
        max_request_bytes: 1 << 20,
        concurrency_per_connection: 16,
        tokens: None,
        tls: Default::default(),
        serving_while: Vec::new(),
    };
    tokio::spawn(async move {
        serve_grpc(None, &[], listener, &options, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    (url, stop)
}

async fn raw_call(url: &str, path: &'static str, body: Bytes) -> Result<Bytes, Status> {
    let channel = loop {
        match Channel::from_shared(url.to_string())
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => break channel,
            // The server task may not be accepting yet.
            Err(_) => tokio::task::yield_now().await,
        }
    };
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(usize::MAX);
    grpc.ready().await.unwrap();
    grpc.unary(
        Request::new(body),
        PathAndQuery::from_static(path),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_body_that_does_not_decode_is_invalid_argument_naming_the_method() {
    let (url, _stop) = server().await;
    // The codec works: an empty body is a valid (empty) HealthCheckRequest.
    raw_call(&url, HEALTH_CHECK, Bytes::new())
        .await
        .expect("an empty HealthCheckRequest is answered");
    for garbage in [&b"\x0a\xff"[..], &b"this is not a protobuf message"[..]] {
        let status = raw_call(&url, HEALTH_CHECK, Bytes::from_static(garbage))
            .await
            .expect_err("garbage is refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().contains("grpc.health.v1.Health/Check")
                && status.message().contains("failed to decode"),
            "{status:?}"
        );
    }
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_invalid_argument_naming_the_limit() {
    let (url, _stop) = server().await;
    // tonic's default limit for a service that sets none: 4 MiB.
    let limit = 4 << 20;
    let status = raw_call(&url, HEALTH_CHECK, Bytes::from(vec![0u8; limit + 1]))
        .await
        .expect_err("a request over the limit is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    for part in [format!("{} bytes", limit + 1), format!("{limit} bytes")] {
        assert!(status.message().contains(&part), "{part}: {status:?}");
    }
}
