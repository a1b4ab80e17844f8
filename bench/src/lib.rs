//! A small load generator for the benchmarks: keep-alive HTTP/1.1 connections, a closed loop
//! (N workers as fast as they can, for throughput) or an open loop (a fixed request rate,
//! latency measured from each request's *scheduled* time so queueing is not hidden).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How to build each request.
pub type MakeRequest = Arc<dyn Fn() -> http::Request<Full<Bytes>> + Send + Sync>;

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    pub non_2xx: u64,
    pub elapsed: Duration,
    /// Latencies in microseconds, sorted.
    pub latencies: Vec<u32>,
}

impl Stats {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn pct(&self, p: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (self.latencies.len() - 1) as f64).round() as usize;
        Duration::from_micros(self.latencies[i.min(self.latencies.len() - 1)] as u64)
    }

    pub fn summary(&self) -> String {
        format!(
            "{:.0} req/s over {:.1}s ({} requests, {} errors, {} non-2xx); p50 {} p90 {} p99 {} p99.9 {}",
            self.rps(),
            self.elapsed.as_secs_f64(),
            self.requests,
            self.errors,
            self.non_2xx,
            fmt(self.pct(50.0)),
            fmt(self.pct(90.0)),
            fmt(self.pct(99.0)),
            fmt(self.pct(99.9)),
        )
    }

    fn merge(&mut self, o: Stats) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.non_2xx += o.non_2xx;
        self.latencies.extend(o.latencies);
    }
}

pub fn fmt(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{}µs", d.as_micros())
    } else {
        format!("{:.2}ms", d.as_secs_f64() * 1000.0)
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (send, conn) = http1::handshake(TokioIo::new(s)).await.map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// One request on a kept-alive connection (reconnecting when needed). Returns the status.
async fn one(
    addr: SocketAddr,
    conn: &mut Option<http1::SendRequest<Full<Bytes>>>,
    req: http::Request<Full<Bytes>>,
) -> Result<u16, ()> {
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        *conn = Some(connect(addr).await.map_err(|_| ())?);
    }
    let c = conn.as_mut().ok_or(())?;
    if c.ready().await.is_err() {
        *conn = None;
        return Err(());
    }
    match c.send_request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            if resp.into_body().collect().await.is_err() {
                *conn = None;
            }
            Ok(status)
        }
        Err(_) => {
            *conn = None;
            Err(())
        }
    }
}

/// Closed loop: `workers` connections sending back to back for `duration`.
pub async fn closed_loop(addr: SocketAddr, workers: usize, duration: Duration, make: MakeRequest) -> Stats {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let stop = stop.clone();
        let make = make.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            let mut conn = None;
            while !stop.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                match one(addr, &mut conn, make()).await {
                    Ok(st) => {
                        s.requests += 1;
                        if !(200..300).contains(&st) {
                            s.non_2xx += 1;
                        }
                        s.latencies.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Err(()) => s.errors += 1,
                }
            }
            s
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = Stats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            total.merge(s);
        }
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

/// Open loop: `rate` requests per second spread over `connections`, for `duration`. Latency
/// counts from the scheduled send time, which a kernel high-resolution timer keeps (see
/// `pacer`): a send is late only when its connection was still waiting for the previous
/// response, or the generator was not given a core.
///
/// The generator runs on a thread and scheduler of its own, as an outside load generator
/// would (the closed loop's `wrk` is another process): on the benchmark's shared runtime, the
/// in-process system's own tasks (the gateway's audit publisher among them) delayed its
/// sends and the reading of its responses, which counted as latency of the target.
pub async fn open_loop(
    addr: SocketAddr,
    connections: usize,
    rate: u64,
    duration: Duration,
    make: MakeRequest,
) -> Stats {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("load-generator".into())
        .spawn(move || {
            pacer::precise_timers_for_this_thread();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the load generator's runtime");
            let _ = tx.send(rt.block_on(open_loop_here(addr, connections, rate, duration, make)));
        })
        .expect("the load generator's thread");
    rx.await.expect("the load generator finished")
}

async fn open_loop_here(
    addr: SocketAddr,
    connections: usize,
    rate: u64,
    duration: Duration,
    make: MakeRequest,
) -> Stats {
    let started = Instant::now();
    let total_reqs = (rate as f64 * duration.as_secs_f64()) as u64;
    let per_conn = total_reqs / connections as u64;
    let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let make = make.clone();
        let offset = interval.mul_f64(c as f64 / connections as f64);
        tasks.push(tokio::spawn(async move {
            let mut s = Stats::default();
            let mut conn = None;
            let pacer = pacer::Pacer::new();
            let base = Instant::now() + offset;
            for i in 0..per_conn {
                let scheduled = base + interval.mul_f64(i as f64);
                pacer.until(scheduled).await;
                match one(addr, &mut conn, make()).await {
                    Ok(st) => {
                        s.requests += 1;
                        if !(200..300).contains(&st) {
                            s.non_2xx += 1;
                        }
                        s.latencies
                            .push(scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    Err(()) => s.errors += 1,
                }
            }
            s
        }));
    }
    let mut total = Stats::default();
    for t in tasks {
        if let Ok(s) = t.await {
            total.merge(s);
        }
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

/// A description of the machine for results files.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<u64>().unwrap_or(0) / 1024 / 1024)
        })
        .unwrap_or(0);
    format!("{cores} cores ({cpu}), {mem} GiB RAM")
}

