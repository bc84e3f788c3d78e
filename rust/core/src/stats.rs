//! Per-function counters kept in Rust and pulled by Python on a metrics scrape: the hot path
//! pays a few atomic adds per call instead of a Python metrics call per message.

use crate::message::ErrorKind;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the invocation-duration histogram buckets (`+Inf` is implied).
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Counts by HTTP status, or by error kind for results without one.
#[derive(Debug, Default)]
struct StatusCounts {
    /// Index = status code (0..600).
    by_status: Vec<AtomicU64>,
    by_error: Mutex<HashMap<ErrorKind, u64>>,
}

impl StatusCounts {
    fn new() -> Self {
        StatusCounts {
            by_status: (0..600).map(|_| AtomicU64::new(0)).collect(),
            by_error: Mutex::new(HashMap::new()),
        }
    }

    fn add(&self, status: u16, error: ErrorKind) {
        match self.by_status.get(usize::from(status)) {
            Some(counter) if status != 0 => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                if let Ok(mut map) = self.by_error.lock() {
                    *map.entry(error).or_default() += 1;
                }
            }
        }
    }

    /// (status label, count) for every non-zero count: HTTP codes as strings, error kind labels.
    fn snapshot(&self) -> Vec<(String, u64)> {
        let mut counts: Vec<(String, u64)> = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(code, c)| {
                let n = c.load(Ordering::Relaxed);
                (n > 0).then(|| (code.to_string(), n))
            })
            .collect();
        if let Ok(map) = self.by_error.lock() {
            counts.extend(map.iter().map(|(kind, n)| (kind.label().to_owned(), *n)));
        }
        counts
    }
}

#[derive(Debug, Default)]
pub struct TargetStats {
    /// Final results.
    results: StatusCounts,
    /// Every attempt's result, retried ones included (a 503 retried into a 200 shows here).
    attempts: StatusCounts,
    /// Cumulative-per-bucket is computed at snapshot time; these are per-bucket counts, the
    /// last one being `+Inf`.
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
    retries: AtomicU64,
}

/// A copy of one function's counters at scrape time.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    pub function: String,
    /// (status label, count) of final results: HTTP codes as strings, or error kind labels.
    pub results: Vec<(String, u64)>,
    /// (status label, count) of every attempt.
    pub attempts: Vec<(String, u64)>,
    /// Cumulative counts per [`LATENCY_BUCKETS`] bound, then `+Inf`.
    pub cumulative_buckets: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
    pub retries: u64,
}

impl TargetStats {
    pub fn new() -> Self {
        TargetStats {
            results: StatusCounts::new(),
            attempts: StatusCounts::new(),
            buckets: (0..=LATENCY_BUCKETS.len())
                .map(|_| AtomicU64::new(0))
                .collect(),
            ..Default::default()
        }
    }

    /// One attempt's result, whatever comes of it (retried or final).
    pub fn record_attempt(&self, status: u16, error: ErrorKind) {
        self.attempts.add(status, error);
    }

    /// A call's final result.
    pub fn record(&self, status: u16, error: ErrorKind, latency: Duration) {
        self.results.add(status, error);
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(counter) = self.buckets.get(bucket) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self, function: &str) -> StatsSnapshot {
        let mut running = 0;
        let cumulative_buckets = self
            .buckets
            .iter()
            .map(|c| {
                running += c.load(Ordering::Relaxed);
                running
            })
            .collect();
        StatsSnapshot {
            function: function.to_owned(),
            results: self.results.snapshot(),
            attempts: self.attempts.snapshot(),
            cumulative_buckets,
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_statuses_errors_and_buckets() {
        let s = TargetStats::new();
        s.record(200, ErrorKind::None, Duration::from_micros(300));
        s.record(200, ErrorKind::None, Duration::from_millis(30));
        s.record(503, ErrorKind::None, Duration::from_secs(20));
        s.record(0, ErrorKind::Timeout, Duration::from_secs(1));
        s.record_retry();
        s.record_attempt(503, ErrorKind::None);
        s.record_attempt(200, ErrorKind::None);
        s.record_attempt(0, ErrorKind::Timeout);
        let snap = s.snapshot("f");
        let mut attempts = snap.attempts.clone();
        attempts.sort();
        assert_eq!(
            attempts,
            vec![("200".into(), 1), ("503".into(), 1), ("timeout".into(), 1)]
        );
        let mut results = snap.results.clone();
        results.sort();
        assert_eq!(
            results,
            vec![("200".into(), 2), ("503".into(), 1), ("timeout".into(), 1)]
        );
        assert_eq!(snap.count, 4);
        assert_eq!(snap.retries, 1);
        assert_eq!(snap.cumulative_buckets.first(), Some(&1));
        assert_eq!(snap.cumulative_buckets.last(), Some(&4));
        assert_eq!(
            snap.cumulative_buckets[LATENCY_BUCKETS.len() - 1],
            3,
            "20 s is only in +Inf"
        );
    }
}
