//! The public edge under abuse, on real loopback sockets: half-sent
//! requests, slow bodies, more connections than the cap, junk floods, rate
//! limits, the admin listener's checks and native TLS. Every loop is bounded
//! in count and time; the tests assert answers, the bench measures times.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hookbridge::config::{Config, Secret, TlsConfig};
use http_body_util::Full;
use hyper::StatusCode;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::nats::jetstream_publisher;
use crate::support::app::{config, file_config, free_port, temp_dir, ChildApp, Http, TestApp};
use crate::support::{brokers, callbacks, eventually, nats, secs, unique};

/// Upper bound of every wait here: generous, only there so nothing hangs.
const WAIT: Duration = Duration::from_secs(30);

/// Whether the server closes `stream` (EOF or reset) within `WAIT`,
/// returning what it sent first.
async fn closed_by_server(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|()| seen)
}

/// One raw HTTP/1.1 exchange with `Connection: close`; returns the status
/// line and the whole answer.
async fn raw(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = closed_by_server(&mut stream)
        .await
        .expect("the server answers and closes");
    String::from_utf8_lossy(&answer).into_owned()
}

/// 500 connections that never finish their headers are all closed by the
/// server, and a callback sent meanwhile is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_closed_and_good_callbacks_pass() {
    const LORIS: usize = 500;
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.header_timeout_ms = 1000;
    let app = TestApp::start(config).await;
    let mut loris = Vec::with_capacity(LORIS);
    for _ in 0..LORIS {
        let mut stream = TcpStream::connect(app.addr).await.unwrap();
        stream
            .write_all(b"POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            .await
            .unwrap();
        loris.push(stream);
    }
    let body = callbacks::success(&unique("task"));
    assert_eq!(app.callback(&body).await, StatusCode::OK);
    let closing = loris
        .into_iter()
        .map(|mut s| async move { closed_by_server(&mut s).await.is_some() });
    let closed = futures::future::join_all(closing).await;
    assert_eq!(
        closed.iter().filter(|c| **c).count(),
        LORIS,
        "all closed by the server"
    );
    // A fresh client: the first callback's keep-alive connection has been
    // idle for about the header timeout too, and the server closes it then
    // by design, so reusing it would race that close.
    let fresh = Http::new(app.addr);
    assert_eq!(fresh.callback(&body).await, StatusCode::OK, "still serving");
    app.stop().await;
}

/// A body that stops coming is answered 408 at the body timeout and its
/// connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_gets_408_and_is_closed() {
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.body_timeout_ms = 1000;
    let app = TestApp::start(config).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"taskId\"",
        )
        .await
        .unwrap();
    let answer = closed_by_server(&mut stream)
        .await
        .expect("closed by the server");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("body_timeout"), "{answer}");
    app.http.assert_healthy().await;
    app.stop().await;
}

/// SIGTERM while a body is still arriving: the real binary exits cleanly at
/// the shutdown deadline, long before the (large) body timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_slow_body_open_exits_at_the_shutdown_deadline() {
    let dir = temp_dir();
    let env = [
        ("HOOKBRIDGE_SERVER__BODY_TIMEOUT_MS", "600000".to_string()),
        ("HOOKBRIDGE_SERVER__MIN_BODY_BYTES_PER_SEC", "0".to_string()),
        ("HOOKBRIDGE_SERVER__SHUTDOWN_TIMEOUT_MS", "1000".to_string()),
        ("HOOKBRIDGE_OUTBOX__SHUTDOWN_GRACE_MS", "1000".to_string()),
    ];
    let child = ChildApp::start(dir.path(), free_port(), &env).await;
    let mut slow = TcpStream::connect(child.addr).await.unwrap();
    slow.write_all(b"POST /webhooks/kinovi HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    // The server is serving (and so has the slow request's connection).
    child.http.assert_healthy().await;
    let status = child.terminate(WAIT).await;
    assert!(status.success(), "clean exit on SIGTERM, got {status}");
    assert!(closed_by_server(&mut slow).await.is_some());
}

