//! fastconn-core: the hot path of fastconn, with no Python in it.
//!
//! A [`Message`] enters through [`Engine::submit`] (one call per batch), is routed by the
//! [`router`] to every subscribed function, delivered over a pooled keep-alive HTTP/1.1 client
//! with bounded concurrency and retries ([`retry`]), and comes back as one [`Completion`] per
//! message through a [`CompletionSink`] once every target has a final result.
//!
//! Everything here is plain data: bytes, strings and integers. The binding crate converts and
//! wakes; it makes no decisions.

pub mod callbacks;
pub mod cloudevents;
pub mod engine;
mod framing;
pub mod headers;
mod http;
pub mod ingress;
pub mod message;
pub mod ordering;
pub mod panics;
pub mod retry;
pub mod router;
pub mod signature;
pub mod stats;
mod stream;
pub mod tls;

pub use engine::{
    check_url, Engine, EngineConfig, EngineError, IngressSlot, SubmitError, TargetSpec,
    INGRESS_TOKEN, MAX_INFLIGHT,
};
pub use message::{Completion, CompletionSink, ErrorKind, Message, TargetResult, Verdict};
pub use retry::RetryPolicy;
pub use router::{Pattern, RouteTable, Router};
pub use stats::{StatsSnapshot, LATENCY_BUCKETS};
pub use tls::{TlsConfigError, TlsSetting, TlsSettings};

#[cfg(test)]
mod tls_tests;
