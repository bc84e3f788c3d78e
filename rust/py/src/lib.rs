//! `fastconn._core`: the thin PyO3 layer over fastconn-core. It converts batches of plain
//! Python values into core messages, and turns completions back into tuples on the event loop
//! thread. It makes no decisions and never calls Python from a tokio thread.

mod completions;
mod runtime;

use pyo3::prelude::*;

// Completions are allocated on tokio threads and freed on the event-loop thread; glibc's
// arenas make that cross-thread free expensive (it showed as ~12% of the loop thread's time).
// `local_dynamic_tls`: this library is loaded with dlopen, which the default TLS model breaks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<runtime::Runtime>()?;
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
