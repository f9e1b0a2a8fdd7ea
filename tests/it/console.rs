//! The operator console (`/ui` on the admin listener) in a real browser:
//! headless Chromium through chromedriver, against hookbridge on a real
//! Kafka broker. Screenshots go to `target/console-screenshots/`.
//!
//! Without Chromium or chromedriver each test prints one line and returns;
//! `scripts/brokers.sh install` (run by `scripts/test.sh`) installs them.

use std::time::Duration;

use fantoccini::Locator;
use hookbridge::config::Config;
use hookbridge::event::{parse, Source};
use hookbridge::secret::Secret;
use serde_json::json;

use crate::kafka::kafka_publisher;
use crate::support::app::{config, temp_dir, TestApp};
use crate::support::browser::Browser;
use crate::support::{callbacks, eventually, kafka, secs, unique};

const TOKEN: &str = "console-test-admin-token";

/// hookbridge on its own Kafka topic, with an admin token.
async fn kafka_app() -> (TestApp, String, String, tempfile::TempDir) {
    let (bootstrap, topic) = kafka::new_topic("console", 1).await;
    let dir = temp_dir();
    let mut config: Config = config(dir.path(), kafka_publisher(&bootstrap, &topic));
    config.admin.token = Some(Secret::new(TOKEN));
    (TestApp::start(config).await, bootstrap, topic, dir)
}

