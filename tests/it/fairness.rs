//! The provider is never refused: the edge charges what it refuses, per
//! address, and tells the sender from an attacker.
//!
//! The good sender is 127.0.0.1; every attack comes from other loopback
//! addresses (127.0.0.2 and up), as it would from elsewhere. Each test runs
//! the edge on its defaults unless it says otherwise, asserts what the
//! sender gets (every callback 200, on the broker once) and what the
//! attacker gets (refused, cheaply), and never times the server.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use hookbridge::config::{Config, ForwardedHeader, StreamConfig};
use hyper::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::nats::jetstream_publisher;
use crate::support::app::{config, temp_dir, Http, TestApp};
use crate::support::brokers::{self, PrivateBroker};
use crate::support::{callbacks, eventually, nats, secs, unique};

/// Upper bound of every wait here: generous, only there so nothing hangs.
const WAIT: Duration = Duration::from_secs(60);

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The defaults of `[server]`, as a user runs them (the shared test config
/// turns the refusal budget off, for tests that send junk and good
/// callbacks from one address).
fn edge_defaults(mut config: Config) -> Config {
    config.server.rate_limit = Default::default();
    config
}

fn file_config(dir: &Path) -> Config {
    edge_defaults(crate::support::app::file_config(dir))
}

/// A JetStream stream of its own and a config publishing to it.
async fn jetstream_config(dir: &Path) -> (Config, String, String) {
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("FAIR").to_uppercase(), unique("fair"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let config = edge_defaults(config(dir, jetstream_publisher(&url, &subject, None)));
    (config, url, stream)
}

/// A config whose broker is down until the test starts it: events stay
/// pending (the stream is created by hookbridge once the broker is up).
fn outage_config(dir: &Path, broker: &PrivateBroker) -> (Config, String) {
    let stream = unique("OUTAGE").to_uppercase();
    let prefix = unique("outage");
    let publisher = jetstream_publisher(
        &broker.nats_url(),
        &format!("{prefix}.{{state}}"),
        Some(StreamConfig {
            name: stream.clone(),
            subjects: vec![format!("{prefix}.>")],
            duplicate_window_secs: 120,
        }),
    );
    (edge_defaults(config(dir, publisher)), stream)
}

/// A TCP connection from `local`.
async fn connect_from(addr: SocketAddr, local: IpAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(addr).await
}

/// The status code of the first answer in `bytes`, if one is there.
fn status_of(bytes: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(bytes.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends `head` and `prefix`, then (after `pause`) writes `body` more
/// bytes in 64 KiB pieces while reading whatever the server answers, as a
/// client that sends its whole request before it looks at the answer
/// would. Returns the bytes read until the server closed; an error when the
/// connection was reset, or a write failed, before the answer was read: a
/// real client reports such a request as failed, whatever the server wrote.
async fn answer_while_sending(
    mut stream: TcpStream,
    head: String,
    prefix: Vec<u8>,
    pause: Duration,
    body: usize,
) -> Result<Vec<u8>, std::io::Error> {
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&prefix).await?;
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(pause).await;
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        while sent < body {
            write
                .write_all(&chunk[..chunk.len().min(body - sent)])
                .await?;
            sent += chunk.len();
        }
        Ok::<_, std::io::Error>(write)
    });
    let mut seen = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match read.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the server answers or closes in time");
    let wrote = writer.await.unwrap();
    read?;
    wrote?;
    Ok(seen)
}

/// A connection that has carried one accepted callback (keep-alive).
async fn used_connection(addr: SocketAddr, local: IpAddr) -> TcpStream {
    let mut stream = connect_from(addr, local).await.unwrap();
    let body = serde_json::to_vec(&callbacks::success(&unique("warm"))).unwrap();
    let head = format!(
        "POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is small and has a Content-Length: read until its body.
    while !seen.ends_with(br#"{"message":"ok"}"#) {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after a good callback");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(status_of(&seen), Some(200));
    stream
}

/// Posts good callbacks for new tasks from `http`, returning how many were
/// answered anything but 200 (with what).
async fn send_good(http: &Http, run: &str, n: usize) -> Vec<String> {
    let mut lost = Vec::new();
    for i in 0..n {
        match http
            .try_callback(&callbacks::success(&format!("{run}_{i}")))
            .await
        {
            Ok(answer) if answer.status == StatusCode::OK => {}
            Ok(answer) => lost.push(format!("{} {}", answer.status, answer.json)),
            Err(e) => lost.push(e),
        }
    }
    lost
}

/// 3,000 callbacks for 3,000 tasks from one address over 16 keep-alive
/// connections, as fast as they are answered: every one 200, every one on
/// the stream once. (The default limits used to answer two thirds 429.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_from_one_address_is_answered_200_in_full() {
    const TOTAL: usize = 3000;
    const CONNECTIONS: usize = 16;
    let dir = temp_dir();
    let (config, url, stream) = jetstream_config(dir.path()).await;
    let app = TestApp::start(config).await;
    let run = unique("burst");
    let senders: Vec<_> = (0..CONNECTIONS)
        .map(|c| {
            let (http, run) = (Http::new(app.addr), run.clone());
            tokio::spawn(async move {
                let mut refused = Vec::new();
                for i in (c..TOTAL).step_by(CONNECTIONS) {
                    let body = callbacks::success(&format!("{run}_{i}"));
                    match http.try_callback(&body).await {
                        Ok(a) if a.status == StatusCode::OK => {}
                        Ok(a) => refused.push(format!("{}: {}", a.status, a.json)),
                        Err(e) => refused.push(e),
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = Vec::new();
    for sender in senders {
        refused.extend(sender.await.unwrap());
    }
    assert!(
        refused.is_empty(),
        "{} refused: {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
    let stored = nats::read_stream(&url, &stream, TOTAL as u64, WAIT * 2, secs(1)).await;
    assert_eq!(stored.len(), TOTAL, "each callback once");
    app.stop().await;
}

/// With the broker down, 1,000 callbacks posted one by one are all
/// answered 200 (storage pressure would be a 503 with its reason, never a
/// 429), and all reach the broker once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_during_a_broker_outage_are_all_accepted() {
    const TOTAL: usize = 1000;
    let dir = temp_dir();
    let mut broker = PrivateBroker::nats();
    let (config, stream) = outage_config(dir.path(), &broker);
    let app = TestApp::start(config).await;
    let lost = send_good(&app.http, &unique("outage"), TOTAL).await;
    assert!(
        lost.is_empty(),
        "{} not accepted: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(app.outbox.status().unwrap().pending, TOTAL as u64);
    broker.start().await;
    let stored =
        nats::read_stream(&broker.nats_url(), &stream, TOTAL as u64, WAIT * 2, secs(1)).await;
    assert_eq!(stored.len(), TOTAL);
    app.stop().await;
}

/// 300 callbacks, each sent 3 times from 16 concurrent clients: all 900
/// answered 200 (none refused, none left without an answer), 300 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_from_many_connections_are_all_answered() {
    const TASKS: usize = 300;
    const COPIES: usize = 3;
    const CLIENTS: usize = 16;
    let dir = temp_dir();
    let (config, url, stream) = jetstream_config(dir.path()).await;
    let app = TestApp::start(config).await;
    let run = unique("dup");
    let jobs: Vec<usize> = (0..TASKS * COPIES).map(|n| n % TASKS).collect();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let http = Http::new(app.addr);
            let mine: Vec<String> = jobs
                .iter()
                .skip(c)
                .step_by(CLIENTS)
                .map(|t| format!("{run}_{t}"))
                .collect();
            tokio::spawn(async move {
                let mut bad = Vec::new();
                for task in mine {
                    match http.try_callback(&callbacks::success(&task)).await {
                        Ok(a) if a.status == StatusCode::OK => {}
                        Ok(a) => bad.push(format!("{}", a.status)),
                        Err(e) => bad.push(e),
                    }
                }
                bad
            })
        })
        .collect();
    let mut bad = Vec::new();
    for client in clients {
        bad.extend(client.await.unwrap());
    }
    assert!(bad.is_empty(), "{bad:?}");
    let stored = nats::read_stream(&url, &stream, TASKS as u64, WAIT, secs(2)).await;
    assert_eq!(stored.len(), TASKS, "one event per (task, state)");
    app.stop().await;
}

/// Junk from another address spends that address's refusal budget: it is
/// then refused at accept for the penalty, while the sender's callbacks all
/// pass. `/admin/status` names both, and the penalty ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_from_another_address_costs_the_sender_nothing() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.rate_limit.refusal_burst = 20;
    config.server.rate_limit.refusals_per_sec = 1;
    // Longer than the junk loop and the checks below take on a loaded
    // machine: a penalty that ended mid-loop would let more junk be read.
    config.server.rate_limit.penalty_secs = 30;
    let app = TestApp::start(config).await;
    let attacker = Http::from_address(app.addr, ip("127.0.0.2"), Duration::from_secs(30));
    let junk = Bytes::from(vec![b'{'; 64 * 1024]);
    let mut refused_400 = 0;
    let mut cut = 0;
    // Junk read until the first refusal: on a loaded machine the loop may
    // outlast the penalty, and junk is read again after it (as it should).
    let mut read_before_penalty = None;
    for _ in 0..200 {
        match attacker
            .try_request("POST", "/webhooks/kinovi", junk.clone())
            .await
        {
            Ok(a) if a.status == StatusCode::BAD_REQUEST => refused_400 += 1,
            // In penalty: 429 on a connection already open, else closed at
            // accept (a connection error).
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => cut += 1,
            Ok(a) => panic!("unexpected answer to junk: {} {}", a.status, a.json),
            Err(_) => cut += 1,
        }
        if cut > 0 && read_before_penalty.is_none() {
            read_before_penalty = Some(refused_400);
        }
    }
    let read_before_penalty = read_before_penalty.unwrap_or(refused_400);
    assert!(
        (20..=25).contains(&read_before_penalty),
        "{read_before_penalty} junk bodies read before the penalty"
    );
    assert_eq!(refused_400 + cut, 200);
    let lost = send_good(&app.http, &unique("good"), 50).await;
    assert!(lost.is_empty(), "{lost:?}");

    let (_, status) = app.admin.get("/admin/status").await;
    let clients = &status["clients"];
    assert_eq!(clients["refused"][0]["address"], "127.0.0.2", "{clients}");
    assert_eq!(clients["accepted"][0]["address"], "127.0.0.1", "{clients}");
    assert_eq!(clients["accepted"][0]["count"], 50);
    assert_eq!(clients["penalized"], 1);
    let (_, metrics) = app.admin.request("GET", "/metrics", Bytes::new()).await;
    let text = metrics.as_str().unwrap().to_string();
    assert!(
        text.contains("hookbridge_client_penalties_total 1"),
        "{text}"
    );

    // The penalty is bounded: afterwards the attacker's junk is read (and
    // refused) again.
    eventually(WAIT, "the penalty ends", || async {
        let fresh = Http::from_address(app.addr, ip("127.0.0.2"), Duration::ZERO);
        matches!(
            fresh.try_request("POST", "/webhooks/kinovi", Bytes::from_static(b"{}")).await,
            Ok(a) if a.status == StatusCode::BAD_REQUEST
        )
        .then_some(())
    })
    .await;
    app.stop().await;
}

/// One early-answer case: name, request head, first body bytes, pause
/// before the rest, the status expected, and the client's address.
type EarlyCase = (&'static str, String, Vec<u8>, Duration, u16, IpAddr);

/// Answers sent before the body is read reach a client that is still
/// sending 1 MiB, on a fresh and on a keep-alive connection: 413 for a
/// declared or a chunked body over the limit, 408 for a body behind the
/// minimum pace, 429 for a client in penalty. Never a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_answers_reach_a_client_still_sending() {
    const MIB: usize = 1024 * 1024;
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.rate_limit.trusted_proxies = vec!["127.0.0.9".into()];
    config.server.rate_limit.forwarded_header = ForwardedHeader::Forwarded;
    config.server.rate_limit.refusal_burst = 1;
    config.server.rate_limit.refusals_per_sec = 1;
    config.server.rate_limit.penalty_secs = 600;
    let app = TestApp::start(config).await;
    let post = |extra: &str| {
        format!("POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}\r\n")
    };
    // A client behind the trusted proxy 127.0.0.9, put in penalty by two
    // refused requests (its budget is one).
    let proxied = "Forwarded: for=198.51.100.7\r\n";
    for _ in 0..2 {
        let stream = connect_from(app.addr, ip("127.0.0.9")).await.unwrap();
        let head = post(&format!(
            "{proxied}Connection: close\r\nContent-Length: 2\r\n"
        ));
        let seen = answer_while_sending(stream, head, b"{}".to_vec(), Duration::ZERO, 0)
            .await
            .unwrap();
        assert_eq!(status_of(&seen), Some(400));
    }
    let cases: [EarlyCase; 4] = [
        (
            "declared",
            post(&format!("Content-Length: {}\r\n", 2 * MIB)),
            vec![],
            Duration::ZERO,
            413,
            ip("127.0.0.2"),
        ),
        (
            "chunked",
            post("Transfer-Encoding: chunked\r\n"),
            vec![],
            Duration::ZERO,
            413,
            ip("127.0.0.3"),
        ),
        // 10 bytes, then nothing for 2.5 s: behind 1 KiB/s after the 2 s grace.
        (
            "slow",
            post(&format!("Content-Length: {}\r\n", MIB - 100)),
            vec![b'{'; 10],
            Duration::from_millis(2500),
            408,
            ip("127.0.0.4"),
        ),
        (
            "penalty",
            post(&format!("{proxied}Content-Length: {}\r\n", MIB)),
            vec![],
            Duration::ZERO,
            429,
            ip("127.0.0.9"),
        ),
    ];
    for (name, head, prefix, pause, expected, from) in cases {
        for keep_alive in [false, true] {
            let stream = if keep_alive && expected != 429 {
                used_connection(app.addr, from).await
            } else {
                connect_from(app.addr, from).await.unwrap()
            };
            // A chunked body: 1.1 MiB of 64 KiB chunks, framed.
            let (head, prefix) = if name == "chunked" {
                let mut framed = Vec::new();
                for _ in 0..18 {
                    framed.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
                    framed.extend_from_slice(&vec![b'x'; 64 * 1024]);
                    framed.extend_from_slice(b"\r\n");
                }
                (head.clone(), framed)
            } else {
                (head.clone(), prefix.clone())
            };
            let seen = answer_while_sending(stream, head, prefix, pause, MIB)
                .await
                .unwrap_or_else(|e| {
                    panic!("{name} (keep-alive {keep_alive}): reset before an answer: {e}")
                });
            assert_eq!(
                status_of(&seen),
                Some(expected),
                "{name} (keep-alive {keep_alive}): {}",
                String::from_utf8_lossy(&seen)
            );
            let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
            assert!(text.contains("connection: close"), "{name}: {text}");
        }
    }
    app.stop().await;
}

/// 300 connections from one other address, each declaring a 100 kB body
/// and sending a byte every 2 s: the address holds at most its share of
/// slots, the slow bodies get 408 at the minimum pace, and the sender's
/// callbacks on fresh connections all pass meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_from_another_address_do_not_hold_the_sender() {
    const SLOW: usize = 300;
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.max_connections = 128;
    config.server.max_connections_per_client = 32;
    let app = TestApp::start(config).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attack: Vec<_> = (0..SLOW)
        .map(|_| {
            let (addr, stop) = (app.addr, stop.clone());
            tokio::spawn(async move {
                let mut answered_408 = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = connect_from(addr, ip("127.0.0.2")).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let head = "POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n";
                    if s.write_all(head.as_bytes()).await.is_err() {
                        continue;
                    }
                    let mut buf = [0u8; 1024];
                    loop {
                        tokio::select! {
                            read = s.read(&mut buf) => {
                                match read {
                                    Ok(n) if n > 0 => {
                                        answered_408 += usize::from(status_of(&buf[..n]) == Some(408));
                                    }
                                    _ => break,
                                }
                            }
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                                if s.write_all(b"x").await.is_err() { break; }
                            }
                        }
                    }
                }
                answered_408
            })
        })
        .collect();
    // Let the attack fill what it can.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let run = unique("good");
    let mut lost = Vec::new();
    for i in 0..20 {
        let fresh = Http::new(app.addr);
        lost.extend(send_good(&fresh, &format!("{run}_{i}"), 1).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered_408 = 0;
    for task in attack {
        answered_408 += tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
    assert!(lost.is_empty(), "{lost:?}");
    assert!(
        answered_408 >= 32,
        "slow bodies answered 408: {answered_408}"
    );
    let counters = app.outbox.status().unwrap().counters;
    assert_eq!(counters["accepted"], 20);
    // The attacker is turned away cheaply: at the per-address cap, or (once
    // its 408s spent its refusal budget) at accept, in penalty.
    let turned_away = counters["refusedConnections"].as_u64().unwrap()
        + counters["refusedPenalty"].as_u64().unwrap();
    assert!(turned_away > 0, "{counters}");
    app.stop().await;
}

/// An attacker churning connections (each one `GET /healthz`, then idle)
/// at a small connection cap: the sender's pooled keep-alive connection,
/// which carries valid callbacks, is never the one evicted, and no request
/// of the sender fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_does_not_cost_a_pooled_sender() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.max_connections = 16;
    let app = TestApp::start(config).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..8)
        .map(|n| {
            let (addr, stop) = (app.addr, stop.clone());
            tokio::spawn(async move {
                let from = IpAddr::from([127, 0, 0, 2 + n as u8 % 4]);
                let mut held = Vec::new();
                let mut opened = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = connect_from(addr, from).await else {
                        continue;
                    };
                    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let mut buf = [0u8; 512];
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await;
                    }
                    opened += 1;
                    held.push(s);
                    if held.len() > 8 {
                        held.remove(0);
                    }
                }
                opened
            })
        })
        .collect();
    let sender = Http::from_address(app.addr, ip("127.0.0.1"), Duration::from_secs(60));
    let run = unique("pooled");
    let mut lost = Vec::new();
    for i in 0..100 {
        lost.extend(send_good(&sender, &format!("{run}_{i}"), 1).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut opened = 0;
    for task in churn {
        opened += tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    }
    assert!(opened > 40, "the churn opened {opened} connections");
    assert!(lost.is_empty(), "{} of 100 lost: {lost:?}", lost.len());
    app.stop().await;
}

/// Known senders keep slots and a share of the backlog of their own: with
/// every other slot held by slow bodies from elsewhere, the sender is
/// served at once; with the broker down, forged callbacks from elsewhere
/// fill only their share (then 503 with the reason), and the sender's still
/// pass and reach the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_senders_keep_their_slots_and_backlog_share() {
    let dir = temp_dir();
    let mut broker = PrivateBroker::nats();
    let (mut config, stream) = outage_config(dir.path(), &broker);
    config.server.senders = vec!["127.0.0.1/32".into()];
    config.server.max_connections = 24;
    config.server.sender_connections = 8;
    config.server.max_connections_per_client = 8;
    config.server.min_body_bytes_per_sec = 0;
    config.outbox.max_pending = 50;
    config.server.sender_backlog_percent = 20;
    let app = TestApp::start(config).await;

    // 4 addresses x 8 busy connections: more than the 16 shared slots.
    let mut busy = Vec::new();
    for n in 0..32u8 {
        let from = IpAddr::from([127, 0, 0, 2 + n % 4]);
        if let Ok(mut s) = connect_from(app.addr, from).await {
            let head =
                "POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nx";
            if s.write_all(head.as_bytes()).await.is_ok() {
                busy.push(s);
            }
        }
    }
    let run = unique("sender");
    for i in 0..5 {
        let fresh = Http::new(app.addr);
        let lost = send_good(&fresh, &format!("{run}_slot{i}"), 1).await;
        assert!(lost.is_empty(), "{lost:?}");
    }
    drop(busy);

    // The backlog: others may fill 40 of 50.
    let forger = Http::from_address(app.addr, ip("127.0.0.2"), Duration::from_secs(30));
    let forged = unique("forged");
    let mut accepted = 0;
    let mut refusal = None;
    for i in 0..60 {
        let answer = forger
            .try_callback(&callbacks::success(&format!("{forged}_{i}")))
            .await
            .unwrap();
        match answer.status {
            StatusCode::OK => accepted += 1,
            StatusCode::SERVICE_UNAVAILABLE => refusal = Some(answer),
            other => panic!("forged callback answered {other}"),
        }
    }
    assert_eq!(accepted + 5, 40, "others fill the backlog up to 80%");
    let refusal = refusal.expect("a 503 past the share");
    assert_eq!(refusal.json["error"], "backlog_full");
    assert!(
        refusal.json["message"]
            .as_str()
            .unwrap()
            .contains("reserved"),
        "{}",
        refusal.json
    );
    assert!(refusal.headers.contains_key("retry-after"));
    let lost = send_good(&Http::new(app.addr), &format!("{run}_backlog"), 10).await;
    assert!(lost.is_empty(), "{lost:?}");

    broker.start().await;
    let stored = nats::read_stream(&broker.nats_url(), &stream, 50, WAIT * 2, secs(1)).await;
    let senders_events = stored
        .iter()
        .filter(|m| m.value["taskId"].as_str().unwrap().starts_with(&run))
        .count();
    assert_eq!(senders_events, 15, "every callback of the sender");
    assert_eq!(stored.len(), 50);
    app.stop().await;
}

/// With senders configured, `others_per_sec` may hold every other address
/// to a request rate (429, unread, `Connection: close`); the sender is
/// never limited. Behind a trusted proxy the configured header names the
/// client: another header, or hops a client wrote itself, do not dodge it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn others_may_be_rate_limited_by_the_client_the_proxy_names() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.senders = vec!["198.51.100.1".into()];
    config.server.rate_limit.others_per_sec = 1;
    config.server.rate_limit.others_burst = 5;
    config.server.rate_limit.trusted_proxies = vec!["127.0.0.0/8".into()];
    config.server.rate_limit.forwarded_header = ForwardedHeader::Forwarded;
    let app = TestApp::start(config).await;
    let get = |forwarded: String, spoof: String| {
        let http = Http::new(app.addr);
        async move {
            http.try_request_with(
                "GET",
                "/healthz",
                Bytes::new(),
                &[("forwarded", &forwarded), ("x-forwarded-for", &spoof)],
            )
            .await
            .unwrap()
        }
    };
    let mut statuses = Vec::new();
    let started = std::time::Instant::now();
    for n in 0..20 {
        // The attacker rotates X-Forwarded-For; the proxy's Forwarded names it.
        let answer = get("for=203.0.113.5".into(), format!("192.0.2.{n}")).await;
        statuses.push(answer.status);
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.json["error"], "rate_limited");
            assert!(answer.headers.contains_key("retry-after"));
        }
    }
    let passed = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    // The burst, plus one a second of the time the requests took (and one
    // for a refill at a second's edge).
    let most = 5 + started.elapsed().as_secs() as usize + 1;
    assert!((5..=most).contains(&passed), "{statuses:?}");
    // The sender, through the same proxy, is never limited.
    for _ in 0..30 {
        let answer = get("for=198.51.100.1".into(), "203.0.113.5".into()).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let (_, status) = app.admin.get("/admin/status").await;
    assert_eq!(
        status["clients"]["refused"][0]["address"], "203.0.113.5",
        "{status}"
    );
    app.stop().await;
}

