//! The long fuzz run: millions of hostile bodies through the parser and every publisher's
//! encoder, on stable Rust (no cargo-fuzz). The inputs and the property are the property
//! tests' own (`src/event/cases.rs`); this only runs many more of them, on several threads.
//!
//! ```text
//! scripts/fuzz.sh [CASES] [THREADS]     # default 10000000 cases, 2 threads
//! ```
//!
//! A broken property (an encoder refusing an accepted event, a round trip that changes an
//! event) or a panic prints the body and exits non-zero. Otherwise it prints the count.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::time::Instant;

use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

#[allow(dead_code)]
mod cases {
    use hookbridge::{config, event, publish};

    include!("../src/event/cases.rs");
}

use cases::{Oracle, Verdict};

/// Outcome of one thread's share.
#[derive(Default)]
struct Tally {
    inputs: u64,
    published: u64,
    refused: u64,
    failure: Option<String>,
}

fn run(seed: u64, cases: u64) -> Tally {
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = cases::body();
    let oracle = Oracle::new();
    let mut tally = Tally::default();
    while tally.inputs < cases {
        let body = match strategy.new_tree(&mut runner) {
            Ok(tree) => tree.current(),
            Err(reason) => {
                tally.failure = Some(format!("generator: {reason}"));
                return tally;
            }
        };
        tally.inputs += 1;
        if tally.inputs % 1_000_000 == 0 {
            println!("fuzz: worker {seed}: {} inputs so far", tally.inputs);
        }
        match catch_unwind(AssertUnwindSafe(|| oracle.check(&body))) {
            Ok(Ok(Verdict::Published)) => tally.published += 1,
            Ok(Ok(Verdict::Refused)) => tally.refused += 1,
            Ok(Err(broken)) => {
                let body = String::from_utf8_lossy(&body);
                tally.failure = Some(format!("{broken}\nbody: {body}"));
                return tally;
            }
            Err(_) => {
                let body = String::from_utf8_lossy(&body);
                tally.failure = Some(format!("panicked\nbody: {body}"));
                return tally;
            }
        }
    }
    tally
}

fn main() -> ExitCode {
    // `cargo bench` passes `--bench`; the numbers are the first two other arguments.
    let numbers: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let cases = numbers.first().copied().unwrap_or(10_000_000);
    let threads = numbers.get(1).copied().unwrap_or(2).max(1);
    let seed = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_secs())
        });
    println!("fuzz: {cases} inputs on {threads} threads, FUZZ_SEED={seed}");
    // Quiet the default hook: a panic is reported with its input below.
    std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = cases / threads + u64::from(t < cases % threads);
                scope.spawn(move || run(seed.wrapping_mul(1000).wrapping_add(t), share))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let (inputs, published, refused) =
        (sum(|t| t.inputs), sum(|t| t.published), sum(|t| t.refused));
    println!(
        "fuzz: {inputs} inputs: {published} accepted and encoded by every publisher, \
         {refused} refused with a 400; {:.0} s ({:.0} inputs/s)",
        elapsed,
        inputs as f64 / elapsed.max(1e-9)
    );
    match tallies.iter().find_map(|t| t.failure.as_ref()) {
        Some(failure) => {
            println!("fuzz: PROPERTY BROKEN: {failure}");
            ExitCode::FAILURE
        }
        None if inputs < cases => {
            println!("fuzz: a worker stopped early");
            ExitCode::FAILURE
        }
        None => ExitCode::SUCCESS,
    }
}