/// Signs in through the login form.
async fn sign_in(browser: &Browser, base: &str) {
    let c = &browser.client;
    c.goto(&format!("{base}/ui")).await.unwrap();
    assert!(
        c.current_url().await.unwrap().path().ends_with("/ui/login"),
        "pages need a session when admin.token is set"
    );
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(TOKEN)
        .await
        .unwrap();
    c.find(Locator::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The click returns once the form is sent; the redirect may follow.
    let deadline = tokio::time::Instant::now() + secs(10);
    while c.current_url().await.unwrap().path() != "/ui" {
        if tokio::time::Instant::now() > deadline {
            panic!(
                "not signed in: at {}, the page says:\n{}",
                c.current_url().await.unwrap(),
                browser.text().await
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens the overview, signs in, requeues a dead letter from its page, and
/// the event arrives on Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_requeued_in_the_browser_reaches_kafka() {
    let Some(browser) = Browser::start("console: requeue").await else {
        return;
    };
    let (app, bootstrap, topic, _dir) = kafka_app().await;
    let base = format!("http://{}", app.admin_addr);
    let task = unique("console_dead");
    let body = json!({"taskId": task, "state": "fail", "error": {"code": 500, "message": "x"}});
    let event = parse(body.to_string().as_bytes(), Source::Webhook, 1).unwrap();
    let seq = app
        .outbox
        .bury(event, "refused: <b>topic</b> unknown".into())
        .await
        .unwrap();

    sign_in(&browser, &base).await;
    let text = browser.text().await;
    for shown in [
        "Readiness",
        "Ready",
        "Backlog",
        "accepted",
        "published",
        "Dead letters by reason",
    ] {
        assert!(text.contains(shown), "{shown} on the overview:\n{text}");
    }
    let reasons = browser
        .client
        .find(Locator::Css("table.reasons"))
        .await
        .unwrap();
    assert!(reasons.text().await.unwrap().contains("refused"));
    browser.screenshot("overview").await;

    let c = &browser.client;
    c.goto(&format!("{base}/ui/dead-letters?reason=refused"))
        .await
        .unwrap();
    let text = browser.text().await;
    assert!(
        text.contains("refused: <b>topic</b> unknown"),
        "escaped, shown as text:\n{text}"
    );
    assert!(text.contains(&task));
    browser.screenshot("dead-letters").await;
    c.find(Locator::Id(&format!("requeue-{seq}")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    // The click returns once the form is sent; the answer follows.
    let result = c
        .wait()
        .at_most(secs(10))
        .for_element(Locator::Id("result"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(result, format!("Dead letter {seq} is pending again."));
    browser.screenshot("requeued").await;

    let records = kafka::consume(&bootstrap, &topic, 1, secs(60), secs(1)).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value["taskId"], task.as_str());
    assert_eq!(records[0].state(), "fail");
    assert_eq!(app.outbox.status().unwrap().dead_letters, 0);

    browser.close().await;
    app.stop().await;
}

/// A task that went through accepted, duplicate and stale decisions,
/// found with the search box: its timeline shows each decision, and each
/// publication with the partition and offset the Kafka consumer saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_page_shows_each_decision_and_the_kafka_partition_and_offset() {
    let Some(browser) = Browser::start("console: task timeline").await else {
        return;
    };
    let (app, bootstrap, topic, _dir) = kafka_app().await;
    let base = format!("http://{}", app.admin_addr);
    let task = unique("console_task");
    let now = 1_735_599_700_000i64;
    for body in [
        callbacks::progress(&task, "generating", now),
        callbacks::success(&task),
        callbacks::success(&task),
        callbacks::progress(&task, "waiting", now - 1),
    ] {
        assert_eq!(app.callback(&body).await, hyper::StatusCode::OK);
    }
    let records = kafka::consume(&bootstrap, &topic, 2, secs(60), secs(1)).await;
    assert_eq!(records.len(), 2);
    let path = format!("/admin/tasks/{task}");
    eventually(secs(10), "both publications in the trace", || async {
        let (_, trace) = app.admin.get(&path).await;
        (trace["published"].as_array().map(Vec::len) == Some(2)).then_some(())
    })
    .await;

    sign_in(&browser, &base).await;
    let c = &browser.client;
    let search = c.find(Locator::Css("input[name=taskId]")).await.unwrap();
    search.send_keys(&task).await.unwrap();
    search.send_keys("\u{E007}").await.unwrap(); // Enter
    eventually(secs(10), "the task page", || async {
        let url = c.current_url().await.ok()?;
        url.path().starts_with("/ui/tasks/").then_some(())
    })
    .await;
    assert_eq!(
        c.current_url().await.unwrap().path(),
        format!("/ui/tasks/{task}")
    );
    c.wait()
        .at_most(secs(10))
        .for_element(Locator::Id("timeline"))
        .await
        .unwrap();

    let mut classes = Vec::new();
    for li in c.find_all(Locator::Css("ol.timeline > li")).await.unwrap() {
        classes.push(li.attr("class").await.unwrap().unwrap_or_default());
    }
    for decision in ["accepted", "duplicate", "stale", "published"] {
        assert!(
            classes.iter().any(|c| c == decision),
            "{decision} in {classes:?}"
        );
    }
    assert_eq!(
        classes.iter().filter(|c| *c == "accepted").count(),
        2,
        "{classes:?}"
    );
    let mut landed = Vec::new();
    for li in c
        .find_all(Locator::Css("ol.timeline > li.published"))
        .await
        .unwrap()
    {
        let partition = li
            .find(Locator::Css(".partition"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let offset = li
            .find(Locator::Css(".offset"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        landed.push((
            partition.parse::<i32>().unwrap(),
            offset.parse::<i64>().unwrap(),
        ));
    }
    let mut consumed: Vec<(i32, i64)> = records.iter().map(|r| (r.partition, r.offset)).collect();
    landed.sort_unstable();
    consumed.sort_unstable();
    assert_eq!(landed, consumed, "where the consumer found the events");
    browser.screenshot("task").await;
    // The overview after this traffic: the README's picture.
    c.goto(&format!("{base}/ui")).await.unwrap();
    assert!(browser.text().await.contains("accepted"));
    browser.screenshot("overview-traffic").await;

    browser.close().await;
    app.stop().await;
}

/// A form posted from another site, and a post without the CSRF token,
/// are refused; the dead letter stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_posts_and_posts_without_the_csrf_token_are_refused() {
    let Some(browser) = Browser::start("console: cross-site").await else {
        return;
    };
    let dir = temp_dir();
    let mut config = crate::support::app::file_config(dir.path());
    config.admin.token = Some(Secret::new(TOKEN));
    let app = TestApp::start(config).await;
    let base = format!("http://{}", app.admin_addr);
    let event = parse(br#"{"taskId":"kept","state":"fail"}"#, Source::Webhook, 1).unwrap();
    let seq = app.outbox.bury(event, "refused".into()).await.unwrap();

    // Plain HTTP: sign in, read the CSRF token, then post without it and
    // with it but from another site.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let form = "application/x-www-form-urlencoded";
    let login = http
        .post(format!("{base}/ui/login"))
        .header("content-type", form)
        .body(format!("token={TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 303);
    let cookie = login.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page = http
        .get(format!("{base}/ui/dead-letters"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = page
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a CSRF token in the page")
        .to_string();
    let post = |body: String, site: Option<&'static str>| {
        let mut request = http
            .post(format!("{base}/ui/dead-letters/bury"))
            .header("content-type", form)
            .header("cookie", &cookie)
            .body(body);
        if let Some(site) = site {
            request = request
                .header("sec-fetch-site", site)
                .header("origin", "http://evil.example");
        }
        request.send()
    };
    let missing = post(format!("seq={seq}"), None).await.unwrap();
    assert_eq!(missing.status(), 403, "no CSRF token");
    let cross = post(format!("seq={seq}&csrf={csrf}"), Some("cross-site"))
        .await
        .unwrap();
    assert_eq!(cross.status(), 403, "cross-site");
    assert_eq!(cross.headers()["x-frame-options"], "DENY");
    assert_eq!(app.outbox.status().unwrap().dead_letters, 1);

    // The browser: a page on another site (localhost instead of 127.0.0.1,
    // another port) whose form posts to the console, while the browser has
    // a session there.
    let evil = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let evil_port = evil.local_addr().unwrap().port();
    let target = format!("{base}/ui/dead-letters/bury");
    let page = format!(
        "<!doctype html><form method=post action=\"{target}\">\
         <input type=hidden name=seq value={seq}><input type=hidden name=csrf value={csrf}>\
         <button id=go type=submit>win a prize</button></form>"
    );
    let site = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    let server = tokio::spawn(async move { axum::serve(evil, site).await });
    sign_in(&browser, &base).await;
    let c = &browser.client;
    c.goto(&format!("http://localhost:{evil_port}/"))
        .await
        .unwrap();
    c.find(Locator::Id("go"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let text = browser.text().await;
            if text.contains("Forbidden") || text.contains("Sign in") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("an answer to the cross-site form");
    assert!(refused.contains("Forbidden"), "{refused}");
    browser.screenshot("cross-site-refused").await;
    assert_eq!(app.outbox.status().unwrap().dead_letters, 1, "still there");

    server.abort();
    browser.close().await;
    app.stop().await;
}
