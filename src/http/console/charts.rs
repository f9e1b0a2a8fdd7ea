//! The overview's rates: a ring of the outbox counters, one sample a
//! second for the last 15 minutes ([`RING`] samples, a fixed 45 KiB), and
//! the small SVG charts drawn from it.
//!
//! The ring is fed by a worker the app's supervisor owns ([`sample_every`])
//! and by every read of the overview, so a chart is current even between
//! ticks. A gap (the process was busy, or the worker restarting) costs no
//! accuracy: a rate is the counters' difference over the time between two
//! samples, whatever that time was.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::Duration;

use super::html::escape;
use crate::outbox::Stats;
use crate::sync::lock;

/// Samples kept: 15 minutes at one a second.
pub const RING: usize = 900;
/// What the charts span.
pub const SPAN_MS: i64 = 15 * 60 * 1000;

/// The counters charted, in order, with their labels.
pub const SERIES: [&str; 5] = ["accepted", "duplicate", "stale", "rejected", "published"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    at_ms: i64,
    counts: [u64; SERIES.len()],
}

/// The ring of samples.
#[derive(Default)]
pub struct Rates {
    ring: Mutex<VecDeque<Sample>>,
}

fn counts(stats: &Stats) -> [u64; SERIES.len()] {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    [
        load(&stats.accepted),
        load(&stats.duplicates),
        load(&stats.stale),
        load(&stats.rejected),
        load(&stats.published),
    ]
}

impl Rates {
    /// Takes a sample of `stats` at `now_ms`; within the same second as the
    /// last one it replaces it, so lazy reads never crowd out the history.
    pub fn record(&self, stats: &Stats, now_ms: i64) {
        self.push(Sample {
            at_ms: now_ms,
            counts: counts(stats),
        });
    }

    fn push(&self, sample: Sample) {
        let mut ring = lock(&self.ring);
        let len = ring.len();
        if let Some(last) = ring.back_mut() {
            if sample.at_ms < last.at_ms {
                return;
            }
            // Two samples in one second: the later one is the better, but
            // the one before must stay to measure the second against.
            if len >= 2 && sample.at_ms / 1000 == last.at_ms / 1000 {
                *last = sample;
                return;
            }
        }
        if ring.len() == RING {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// Per series: (ms since the epoch, events per second) for each pair of
    /// consecutive samples within [`SPAN_MS`] of `now_ms`.
    pub fn series(&self, now_ms: i64) -> Vec<Vec<(i64, f64)>> {
        let ring = lock(&self.ring);
        let mut out = vec![Vec::new(); SERIES.len()];
        let mut previous: Option<&Sample> = None;
        for sample in ring.iter() {
            if let Some(p) = previous.filter(|_| now_ms - sample.at_ms <= SPAN_MS) {
                let secs = (sample.at_ms - p.at_ms).max(1) as f64 / 1000.0;
                for (i, points) in out.iter_mut().enumerate() {
                    let delta = sample.counts[i].saturating_sub(p.counts[i]);
                    points.push((sample.at_ms, delta as f64 / secs));
                }
            }
            previous = Some(sample);
        }
        out
    }
}

/// Samples `stats` into `rates` every `every` until `stop`.
pub async fn sample_every(
    rates: std::sync::Arc<Rates>,
    stats: std::sync::Arc<Stats>,
    every: Duration,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => rates.record(&stats, crate::clock::now_ms()),
        }
    }
}

const WIDTH: f64 = 300.0;
const HEIGHT: f64 = 60.0;

/// One chart: the label, the latest and the highest rate, and the line
/// over the last 15 minutes (time on x, 0..max on y).
pub fn svg(label: &str, points: &[(i64, f64)], now_ms: i64) -> String {
    let max = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let latest = points.last().map_or(0.0, |p| p.1);
    let top = if max > 0.0 { max } else { 1.0 };
    let start = now_ms - SPAN_MS;
    let coords: Vec<String> = points
        .iter()
        .map(|&(at, rate)| {
            let x = (at - start).clamp(0, SPAN_MS) as f64 / SPAN_MS as f64 * WIDTH;
            let y = HEIGHT - rate / top * (HEIGHT - 2.0) - 1.0;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let label = escape(label);
    format!(
        "<figure class=\"chart\"><figcaption>{label}: <b>{latest:.1}/s</b> \
         <small>(max {max:.1}/s)</small></figcaption>\
         <svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         role=\"img\" aria-label=\"{label} per second, last 15 minutes\">\
         <rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"#f6f8fa\"/>\
         <polyline fill=\"none\" stroke=\"#0969da\" stroke-width=\"1.5\" points=\"{}\"/>\
         </svg><div class=\"axis\"><span>15 min ago</span><span>now</span></div></figure>",
        coords.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_time_and_the_ring_is_bounded() {
        let rates = Rates::default();
        let stats = Stats::default();
        let t0 = 1_000_000_000;
        rates.record(&stats, t0);
        stats.accepted.store(10, Ordering::Relaxed);
        rates.record(&stats, t0 + 1000);
        stats.accepted.store(30, Ordering::Relaxed);
        rates.record(&stats, t0 + 1500);
        stats.accepted.store(40, Ordering::Relaxed);
        // Same second: replaces the last sample.
        rates.record(&stats, t0 + 1900);
        stats.published.store(8, Ordering::Relaxed);
        // A 4 s gap: the rate is spread over it.
        rates.record(&stats, t0 + 5900);
        let series = rates.series(t0 + 5900);
        assert_eq!(series[0].len(), 2, "{series:?}");
        assert_eq!(series[0][0].0, t0 + 1900);
        assert!((series[0][0].1 - 40.0 / 1.9).abs() < 1e-9);
        assert_eq!(series[4][1], (t0 + 5900, 2.0));

        for i in 0..(RING as i64 + 100) {
            rates.record(&stats, t0 + 10_000 + i * 1000);
        }
        assert_eq!(lock(&rates.ring).len(), RING);
        let later = t0 + 10_000 + (RING as i64 + 99) * 1000;
        assert!(rates.series(later)[0].len() < RING);
        assert!(rates.series(later + SPAN_MS + 2000)[0].is_empty());
    }

    #[test]
    fn a_chart_is_an_inline_svg_with_escaped_labels() {
        let now = 1_000_000_000;
        let chart = svg("<a>", &[(now - 1000, 2.0), (now, 4.0)], now);
        assert!(chart.contains("&lt;a&gt;: <b>4.0/s</b>"));
        assert!(chart.contains("points=\"299.7,30.0 300.0,1.0\""), "{chart}");
        assert!(svg("x", &[], now).contains("0.0/s"));
    }
}