/// With the cap at N, N+100 idle connections do not keep a callback out:
/// at the cap the oldest idle connection is closed to make room (the header
/// timeout is far away here, so only that can let the callback in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_lets_a_good_callback_through() {
    const CAP: usize = 20;
    let dir = temp_dir();
    let mut config = file_config(dir.path());
    config.server.max_connections = CAP;
    config.server.header_timeout_ms = 600_000;
    let app = TestApp::start(config).await;
    let mut idle = Vec::new();
    for _ in 0..CAP + 100 {
        idle.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let answer = Http::new(app.addr)
        .try_callback(&callbacks::success(&unique("task")))
        .await
        .expect("answered despite the idle connections");
    assert_eq!(answer.status, StatusCode::OK);
    // The oldest idle connections were the ones closed.
    let mut closed = 0;
    for stream in idle.iter_mut().take(100) {
        closed += usize::from(closed_by_server(stream).await.is_some());
    }
    assert!(closed >= 100 - CAP, "{closed} of the oldest 100 closed");
    app.stop().await;
}

/// 300 invalid 1 MiB bodies from 32 connections while good callbacks are
/// sent: every good one gets 200 and arrives on the broker once; the junk is
/// refused, counted, kept cut to a few KiB, and never stored in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_flood_does_not_cost_a_good_callback() {
    const JUNK: usize = 300;
    const SENDERS: usize = 32;
    const GOOD: usize = 40;
    let url = brokers::nats().await;
    let (stream, prefix) = (unique("EDGE").to_uppercase(), unique("edge"));
    let subject = nats::create_stream(&url, &stream, &prefix, Duration::from_secs(120)).await;
    let dir = temp_dir();
    let config = config(dir.path(), jetstream_publisher(&url, &subject, None));
    let app = TestApp::start(config).await;

    let junk = Bytes::from(vec![b'x'; 1024 * 1024 - 64]);
    let flood: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (http, junk) = (Http::new(app.addr), junk.clone());
            tokio::spawn(async move {
                let mut refused = 0;
                for _ in (s..JUNK).step_by(SENDERS) {
                    let answer = http
                        .try_request("POST", "/webhooks/kinovi", junk.clone())
                        .await
                        .expect("junk is answered");
                    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.json);
                    refused += 1;
                }
                refused
            })
        })
        .collect();
    let run = unique("good");
    for n in 0..GOOD {
        let body = callbacks::success(&format!("{run}_{n}"));
        let answer = app.http.try_callback(&body).await.expect("answered");
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    }
    let mut refused = 0;
    for sender in flood {
        refused += tokio::time::timeout(WAIT * 4, sender)
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(refused, JUNK);

    let stored = nats::read_stream(&url, &stream, GOOD as u64, WAIT, secs(1)).await;
    assert_eq!(stored.len(), GOOD, "each good callback once");
    let counters = app.outbox.status().unwrap().counters;
    assert_eq!(counters["rejected"], JUNK as u64);
    assert_eq!(counters["accepted"], GOOD as u64, "no junk in the outbox");
    let (_, kept) = app.admin.get("/admin/rejected?limit=5").await;
    let kept = kept["rejected"].as_array().unwrap().clone();
    assert_eq!(kept.len(), 5);
    for r in &kept {
        assert!(r["body"].as_str().unwrap().len() <= 4096);
        assert_eq!(r["bodyTruncated"], true);
    }
    app.stop().await;
}

