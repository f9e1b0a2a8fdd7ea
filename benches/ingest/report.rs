//! What a load run measured, and how it is printed: every latency kept and
//! sorted (no histogram buckets), plus the `RESULT` line scripts/bench.sh reads.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// What one loop measured; latencies in microseconds.
#[derive(Default)]
pub struct Report {
    /// The measured span (closed loop: the window; count mode: the whole run).
    pub window: Duration,
    /// Answer latency (open loop: from the due time).
    pub latency: Vec<u32>,
    /// Open loop only: from sending to the answer.
    pub service: Vec<u32>,
    /// Open loop only: how late the request left after its due time.
    pub send_lag: Vec<u32>,
    /// Open loop only: (second of the measured window it was due in, latency).
    pub by_second: Vec<(u32, u32)>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Open loop only: how long after the last due time the last answer came.
    pub tail: Duration,
}

/// CPU seconds this process used so far (user + system), from /proc.
pub fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised name: state is the 1st, utime the 12th, stime the 13th.
    let after = stat.rsplit(") ").next().unwrap_or("");
    let ticks: u64 = after
        .split(' ')
        .skip(11)
        .take(2)
        .filter_map(|t| t.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

impl Report {
    pub fn record_error(&mut self, e: &anyhow::Error) {
        self.errors += 1;
        self.first_error.get_or_insert_with(|| format!("{e:#}"));
    }

    pub fn merge(&mut self, other: Report) {
        self.latency.extend(other.latency);
        self.service.extend(other.service);
        self.send_lag.extend(other.send_lag);
        self.by_second.extend(other.by_second);
        for (status, n) in other.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn ok(&self) -> u64 {
        self.statuses
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum()
    }

    fn statuses_line(&self) -> String {
        let mut parts: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, n)| format!("{s}={n}"))
            .collect();
        parts.push(format!("errors={}", self.errors));
        parts.join(" ")
    }

    pub fn print_closed(mut self, connections: usize) {
        let rate = self.ok() as f64 / self.window.as_secs_f64();
        let mut latency = std::mem::take(&mut self.latency);
        let lat = Percentiles::of(&mut latency);
        println!("connections           : {connections}");
        println!("measured              : {:.2} s", self.window.as_secs_f64());
        println!("accepted (2xx) /s     : {rate:.0}");
        println!("statuses              : {}", self.statuses_line());
        println!("latency ms p50/p90/p99/max : {lat}");
        if let Some(e) = &self.first_error {
            println!("first error           : {e}");
        }
        let cpu = cpu_secs();
        println!("process CPU so far    : {cpu:.2} s");
        println!(
            "RESULT rps={rate:.0} p50_ms={:.2} p99_ms={:.2} errors={} non2xx={} cpu_s={cpu:.2}",
            lat.ms(0.50),
            lat.ms(0.99),
            self.errors,
            lat.0.len() as u64 - self.ok()
        );
    }

    pub fn print_open(mut self, rate: u64) {
        let done = self.ok() as f64 / self.window.as_secs_f64();
        let (mut latency, mut service, mut lag) = (
            std::mem::take(&mut self.latency),
            std::mem::take(&mut self.service),
            std::mem::take(&mut self.send_lag),
        );
        let lat = Percentiles::of(&mut latency);
        let service = Percentiles::of(&mut service);
        let lag = Percentiles::of(&mut lag);
        println!("offered /s            : {rate}");
        println!("answered (2xx) /s     : {done:.0}");
        println!("statuses              : {}", self.statuses_line());
        println!("latency from due time, ms p50/p90/p99/max : {lat}");
        println!("  of which send lag (generator timer), ms  : {lag}");
        println!("service time (send->answer), ms            : {service}");
        println!(
            "last answer after last due time : {:.1} ms",
            self.tail.as_secs_f64() * 1e3
        );
        // When the slow answers happened: steady, or bursts (GC, a big commit, the relay)?
        let seconds = self.window.as_secs() as usize + 1;
        let (mut worst, mut slow) = (vec![0u32; seconds], vec![0u32; seconds]);
        for &(second, us) in &self.by_second {
            let i = (second as usize).min(seconds - 1);
            worst[i] = worst[i].max(us);
            slow[i] += u32::from(us > 10_000);
        }
        let line = |v: &[u32], f: &dyn Fn(u32) -> String| {
            v.iter().map(|&x| f(x)).collect::<Vec<_>>().join(" ")
        };
        println!(
            "max ms, by second     : {}",
            line(&worst, &|us| format!("{:.0}", f64::from(us) / 1e3))
        );
        println!(
            "answers > 10 ms, by s : {}",
            line(&slow, &|n| n.to_string())
        );
        if let Some(e) = &self.first_error {
            println!("first error           : {e}");
        }
        let cpu = cpu_secs();
        println!("process CPU so far    : {cpu:.2} s");
        println!(
            "RESULT rps={done:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} service_p99_ms={:.2} errors={} cpu_s={cpu:.2}",
            lat.ms(0.50),
            lat.ms(0.99),
            lat.ms(1.0),
            service.ms(0.99),
            self.errors
        );
    }
}

/// Sorted latencies in microseconds.
pub struct Percentiles<'a>(&'a [u32]);

impl<'a> Percentiles<'a> {
    pub fn of(v: &'a mut [u32]) -> Self {
        v.sort_unstable();
        Self(v)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((q * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        f64::from(self.0[rank - 1]) / 1e3
    }
}

impl fmt::Display for Percentiles<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.2} / {:.2} / {:.2} / {:.2}  (n={})",
            self.ms(0.50),
            self.ms(0.90),
            self.ms(0.99),
            self.ms(1.0),
            self.0.len()
        )
    }
}
