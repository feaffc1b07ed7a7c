//! The bandwidth limit: one token bucket per store, shared by every transfer and every part.
//!
//! A token is a byte on the wire. `acquire(n)` *reserves* its tokens at once, letting the
//! bucket go into debt, and then sleeps until the debt is paid off at `rate`: callers are
//! served in the order they asked (no starvation, no spinning), and however many threads
//! share the bucket, the bytes granted in any interval of `t` seconds never exceed
//! `burst + rate * t`. A request larger than the burst is taken in pieces of at most the
//! burst, so one huge read cannot borrow more than the bucket holds. The sleep is cut into
//! short slices so a cancelled transfer (or Ctrl-C) does not sit out a long wait; a cancelled
//! reservation gives its tokens back.
//!
//! The burst is `max(MIN_BURST, rate / BURST_DIVISOR)`: small enough that a transfer of
//! `size` bytes takes at least `(size - max(1 MiB, rate/8)) / rate`, which is what the
//! contract promises (24 MiB at 8 MiB/s: >= 2.9 s), large enough that the 1 MiB blocks the
//! HTTP bodies are cut into cost one or two reservations each.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyIterator;

use crate::cancel::CancelToken;
use crate::error::{CoreError, CoreResult};

/// The smallest burst, whatever the rate.
pub const MIN_BURST: u64 = 512 << 10;
/// The burst is `rate / BURST_DIVISOR` above `MIN_BURST * BURST_DIVISOR` bytes/s.
pub const BURST_DIVISOR: u64 = 16;
/// Longest single sleep: how long a cancelled wait may take to notice.
const SLICE: Duration = Duration::from_millis(50);

/// Time as the bucket sees it; a fake one makes the arithmetic testable without waiting.
pub trait Clock: Send + Sync {
    /// Time since an arbitrary, fixed origin.
    fn now(&self) -> Duration;
    fn sleep(&self, duration: Duration);
}

pub struct MonotonicClock {
    origin: Instant,
}