/// `/admin/*` is only on the admin listener, which checks Host and refuses
/// cross-site requests and unauthenticated POSTs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_is_separate_and_checks_host_and_origin() {
    let dir = temp_dir();
    let app = TestApp::start(file_config(dir.path())).await;
    let (status, _) = app.http.get("/admin/status").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not on the public listener");
    let (status, _) = Http::new(app.admin_addr).get("/healthz").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "callbacks only on the public one"
    );
    let (status, body) = Http::new(app.admin_addr).get("/admin/status").await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let get = |host: &str| {
        format!("GET /admin/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let answer = raw(app.admin_addr, &get("evil.example")).await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    let answer = raw(
        app.admin_addr,
        &get(&format!("localhost:{}", app.admin_addr.port())),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("access-control-allow"),
        "no CORS"
    );

    let post = |extra: &str| {
        format!(
            "POST /admin/dead-letters/requeue HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let answer = raw(app.admin_addr, &post("")).await;
    assert!(
        answer.starts_with("HTTP/1.1 401"),
        "POST needs Authorization: {answer}"
    );
    let answer = raw(
        app.admin_addr,
        &post("Authorization: Bearer x\r\nOrigin: https://evil.example\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "cross-site: {answer}");
    let answer = raw(
        app.admin_addr,
        &post("Authorization: Bearer x\r\nSec-Fetch-Site: cross-site\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "cross-site: {answer}");
    let answer = raw(app.admin_addr, &post("Authorization: Bearer x\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

/// The real binary refuses an admin listener beyond loopback without a
/// token, naming the key.
#[tokio::test]
async fn non_loopback_admin_without_a_token_is_refused_at_start() {
    let dir = temp_dir();
    let run = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_hookbridge"));
        cmd.arg("check")
            .env("HOOKBRIDGE_ADMIN__LISTEN", "0.0.0.0:0")
            .env("HOOKBRIDGE_OUTBOX__DATA_DIR", dir.path());
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("HOOKBRIDGE_TEST_") {
                cmd.env_remove(key);
            }
        }
        if let Some(token) = token {
            cmd.env("HOOKBRIDGE_ADMIN__TOKEN", token);
        }
        cmd.output().unwrap()
    };
    let refused = run(None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("admin.listen"), "{stderr}");
    let secret = "a-long-enough-admin-token";
    let accepted = run(Some(secret));
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&accepted.stdout).contains(secret),
        "token masked"
    );
}

/// A test CA and a `localhost` certificate it signed: (CA DER, cert PEM, key PEM).
fn issue_certificate() -> (rustls::pki_types::CertificateDer<'static>, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    (ca.der().clone(), leaf.pem(), key.serialize_pem())
}

/// GET https://localhost:port/healthz trusting only `ca`.
async fn https_get(
    port: u16,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> Result<StatusCode, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .build();
    let client = Client::builder(TokioExecutor::new()).build::<_, Full<Bytes>>(https);
    let request = hyper::Request::get(format!("https://localhost:{port}/healthz"))
        .body(Full::default())
        .unwrap();
    let response = tokio::time::timeout(WAIT, client.request(request))
        .await
        .map_err(|_| "no answer".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    Ok(response.status())
}

/// Native TLS: a real client handshakes with a certificate from a test CA,
/// plaintext to the TLS port gets no HTTP answer, and a replaced
/// certificate is picked up without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_rejects_plaintext_and_reloads_the_certificate() {
    let dir = temp_dir();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let (ca, cert_pem, key_pem) = issue_certificate();
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    let mut config = file_config(dir.path());
    config.server.tls = Some(TlsConfig {
        cert: cert.clone(),
        key: key.clone(),
        reload_check_ms: 100,
    });
    let app = TestApp::start(config).await;
    let port = app.addr.port();
    assert_eq!(https_get(port, &ca).await, Ok(StatusCode::OK));

    let answer = raw(
        app.addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        !answer.contains("HTTP/1.1 200"),
        "plaintext must not be served: {answer:?}"
    );

    let (new_ca, cert_pem, key_pem) = issue_certificate();
    assert!(
        https_get(port, &new_ca).await.is_err(),
        "not yet the new certificate"
    );
    // A certificate that cannot be used is logged and counted; the current
    // one is still served.
    std::fs::write(&cert, "not a certificate").unwrap();
    eventually(WAIT, "the failed reload to be counted", || async {
        let scrape = app.admin.get("/metrics").await.1;
        let text = scrape.as_str().unwrap_or_default().to_string();
        (!text.contains("hookbridge_tls_reload_failures_total 0\n")
            && text.contains("hookbridge_tls_reload_failures_total "))
        .then_some(())
    })
    .await;
    assert_eq!(https_get(port, &ca).await, Ok(StatusCode::OK));
    std::fs::write(&key, &key_pem).unwrap();
    std::fs::write(&cert, &cert_pem).unwrap();
    eventually(WAIT, "the new certificate to be served", || {
        let new_ca = new_ca.clone();
        async move { (https_get(port, &new_ca).await == Ok(StatusCode::OK)).then_some(()) }
    })
    .await;
    app.stop().await;
}

/// An admin token that is too short is refused, naming the key.
#[test]
fn admin_token_is_checked() {
    let mut config = Config::default();
    config.admin.token = Some(Secret::new("short"));
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("admin.token"), "{err}");
}
