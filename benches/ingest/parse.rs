//! The callback parser alone (`event::parse`), no HTTP and no storage: nanoseconds per body
//! for a few representative bodies, single-threaded.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hookbridge::event::{self, Source};

/// The bodies timed: the provider's documented success and failure callbacks (as the load
/// generator sends them), a bare record in the other dialect, and one with many outputs.
const BODIES: &[(&str, &str)] = &[
    (
        "envelope success",
        r#"{"code":200,"message":"success","data":{"taskId":"task_cl1a2b3c4d000000000000001","orderId":"order_cl1a2b3c4d000000000000001","model":"seedance-20","state":"success","creditsUsed":200,"output":[{"url":"https://static.kinovi.ai/generated/video.mp4","width":1280,"height":720}],"error":null,"createTime":1735599634000,"completeTime":1735599754000,"updateTime":1735599754000}}"#,
    ),
    (
        "envelope failure",
        r#"{"code":200,"message":"success","data":{"taskId":"task_cl1a2b3c4d000000000000001","orderId":"order_cl1a2b3c4d000000000000001","model":"seedance-20","state":"fail","creditsUsed":0,"output":null,"error":{"code":"2038","message":"Your input text violates platform rules. Please modify and try again."},"createTime":1735599634000,"completeTime":null,"updateTime":1735599754000}}"#,
    ),
    (
        "bare record",
        r#"{"taskId": "task_cl1a2b3c4d000000000000001", "status": "GENERATING", "model": "seedance-20", "creditsUsed": "12.5", "output": [], "error": "", "createTime": "1735599634000", "updateTime": 1735599754000.0}"#,
    ),
    (
        "four outputs",
        r#"{"code":200,"message":"success","data":{"taskId":"task_cl1a2b3c4d000000000000001","state":"success","output":[{"url":"https://static.kinovi.ai/generated/a.png","width":1024,"height":1024,"seed":123456789012345678901234567890},{"url":"https://static.kinovi.ai/generated/b.png","width":1024,"height":1024,"meta":{"steps":30,"tags":["x","y"]}},{"url":"https://static.kinovi.ai/generated/c.png","width":1024,"height":1024},{"url":"https://static.kinovi.ai/generated/d.png","width":1024,"height":1024}],"createTime":1735599634000,"completeTime":1735599754000}}"#,
    ),
];

/// Times each body for about `duration` and prints the mean per parse.
pub fn run(duration: Duration) -> anyhow::Result<()> {
    println!("== parse: event::parse alone, one thread");
    for (name, body) in BODIES {
        let body = body.as_bytes();
        // Warm up, and check the body is accepted: timing a refusal would mislead.
        event::parse(body, Source::Webhook, 0)?;
        let mut parses = 0u64;
        let started = Instant::now();
        while started.elapsed() < duration {
            for _ in 0..1000 {
                black_box(event::parse(black_box(body), Source::Webhook, 0)).ok();
            }
            parses += 1000;
        }
        let ns = started.elapsed().as_nanos() as f64 / parses as f64;
        println!(
            "parse {name:<18} {:>4} bytes  {ns:>7.0} ns/body",
            body.len()
        );
    }
    Ok(())
}