/// CPU time (user + system) used so far by this process's threads whose name starts with
/// `prefix` (Linux: `/proc/self/task/*/stat`; each thread's own counters, not the process's).
/// Over a closed-loop run in which a proxy's threads are saturated, this divided by the
/// requests served is what one request costs the proxy, free of how the scheduler shared the
/// cores with the load generator and the upstream.
pub fn threads_cpu(prefix: &str) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut ticks = 0u64;
    for t in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue;
        };
        // "tid (comm) state ppid ... utime stime ...": comm may hold spaces, so split at the
        // last ')'; utime and stime are the 12th and 13th fields after it.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if let (Some(u), Some(s)) = (f.get(11), f.get(12)) {
            ticks += u.parse::<u64>().unwrap_or(0) + s.parse::<u64>().unwrap_or(0);
        }
    }
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// Waiting for each request's scheduled send time. Tokio's timer counts whole milliseconds and
/// wakes every timer due in the same millisecond at once, late by up to about 2 ms: at a fixed
/// rate that sent requests in bursts on millisecond ticks and counted the generator's own
/// lateness (it counts from the scheduled time) as latency of every target, ~2 ms at p99 even
/// for the upstream directly. On Linux each connection waits on a kernel high-resolution timer
/// (a `timerfd` polled by the runtime) instead, on a thread whose timer slack is 1 ns.
mod pacer {
    use std::time::Instant;

    #[cfg(target_os = "linux")]
    pub(crate) fn precise_timers_for_this_thread() {
        // SAFETY: PR_SET_TIMERSLACK takes an integer and changes only this thread's slack.
        unsafe {
            libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) fn precise_timers_for_this_thread() {}

    #[cfg(target_os = "linux")]
    pub(crate) struct Pacer {
        /// `None` when the timer could not be made; waits then fall back to tokio's timer.
        timer: Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    }

    #[cfg(target_os = "linux")]
    impl Pacer {
        pub(crate) fn new() -> Self {
            use std::os::fd::{FromRawFd, OwnedFd};
            // SAFETY: timerfd_create has no memory preconditions.
            let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
            let timer = (fd >= 0)
                .then(|| {
                    // SAFETY: a non-negative result is a new, non-blocking descriptor that
                    // nothing else owns; the `AsyncFd` owns it until it is dropped and never
                    // replaces or closes it.
                    unsafe { tokio::io::unix::AsyncFd::register(OwnedFd::from_raw_fd(fd)) }.ok()
                })
                .flatten();
            Self { timer }
        }

        /// Returns at `at` (at once if it has passed).
        pub(crate) async fn until(&self, at: Instant) {
            use std::os::fd::AsRawFd;
            let now = Instant::now();
            if at <= now {
                return;
            }
            let Some(timer) = &self.timer else {
                return tokio::time::sleep_until(at.into()).await;
            };
            let d = at - now;
            let spec = libc::itimerspec {
                it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
                it_value: libc::timespec {
                    tv_sec: d.as_secs() as libc::time_t,
                    tv_nsec: d.subsec_nanos() as libc::c_long,
                },
            };
            let fd = timer.get_ref().as_raw_fd();
            // SAFETY: `fd` is our open timerfd and `spec` a valid itimerspec; no old value asked.
            if unsafe { libc::timerfd_settime(fd, 0, &spec, std::ptr::null_mut()) } != 0 {
                return tokio::time::sleep_until(at.into()).await;
            }
            loop {
                let Ok(mut ready) = timer.readable().await else {
                    return tokio::time::sleep_until(at.into()).await;
                };
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into an 8-byte buffer from our open descriptor.
                let n = unsafe { libc::read(fd, expirations.as_mut_ptr().cast(), expirations.len()) };
                if n == 8 {
                    return;
                }
                match std::io::Error::last_os_error().kind() {
                    // Not yet expired: wait for the next readiness.
                    std::io::ErrorKind::WouldBlock => ready.clear_ready(),
                    std::io::ErrorKind::Interrupted => {}
                    // Anything else would fail again at once: wait on tokio's timer instead.
                    _ => return tokio::time::sleep_until(at.into()).await,
                }
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    pub(crate) struct Pacer;

    #[cfg(not(target_os = "linux"))]
    impl Pacer {
        pub(crate) fn new() -> Self {
            Self
        }

        pub(crate) async fn until(&self, at: Instant) {
            tokio::time::sleep_until(at.into()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pacer::Pacer;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn the_pacer_never_returns_before_the_time_it_was_given() {
        let pacer = Pacer::new();
        // A wait abandoned while its timer is armed leaves nothing behind for the next one.
        let far = Instant::now() + Duration::from_secs(60);
        assert!(
            tokio::time::timeout(Duration::from_millis(5), pacer.until(far))
                .await
                .is_err()
        );
        for i in 0..50u32 {
            let at = Instant::now() + Duration::from_micros(50 + 20 * u64::from(i));
            pacer.until(at).await;
            assert!(Instant::now() >= at, "returned early on wait {i}");
        }
    }

    #[tokio::test]
    async fn the_pacer_returns_at_once_for_a_time_already_past() {
        let pacer = Pacer::new();
        let past = Instant::now() - Duration::from_millis(1);
        // Polled once: a past time needs no timer and no wake-up.
        let done = ready_on_first_poll(pacer.until(past)).await;
        assert!(done, "a time already past is not waited for");
    }

    async fn ready_on_first_poll(f: impl std::future::Future<Output = ()>) -> bool {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx).is_ready())).await
    }
}
