//! `fastconn._core`: the thin PyO3 layer over fastconn-core. It converts batches of plain
//! Python values into core messages, and turns completions back into tuples on the event loop
//! thread. It makes no decisions and never calls Python from a tokio thread.

mod cloudevents;
mod completions;
mod ingress;
mod runtime;

use fastconn_core::TlsSettings;
use pyo3::prelude::*;
use std::path::PathBuf;

// Completions are allocated on tokio threads and freed on the event-loop thread; glibc's
// arenas make that cross-thread free expensive (it showed as ~12% of the loop thread's time).
// `local_dynamic_tls`: this library is loaded with dlopen, which the default TLS model breaks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<runtime::Runtime>()?;
    m.add_function(wrap_pyfunction!(validate_url, m)?)?;
    m.add_function(wrap_pyfunction!(check_tls, m)?)?;
    m.add_function(wrap_pyfunction!(check_server_tls, m)?)?;
    m.add_function(wrap_pyfunction!(cloudevents::cloudevents_calls, m)?)?;
    m.add_function(wrap_pyfunction!(cloudevents::cloudevents_reply, m)?)?;
    m.add_function(wrap_pyfunction!(cloudevents::verify_signature, m)?)?;
    m.add_function(wrap_pyfunction!(cloudevents::cloudevents_replies, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "build_profile",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    m.add("LATENCY_BUCKETS", fastconn_core::LATENCY_BUCKETS.to_vec())?;
    m.add(
        "RESERVED_HEADERS",
        fastconn_core::headers::RESERVED.to_vec(),
    )?;
    m.add(
        "HOP_BY_HOP_HEADERS",
        fastconn_core::headers::HOP_BY_HOP.to_vec(),
    )?;
    m.add("MAX_INFLIGHT", fastconn_core::MAX_INFLIGHT)?;
    Ok(())
}

/// Why the dispatcher cannot call `url`, or None when it can: configuration checks ask here so
/// they accept exactly the URLs the running dispatcher accepts.
#[pyfunction]
fn validate_url(url: &str) -> Option<String> {
    fastconn_core::check_url(url).err()
}

/// The first problem with the TLS files as (setting, message), e.g. ("tls_key", "..."), or None
/// when the dispatcher will accept them. Reads the files; does not load the system's roots.
#[pyfunction]
#[pyo3(signature = (*, ca=None, cert=None, key=None))]
fn check_tls(
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
) -> Option<(&'static str, String)> {
    let settings = TlsSettings {
        ca_file: ca,
        cert_file: cert,
        key_file: key,
        insecure_skip_verify: false,
    };
    settings
        .validate()
        .err()
        .map(|e| (e.setting.name(), e.message))
}

/// The first problem with the listener's certificate and key (`[server] tls_cert` / `tls_key`)
/// as (setting, message), or None when the ingress will serve with them: missing or unreadable
/// files, no PEM, a key that is not the certificate's.
#[pyfunction]
#[pyo3(signature = (*, cert=None, key=None))]
fn check_server_tls(cert: Option<PathBuf>, key: Option<PathBuf>) -> Option<(&'static str, String)> {
    fastconn_core::ingress::tls::check_server_tls(cert.as_deref(), key.as_deref())
        .map(|e| (e.setting.name(), e.message))
}
