//! `fastconn._core`: the thin PyO3 layer over fastconn-core. It converts batches of plain
//! Python values into core messages, and turns completions back into tuples on the event loop
//! thread. It makes no decisions and never calls Python from a tokio thread.

mod completions;
mod runtime;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<runtime::Runtime>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add(
        "build_profile",
        if cfg!(debug_assertions) { "debug" } else { "release" },
    )?;
    m.add("LATENCY_BUCKETS", fastconn_core::LATENCY_BUCKETS.to_vec())?;
    Ok(())
}
