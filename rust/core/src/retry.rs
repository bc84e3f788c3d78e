//! When to retry a call and how long to wait: exponential backoff with full jitter, bounded by
//! `max_attempts` and `backoff_max`, honouring `Retry-After` on 429/503.

use crate::message::ErrorKind;
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts including the first; 1 disables retries.
    pub max_attempts: u32,
    /// HTTP statuses that are worth another attempt.
    pub retry_on: Vec<u16>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            retry_on: vec![408, 429, 500, 502, 503, 504],
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What to do after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Success,
    /// Try again after this long.
    RetryAfter(Duration),
    /// Retryable, but the attempts are spent: the source should redeliver later.
    Exhausted,
    /// Not worth retrying (e.g. 400, 404).
    Final,
}

impl RetryPolicy {
    /// Whether an attempt that ended with `status` (0 = no response) and `error` may succeed
    /// if tried again.
    pub fn is_retryable(&self, status: u16, error: ErrorKind) -> bool {
        match error {
            ErrorKind::Connect | ErrorKind::Timeout | ErrorKind::Io => true,
            // A function that breaks HTTP/1.1 framing does so again on the next attempt; a
            // certificate problem is configuration, not a transient fault.
            ErrorKind::InvalidRequest
            | ErrorKind::Internal
            | ErrorKind::Protocol
            | ErrorKind::Tls => false,
            ErrorKind::None => self.retry_on.contains(&status),
        }
    }

    /// Decides after attempt number `attempt` (1-based).
    pub fn decide(
        &self,
        attempt: u32,
        status: u16,
        error: ErrorKind,
        retry_after: Option<Duration>,
    ) -> Decision {
        if error == ErrorKind::None && (200..300).contains(&status) {
            return Decision::Success;
        }
        if !self.is_retryable(status, error) {
            return Decision::Final;
        }
        if attempt >= self.max_attempts {
            return Decision::Exhausted;
        }
        Decision::RetryAfter(match retry_after {
            Some(wait) => wait.min(self.backoff_max),
            None => self.backoff(attempt),
        })
    }

    /// Full jitter: uniform in `[0, min(backoff_max, initial * 2^(attempt-1))]`, so a burst of
    /// failures does not come back as a synchronized burst of retries.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(0..=nanos))
    }

    /// The upper bound of the jittered backoff after `attempt`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        self.backoff_initial
            .checked_mul(1u32 << exponent.min(31))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP date (RFC 9110 §10.2.3). A date in
/// the past means "now".
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            retry_on: vec![429, 503],
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(1),
        }
    }

    #[test]
    fn success_and_final() {
        let p = policy();
        assert_eq!(p.decide(1, 200, ErrorKind::None, None), Decision::Success);
        assert_eq!(p.decide(1, 204, ErrorKind::None, None), Decision::Success);
        assert_eq!(p.decide(1, 400, ErrorKind::None, None), Decision::Final);
        assert_eq!(p.decide(1, 404, ErrorKind::None, None), Decision::Final);
        assert_eq!(
            p.decide(1, 500, ErrorKind::None, None),
            Decision::Final,
            "500 not in retry_on"
        );
        assert_eq!(
            p.decide(1, 0, ErrorKind::InvalidRequest, None),
            Decision::Final
        );
        assert_eq!(
            p.decide(1, 0, ErrorKind::Protocol, None),
            Decision::Final,
            "a response that breaks HTTP/1.1 is not retried"
        );
        assert!(!p.is_retryable(0, ErrorKind::Protocol));
    }

    #[test]
    fn retryable_until_exhausted() {
        let p = policy();
        for (status, error) in [
            (503, ErrorKind::None),
            (0, ErrorKind::Connect),
            (0, ErrorKind::Timeout),
        ] {
            for attempt in 1..4 {
                assert!(matches!(
                    p.decide(attempt, status, error, None),
                    Decision::RetryAfter(_)
                ));
            }
            assert_eq!(p.decide(4, status, error, None), Decision::Exhausted);
        }
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(3), Duration::from_millis(400));
        assert_eq!(p.ceiling(10), Duration::from_secs(1));
        assert_eq!(p.ceiling(1000), Duration::from_secs(1));
        let samples: Vec<Duration> = (0..1000).map(|_| p.backoff(3)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_millis(400)));
        let distinct: std::collections::HashSet<_> = samples.iter().collect();
        assert!(distinct.len() > 100, "full jitter spreads the delays");
    }

    #[test]
    fn retry_after_is_honoured_and_capped() {
        let p = policy();
        let d = p.decide(1, 429, ErrorKind::None, Some(Duration::from_millis(700)));
        assert_eq!(d, Decision::RetryAfter(Duration::from_millis(700)));
        let d = p.decide(1, 503, ErrorKind::None, Some(Duration::from_secs(120)));
        assert_eq!(d, Decision::RetryAfter(Duration::from_secs(1)));
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
    }
}
