use axum::body::Body;
use axum::http::{header, Request};
use tower::ServiceExt;

use super::*;
use crate::config::Config;
use crate::secret::Secret;

const TOKEN: &str = "a-long-enough-admin-token";

/// The admin router with `token`, on a fresh data dir holding a dead letter
/// whose reason is markup.
async fn app(dir: &std::path::Path, token: Option<&str>) -> (Router, AppState, u64) {
    let mut config = Config::default();
    config.outbox.data_dir = dir.to_path_buf();
    config.admin.token = token.map(Secret::new);
    let outbox = crate::outbox::Outbox::open(&config.outbox).unwrap();
    let event = crate::poll::synthetic_pending("task_<b>x</b>", 1);
    let seq = outbox
        .bury(event, "refused: <script>alert(1)</script>".into())
        .await
        .unwrap();
    let state = crate::http::admin::state(&config, outbox);
    (
        crate::http::admin_router(state.clone(), &config),
        state,
        seq,
    )
}

struct Answer {
    status: u16,
    headers: axum::http::HeaderMap,
    text: String,
}

async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut request = Request::builder().method(method).uri(uri);
    if !headers.iter().any(|(k, _)| *k == "host") {
        request = request.header(header::HOST, "127.0.0.1:9091");
    }
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

/// Signs in; returns the `Cookie` header value and the CSRF token.
async fn sign_in(app: &Router, token: &str) -> (String, String) {
    let answer = send(app, "POST", "/ui/login", &[FORM], &format!("token={token}")).await;
    assert_eq!(answer.status, 303, "{}", answer.text);
    let set = answer.headers[header::SET_COOKIE].to_str().unwrap();
    let cookie = set.split(';').next().unwrap().to_string();
    let page = send(app, "GET", "/ui/dead-letters", &[("cookie", &cookie)], "").await;
    let csrf = page
        .text
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .to_string();
    (cookie, csrf)
}