/// `others_per_sec` without senders would limit the provider: refused at
/// start, naming the key.
#[test]
fn others_per_sec_needs_senders() {
    let mut config = Config::default();
    config.server.rate_limit.others_per_sec = 10;
    config.server.rate_limit.others_burst = 10;
    let error = config.validate().unwrap_err().to_string();
    assert!(
        error.contains("server.rate_limit.others_per_sec"),
        "{error}"
    );
}

/// More busy connections from one address than its cap: the ones past it
/// wait for a connection of that address to end and are then served; a
/// sender's burst is late, never refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_per_address_cap_wait_their_turn() {
    const CLIENTS: usize = 12;
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.max_connections = 12;
    config.server.max_connections_per_client = 3;
    let app = TestApp::start(config).await;
    let run = unique("cap");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let addr = app.addr;
            let body = serde_json::to_vec(&callbacks::success(&format!("{run}_{n}"))).unwrap();
            tokio::spawn(async move {
                let stream = connect_from(addr, ip("127.0.0.1")).await.unwrap();
                let head = format!(
                    "POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                // Half the body now, the rest 300 ms later: each connection
                // stays busy for a while.
                let (first, rest) = body.split_at(body.len() / 2);
                let mut stream = stream;
                stream.write_all(head.as_bytes()).await.unwrap();
                stream.write_all(first).await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                answer_while_sending(stream, String::new(), rest.to_vec(), Duration::ZERO, 0).await
            })
        })
        .collect();
    for client in clients {
        let seen = client.await.unwrap().expect("answered");
        assert_eq!(
            status_of(&seen),
            Some(200),
            "{}",
            String::from_utf8_lossy(&seen)
        );
    }
    assert_eq!(
        app.outbox.status().unwrap().counters["accepted"],
        CLIENTS as u64
    );
    app.stop().await;
}