impl Default for MonotonicClock {
    fn default() -> Self {
        MonotonicClock { origin: Instant::now() }
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

struct Level {
    /// Tokens available now; negative when callers are waiting for tokens not yet earned.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    stamp: Duration,
}

pub fn burst_for(rate: u64) -> u64 {
    (rate / BURST_DIVISOR).max(MIN_BURST)
}

pub struct TokenBucket<C: Clock = MonotonicClock> {
    rate: u64,
    burst: u64,
    level: Mutex<Level>,
    granted: AtomicU64,
    clock: C,
}

impl TokenBucket<MonotonicClock> {
    pub fn new(rate: u64) -> CoreResult<Self> {
        Self::with_clock(rate, MonotonicClock::default())
    }
}

impl<C: Clock> TokenBucket<C> {
    /// A full bucket of `rate` bytes per second (`rate` > 0).
    pub fn with_clock(rate: u64, clock: C) -> CoreResult<Self> {
        if rate == 0 {
            return Err(CoreError::InvalidArgument(
                "the rate limit must be a positive number of bytes per second (no limiter at all means unlimited)"
                    .into(),
            ));
        }
        let burst = burst_for(rate);
        let stamp = clock.now();
        Ok(TokenBucket {
            rate,
            burst,
            level: Mutex::new(Level { tokens: burst as f64, stamp }),
            granted: AtomicU64::new(0),
            clock,
        })
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Bytes granted so far (reservations that were cancelled are not counted).
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Level> {
        // The level is two numbers always left consistent: a panic elsewhere cannot corrupt it.
        self.level.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Take `n` (<= burst) tokens now, going into debt if need be; returns the moment (on
    /// the clock) by which they are earned, i.e. when the caller may send its bytes.
    fn reserve(&self, n: u64) -> Duration {
        let mut level = self.lock();
        // Read under the lock, so the stamps of successive reservations never go back.
        let now = self.clock.now().max(level.stamp);
        let earned = (now - level.stamp).as_secs_f64() * self.rate as f64;
        level.tokens = (level.tokens + earned).min(self.burst as f64);
        level.stamp = now;
        level.tokens -= n as f64;
        if level.tokens >= 0.0 {
            now
        } else {
            now + Duration::from_secs_f64(-level.tokens / self.rate as f64)
        }
    }

    fn refund(&self, n: u64) {
        let mut level = self.lock();
        level.tokens = (level.tokens + n as f64).min(self.burst as f64);
    }

    /// Wait until `n` bytes may go on the wire. `check` is called while waiting (at least
    /// every 50 ms); its error (cancelled, a pending signal) ends the wait, returns the
    /// tokens of the piece being waited for, and is returned.
    pub fn acquire(&self, n: u64, mut check: impl FnMut() -> CoreResult<()>) -> CoreResult<()> {
        let mut left = n;
        while left > 0 {
            let piece = left.min(self.burst);
            let due = self.reserve(piece);
            loop {
                let now = self.clock.now();
                if now >= due {
                    break;
                }
                if let Err(err) = check() {
                    self.refund(piece);
                    return Err(err);
                }
                self.clock.sleep((due - now).min(SLICE));
            }
            self.granted.fetch_add(piece, Ordering::Relaxed);
            left -= piece;
        }
        Ok(())
    }
}

/// Which side of a local copy is the share whose traffic is limited: a download from NFS
/// reads the source over the wire, an upload to NFS writes the destination over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Source,
    Destination,
}

/// A bucket and the side of a copy it paces.
#[derive(Clone, Copy)]
pub struct Pacing<'a> {
    pub bucket: &'a TokenBucket,
    pub side: Side,
}

impl<'a> Pacing<'a> {
    /// The bucket, if this side is the paced one.
    pub fn on(pacing: Option<Pacing<'a>>, side: Side) -> Option<&'a TokenBucket> {
        pacing.filter(|p| p.side == side).map(|p| p.bucket)
    }
}

/// The cancel flags a Python caller handed in: a CancelToken, None, or an iterable of them.
fn cancel_flags(cancel: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Arc<AtomicBool>>> {
    let Some(cancel) = cancel else { return Ok(Vec::new()) };
    if cancel.is_none() {
        return Ok(Vec::new());
    }
    if let Ok(token) = cancel.downcast::<CancelToken>() {
        return Ok(vec![token.get().flag()]);
    }
    let mut flags = Vec::new();
    for item in PyIterator::from_object(cancel)? {
        let item = item?;
        if !item.is_none() {
            flags.push(item.downcast::<CancelToken>()?.get().flag());
        }
    }
    Ok(flags)
}

/// A store's bandwidth limit, shared by all its transfers (bytes per second).
#[pyclass(module = "vmstore._native", frozen)]
pub struct RateLimiter {
    bucket: Arc<TokenBucket>,
}

impl RateLimiter {
    pub fn bucket(&self) -> &TokenBucket {
        &self.bucket
    }
}

#[pymethods]
impl RateLimiter {
    #[new]
    fn new(rate_bytes_per_s: u64) -> PyResult<Self> {
        Ok(RateLimiter { bucket: Arc::new(TokenBucket::new(rate_bytes_per_s)?) })
    }

    /// Block, with the GIL released, until `n` bytes may be sent or received.
    #[pyo3(signature = (n, cancel = None))]
    fn acquire(&self, py: Python<'_>, n: u64, cancel: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let flags = cancel_flags(cancel)?;
        let bucket = Arc::clone(&self.bucket);
        py.detach(move || {
            bucket.acquire(n, || {
                if flags.iter().any(|flag| flag.load(Ordering::SeqCst)) {
                    return Err(CoreError::Cancelled);
                }
                // Ctrl-C reaches a main thread waiting here (a no-op on other threads).
                Python::attach(|py| py.check_signals())?;
                Ok(())
            })
        })?;
        Ok(())
    }

    #[getter]
    fn rate(&self) -> u64 {
        self.bucket.rate()
    }

    #[getter]
    fn burst(&self) -> u64 {
        self.bucket.burst()
    }

    #[getter]
    fn granted(&self) -> u64 {
        self.bucket.granted()
    }

    fn __repr__(&self) -> String {
        format!("RateLimiter(rate_bytes_per_s={}, burst={})", self.bucket.rate(), self.bucket.burst())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Time that moves only when someone sleeps.
    #[derive(Default)]
    struct FakeClock {
        now: Mutex<Duration>,
        sleeps: AtomicU64,
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            *self.now.lock().expect("clock")
        }

        fn sleep(&self, duration: Duration) {
            self.sleeps.fetch_add(1, Ordering::Relaxed);
            *self.now.lock().expect("clock") += duration;
        }
    }

    impl FakeClock {
        fn advance(&self, duration: Duration) {
            *self.now.lock().expect("clock") += duration;
        }
    }

    fn bucket(rate: u64) -> TokenBucket<FakeClock> {
        TokenBucket::with_clock(rate, FakeClock::default()).expect("bucket")
    }

    fn never() -> CoreResult<()> {
        Ok(())
    }

    fn seconds(b: &TokenBucket<FakeClock>) -> f64 {
        b.clock.now().as_secs_f64()
    }

    #[test]
    fn burst_is_at_most_the_contracts_max_of_a_mib_and_an_eighth() {
        for rate in [1, 1000, MIB, 8 * MIB, 50 * MIB, 1 << 34, u64::MAX] {
            let burst = burst_for(rate);
            assert!(burst <= (rate / 8).max(MIB), "rate {rate}: burst {burst}");
            assert!(burst >= MIN_BURST);
        }
        assert_eq!(burst_for(8 * MIB), MIB / 2);
        assert_eq!(burst_for(64 * MIB), 4 * MIB);
    }

    #[test]
    fn zero_rate_is_refused() {
        assert!(matches!(TokenBucket::with_clock(0, FakeClock::default()), Err(CoreError::InvalidArgument(_))));
    }

    #[test]
    fn the_contracts_example_24_mib_at_8_mib_per_s_takes_at_least_2_9_s() {
        let b = bucket(8 * MIB);
        for _ in 0..24 {
            b.acquire(MIB, never).expect("acquire");
        }
        let took = seconds(&b);
        assert!(took >= 2.9, "took {took} s");
        // And no longer than the debt arithmetic says: (24 MiB - burst) / rate.
        let expected = (24 * MIB - b.burst()) as f64 / (8 * MIB) as f64;
        assert!((took - expected).abs() < 1e-6, "took {took} s, expected {expected} s");
        assert_eq!(b.granted(), 24 * MIB);
    }

    #[test]
    fn the_first_burst_is_free_then_bytes_come_at_the_rate() {
        let b = bucket(MIB);
        b.acquire(b.burst(), never).expect("burst");
        assert_eq!(seconds(&b), 0.0);
        b.acquire(MIB, never).expect("one more MiB");
        assert!((seconds(&b) - 1.0).abs() < 1e-6, "{}", seconds(&b));
    }

    #[test]
    fn a_request_larger_than_the_burst_is_taken_in_pieces() {
        let b = bucket(MIB);
        // 10 MiB at 1 MiB/s with a 512 KiB burst: 9.5 s, and never more than a burst
        // of debt at once (each piece is at most the burst).
        b.acquire(10 * MIB, never).expect("acquire");
        assert!((seconds(&b) - 9.5).abs() < 1e-6, "{}", seconds(&b));
        assert!(b.lock().tokens >= -(b.burst() as f64) - 1e-6);
    }

    #[test]
    fn sleeps_are_slices_of_at_most_50_ms_not_a_spin() {
        let b = bucket(MIB);
        b.acquire(b.burst() + MIB, never).expect("acquire");
        let sleeps = b.clock.sleeps.load(Ordering::Relaxed);
        // 1 s of waiting in 50 ms slices: 20 sleeps (a spin would make thousands).
        assert!((20..=21).contains(&sleeps), "{sleeps} sleeps");
    }

    #[test]
    fn idle_time_refills_only_up_to_the_burst() {
        let b = bucket(MIB);
        b.clock.advance(Duration::from_secs(3600));
        b.acquire(b.burst(), never).expect("burst");
        let start = seconds(&b);
        b.acquire(MIB, never).expect("after the burst");
        assert!((seconds(&b) - start - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_cancelled_wait_returns_its_tokens_and_the_error() {
        let b = bucket(MIB);
        b.acquire(b.burst(), never).expect("burst");
        let mut calls = 0;
        let result = b.acquire(4 * MIB, || {
            calls += 1;
            if calls > 3 {
                Err(CoreError::Cancelled)
            } else {
                Ok(())
            }
        });
        assert!(matches!(result, Err(CoreError::Cancelled)));
        // Three 50 ms slices were waited; the cancelled piece was given back, so the next
        // caller waits only for what is really owed.
        let waited = seconds(&b);
        assert!((waited - 0.15).abs() < 1e-6, "{waited}");
        assert_eq!(b.granted(), b.burst());
        let before = seconds(&b);
        b.acquire(MIB / 4, never).expect("after cancel");
        let owed = (MIB / 4) as f64 / MIB as f64 - 0.15;
        assert!((seconds(&b) - before - owed).abs() < 1e-6, "{}", seconds(&b) - before);
    }

    #[test]
    fn threads_share_one_bucket() {
        // Real time, small numbers: four threads taking 64 KiB blocks of 1 MiB each at
        // 8 MiB/s (burst 512 KiB) need at least (4 MiB - 512 KiB) / 8 MiB/s = 0.4375 s.
        let b = Arc::new(TokenBucket::new(8 * MIB).expect("bucket"));
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                let b = Arc::clone(&b);
                scope.spawn(move || {
                    for _ in 0..16 {
                        b.acquire(64 << 10, never).expect("acquire");
                    }
                });
            }
        });
        let took = started.elapsed().as_secs_f64();
        assert!(took >= 0.4375 - 0.005, "took {took} s");
        assert_eq!(b.granted(), 4 * MIB);
    }
}