#[tokio::test]
async fn the_overview_is_served_with_strict_headers_and_escaped_data() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _, seq) = app(dir.path(), None).await;
    let page = send(&app, "GET", "/ui", &[], "").await;
    assert_eq!(page.status, 200, "{}", page.text);
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["cache-control"], "no-store");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'") && csp.contains("frame-ancestors 'none'"));
    assert!(page.text.contains("id=\"readiness\">Ready<"));
    assert!(page.text.contains("id=\"dead-letters\">1<"));
    assert_eq!(page.text.matches("<svg").count(), charts::SERIES.len());
    assert!(
        page.text.contains(">refused</a>"),
        "the reason without details"
    );
    assert!(!page.text.contains("<script"), "no script, even from data");

    let list = send(&app, "GET", "/ui/dead-letters?reason=refused", &[], "").await;
    assert!(list
        .text
        .contains("refused: &lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(list.text.contains("task_&lt;b&gt;x&lt;/b&gt;"));
    assert!(!list.text.contains("<script") && !list.text.contains("<b>x"));
    let other = send(&app, "GET", "/ui/dead-letters?reason=other", &[], "").await;
    assert!(other.text.contains("No dead letters here."));
    let one = send(&app, "GET", &format!("/ui/dead-letters/{seq}"), &[], "").await;
    assert_eq!(one.status, 200);
    assert!(one
        .text
        .contains("&quot;taskId&quot;: &quot;task_&lt;b&gt;x&lt;/b&gt;&quot;"));
    assert_eq!(
        send(&app, "GET", "/ui/dead-letters/999", &[], "")
            .await
            .status,
        404
    );

    let css = send(&app, "GET", "/ui/assets/console.css", &[], "").await;
    assert_eq!(css.headers["content-type"], "text/css; charset=utf-8");
    let found = send(&app, "GET", "/ui/tasks?taskId=a%2Fb", &[], "").await;
    assert_eq!(found.headers["location"], "/ui/tasks/a%2Fb");
}

#[tokio::test]
async fn with_a_token_pages_need_a_session_and_actions_its_csrf_token() {
    let dir = tempfile::tempdir().unwrap();
    let (app, state, seq) = app(dir.path(), Some(TOKEN)).await;
    let anonymous = send(&app, "GET", "/ui", &[], "").await;
    assert_eq!(
        (anonymous.status, &anonymous.headers["location"]),
        (303, &"/ui/login".parse().unwrap())
    );
    assert_eq!(send(&app, "GET", "/ui/login", &[], "").await.status, 200);
    let bearer = format!("Bearer {TOKEN}");
    assert_eq!(
        send(&app, "GET", "/ui", &[("authorization", &bearer)], "")
            .await
            .status,
        200
    );
    let wrong = send(
        &app,
        "POST",
        "/ui/login",
        &[FORM],
        "token=a-long-enough-admin-tokeN",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());

    let answer = send(
        &app,
        "POST",
        "/ui/login",
        &[FORM],
        &format!("token={TOKEN}"),
    )
    .await;
    let set = answer.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(
        set.contains("; HttpOnly; SameSite=Strict; Path=/ui; Max-Age="),
        "{set}"
    );
    let (cookie, csrf) = sign_in(&app, TOKEN).await;
    let signed = [("cookie", cookie.as_str()), FORM];
    let list = send(&app, "GET", "/ui/dead-letters", &signed, "").await;
    assert!(list.text.contains(&format!("id=\"requeue-{seq}\"")));
    assert!(
        !list.text.contains("id=\"bury-"),
        "bury only on the letter's page"
    );
    let one = send(&app, "GET", &format!("/ui/dead-letters/{seq}"), &signed, "").await;
    assert!(one.text.contains(&format!("id=\"bury-{seq}\"")));

    let requeue = format!("seq={seq}");
    let missing = send(&app, "POST", "/ui/dead-letters/requeue", &signed, &requeue).await;
    assert_eq!(missing.status, 403, "no CSRF token");
    let other = if csrf.starts_with('0') { '1' } else { '0' };
    let forged = format!("seq={seq}&csrf={other}{}", &csrf[1..]);
    assert_eq!(
        send(&app, "POST", "/ui/dead-letters/requeue", &signed, &forged)
            .await
            .status,
        403
    );
    let good = format!("seq={seq}&csrf={csrf}");
    let no_session = send(&app, "POST", "/ui/dead-letters/requeue", &[FORM], &good).await;
    assert_eq!(no_session.status, 401);
    let cross = [
        ("cookie", cookie.as_str()),
        FORM,
        ("sec-fetch-site", "cross-site"),
    ];
    assert_eq!(
        send(&app, "POST", "/ui/dead-letters/requeue", &cross, &good)
            .await
            .status,
        403
    );
    let origin = [
        ("cookie", cookie.as_str()),
        FORM,
        ("origin", "https://evil.example"),
    ];
    let refused = send(&app, "POST", "/ui/dead-letters/requeue", &origin, &good).await;
    assert_eq!(refused.status, 403);
    assert_eq!(
        refused.headers["x-frame-options"], "DENY",
        "refusals carry the headers too"
    );
    assert_eq!(
        state.outbox.status().unwrap().dead_letters,
        1,
        "nothing moved yet"
    );

    let same = [
        ("cookie", cookie.as_str()),
        FORM,
        ("sec-fetch-site", "same-origin"),
    ];
    let done = send(&app, "POST", "/ui/dead-letters/requeue", &same, &good).await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert!(done
        .text
        .contains(&format!("Dead letter {seq} is pending again.")));
    let status = state.outbox.status().unwrap();
    assert_eq!((status.dead_letters, status.pending), (0, 1));

    let buried = state
        .outbox
        .bury(
            crate::poll::synthetic_pending("task_b", 1),
            "refused: no".into(),
        )
        .await
        .unwrap();
    let bury = format!("seq={buried}&csrf={csrf}");
    let done = send(&app, "POST", "/ui/dead-letters/bury", &signed, &bury).await;
    assert!(done.text.contains("is deleted for good"), "{}", done.text);
    assert_eq!(state.outbox.status().unwrap().dead_letters, 0);
    assert_eq!(
        send(&app, "POST", "/ui/dead-letters/bury", &signed, &bury)
            .await
            .status,
        404
    );

    let out = send(&app, "POST", "/ui/logout", &signed, &format!("csrf={csrf}")).await;
    assert_eq!(out.status, 303);
    assert_eq!(
        send(&app, "GET", "/ui", &[("cookie", &cookie)], "")
            .await
            .status,
        303
    );
}

#[tokio::test]
async fn without_a_token_a_session_is_still_needed_to_act() {
    let dir = tempfile::tempdir().unwrap();
    let (app, state, seq) = app(dir.path(), None).await;
    let login = send(&app, "GET", "/ui/login", &[], "").await;
    assert!(login.text.contains("No <code>admin.token</code> is set"));
    let bare = send(
        &app,
        "POST",
        "/ui/dead-letters/bury",
        &[FORM, ("authorization", "Bearer x")],
        &format!("seq={seq}"),
    )
    .await;
    assert_eq!(bare.status, 403, "an Authorization header is not a session");
    let (cookie, csrf) = sign_in(&app, "").await;
    let signed = [("cookie", cookie.as_str()), FORM];
    let done = send(
        &app,
        "POST",
        "/ui/dead-letters/bury",
        &signed,
        &format!("seq={seq}&csrf={csrf}"),
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.text);
    assert_eq!(state.outbox.status().unwrap().dead_letters, 0);
    let foreign = send(&app, "GET", "/ui", &[("host", "evil.example")], "").await;
    assert_eq!(foreign.status, 403, "DNS rebinding");
}

#[test]
fn the_timeline_shows_each_decision_and_where_the_event_landed() {
    use crate::trace::{CallbackEntry, Decision, Origin, Publication, TaskTrace};
    let entry = |at: i64, decision: Decision, reason: Option<&str>| CallbackEntry {
        received_at: at,
        origin: Origin::Webhook,
        client: Some("192.0.2.7".parse().unwrap()),
        state: Some(crate::event::State::Success),
        decision,
        reason: reason.map(String::from),
        status: None,
        event_id: Some("e1".into()),
        trace_id: None,
    };
    let trace = TaskTrace {
        task_id: "t<1>".into(),
        callbacks: vec![
            entry(1000, Decision::Accepted, None),
            entry(3000, Decision::Duplicate, None),
            entry(4000, Decision::Rejected, Some("<img src=x>")),
        ],
        published: vec![Publication {
            event_id: "e1".into(),
            state: crate::event::State::Success,
            at: 2000,
            broker: "kafka",
            topic: "events".into(),
            receipt: crate::publish::Receipt {
                partition: Some(2),
                offset: Some(41),
                ..Default::default()
            },
            trace_id: None,
        }],
    };
    let html = timeline::timeline(&trace);
    let order: Vec<&str> = html
        .split("<li class=\"")
        .skip(1)
        .map(|li| li.split('"').next().unwrap())
        .collect();
    assert_eq!(order, ["accepted", "published", "duplicate", "rejected"]);
    assert!(html.contains("partition <b class=\"partition\">2</b>"));
    assert!(html.contains("offset <b class=\"offset\">41</b>"));
    assert!(html.contains("reason: &lt;img src=x&gt;") && !html.contains("<img"));
    assert!(html.contains("1970-01-01T00:00:01.000Z"));

    let mut nats = trace.clone();
    nats.published[0].broker = "nats";
    nats.published[0].receipt = crate::publish::Receipt {
        stream: Some("TASKS".into()),
        sequence: Some(7),
        ..Default::default()
    };
    let html = timeline::timeline(&nats);
    assert!(html.contains("stream <code>TASKS</code> · sequence <b class=\"sequence\">7</b>"));
    assert!(!html.contains("partition"));
}
