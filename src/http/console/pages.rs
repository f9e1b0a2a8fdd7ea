//! The console's pages: the overview, sign-in, and the dead letters (list,
//! one, requeue, bury).

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::html::{csrf_field, cut, duration_ms, escape, table, url_encode};
use super::{auth, charts, error, page, see_other, Access};
use crate::clock::now_ms;
use crate::http::clients::ClientCount;
use crate::http::{ready, AppState};
use crate::outbox::DeadLetter;
use crate::publish::rfc3339_millis;

/// Most dead letters one scan reads (the overview's counts by reason, a
/// filtered page): `outbox.max_dead_letters` may be 100,000.
pub const SCAN_LIMIT: usize = 10_000;
/// Dead letters on one page.
const PAGE: usize = 50;
/// Client addresses in each of the overview's tables.
const TOP: usize = 10;
/// Most bytes of a body shown on a page (a dead letter keeps up to
/// `outbox.dead_letter_keep_bytes`).
const SHOW_BYTES: usize = 64 * 1024;
/// Reasons listed on the overview.
const REASONS: usize = 20;

/// Runs a redb read on the blocking pool.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(read).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(internal(&e)),
        Err(e) => Err(internal(&e.to_string())),
    }
}

fn internal(detail: &str) -> Response {
    tracing::error!(%detail, "console: internal error");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Internal error (details in the log).",
    )
}

/// A dead letter's reason without its details (what follows the first
/// `:` or `(`), the key the overview counts and the list filters by.
pub fn reason_key(reason: &str) -> &str {
    let end = reason.find([':', '(']).unwrap_or(reason.len());
    cut(reason[..end].trim(), 120).0
}

/// Up to `want` dead letters after `after` whose reason key is `reason`
/// (any when `None`), reading at most [`SCAN_LIMIT`]; and the last `seq`
/// read when the scan stopped before the end.
fn scan(
    state: &AppState,
    reason: Option<&str>,
    after: Option<u64>,
    want: usize,
) -> Result<(Vec<DeadLetter>, Option<u64>), String> {
    let (mut found, mut read, mut after) = (Vec::new(), 0usize, after);
    loop {
        let chunk = state
            .outbox
            .dead_letters_after(after, 500)
            .map_err(|e| e.to_string())?;
        let Some(last) = chunk.last().map(|l| l.seq) else {
            return Ok((found, None));
        };
        for letter in chunk {
            read += 1;
            let seq = letter.seq;
            if reason.is_none_or(|r| reason_key(&letter.reason) == r) {
                found.push(letter);
                if found.len() == want {
                    return Ok((found, Some(seq)));
                }
            }
            if read == SCAN_LIMIT {
                return Ok((found, Some(seq)));
            }
        }
        after = Some(last);
    }
}

pub async fn overview(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
) -> Response {
    let now = now_ms();
    let stats = state.outbox.stats().clone();
    state.console.rates.record(&stats, now);
    let problems = ready::problems(&state.health, &state.outbox);
    let mut warnings = ready::warnings(&state.outbox, now);
    let read = state.clone();
    let gathered = blocking(move || {
        let registry = ready::registry_warning(&read);
        let status = read.outbox.status().map_err(|e| e.to_string())?;
        let (letters, cut_at) = scan(&read, None, None, SCAN_LIMIT)?;
        let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
        for letter in &letters {
            *reasons
                .entry(reason_key(&letter.reason).to_string())
                .or_default() += 1;
        }
        Ok((registry, status, reasons, cut_at.is_some()))
    })
    .await;
    let (registry, status, reasons, partial) = match gathered {
        Ok(g) => g,
        Err(response) => return response,
    };
    warnings.extend(registry);

    let mut body = String::new();
    let listed = |list: &[ready::Problem]| -> String {
        list.iter()
            .map(|p| format!("<li>{}: {}</li>", escape(p.component), escape(p.problem)))
            .collect()
    };
    if problems.is_empty() {
        body.push_str("<section><h2>Readiness</h2><p class=\"ok\" id=\"readiness\">Ready</p>");
    } else {
        body.push_str(&format!(
            "<section><h2>Readiness</h2><p class=\"bad\" id=\"readiness\">Unavailable</p><ul>{}</ul>",
            listed(&problems)
        ));
    }
    if !warnings.is_empty() {
        body.push_str(&format!("<p>Warnings:</p><ul>{}</ul>", listed(&warnings)));
    }
    body.push_str("</section>");

    let oldest = status
        .oldest_pending_age_ms
        .map_or("none".to_string(), duration_ms);
    body.push_str(&format!(
        "<section><h2>Backlog</h2><dl class=\"figures\">\
         <dt>Pending</dt><dd id=\"pending\">{}</dd><dt>Pending bytes</dt><dd>{}</dd>\
         <dt>Oldest pending</dt><dd>{}</dd><dt>Dead letters</dt><dd id=\"dead-letters\">{}</dd>\
         <dt>Tasks tracked</dt><dd>{}</dd><dt>Publisher</dt><dd>{}</dd></dl>{}</section>",
        status.pending,
        status.pending_bytes,
        escape(&oldest),
        status.dead_letters,
        status.tasks_tracked,
        escape(state.publisher_name),
        status
            .damage
            .iter()
            .map(|d| format!("<p class=\"bad\">{}</p>", escape(d)))
            .collect::<String>(),
    ));

    body.push_str("<section><h2>Per second, last 15 minutes</h2><div class=\"charts\">");
    for (label, points) in charts::SERIES.iter().zip(state.console.rates.series(now)) {
        body.push_str(&charts::svg(label, &points, now));
    }
    body.push_str("</div></section>");

    let mut by_count: Vec<(String, u64)> = reasons.into_iter().collect();
    by_count.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let rows: Vec<Vec<String>> = by_count
        .iter()
        .take(REASONS)
        .map(|(reason, n)| {
            vec![
                format!(
                    "<a href=\"/ui/dead-letters?reason={}\">{}</a>",
                    url_encode(reason),
                    escape(reason)
                ),
                n.to_string(),
            ]
        })
        .collect();
    body.push_str("<section><h2>Dead letters by reason</h2>");
    if rows.is_empty() {
        body.push_str("<p>None.</p>");
    } else {
        body.push_str(&table("reasons", &["reason", "count"], &rows));
    }
    if partial {
        body.push_str(&format!(
            "<p><small>Counted over the oldest {SCAN_LIMIT}.</small></p>"
        ));
    }
    body.push_str("</section>");

    let top = state.clients.top(TOP);
    let clients = |list: &[ClientCount]| -> String {
        if list.is_empty() {
            return "<p>None yet.</p>".to_string();
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|c| vec![escape(&c.address.to_string()), c.count.to_string()])
            .collect();
        table("clients", &["address", "count"], &rows)
    };
    body.push_str(&format!(
        "<section class=\"two\"><div><h2>Top clients: accepted</h2>{}</div>\
         <div><h2>Top clients: refused</h2>{}<p>In penalty now: {}</p></div></section>",
        clients(&top.accepted),
        clients(&top.refused),
        top.penalized
    ));
    page("Overview", &access.viewer(), &body).into_response()
}

pub async fn login_form(Extension(access): Extension<Access>) -> Response {
    let body = if access.token_set {
        "<p>Paste the admin token (<code>admin.token</code>) to requeue or bury dead letters. \
         The token is not kept in the browser: a session cookie is.</p>\
         <form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <label>Admin token <input type=\"password\" name=\"token\" id=\"token\" \
         autocomplete=\"off\" required></label> <button type=\"submit\" id=\"sign-in\">Sign in</button></form>"
    } else {
        "<p>No <code>admin.token</code> is set: the admin listener is reachable from this \
         machine only, and any local user may act. Open a session to requeue or bury.</p>\
         <form method=\"post\" action=\"/ui/login\" class=\"login\">\
         <input type=\"hidden\" name=\"token\" value=\"\">\
         <button type=\"submit\" id=\"sign-in\">Open a session</button></form>"
    };
    page("Sign in", &access.viewer(), body).into_response()
}

pub async fn login(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
) -> Response {
    let right = access.token_ok;
    if !right {
        tracing::warn!("console: a sign-in with a wrong admin token");
        // Each wrong guess holds one of the console's few slots for a
        // second: guessing is slow, and costs the public listener nothing.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        return error(StatusCode::UNAUTHORIZED, "Wrong token.");
    }
    if let Some((old, _)) = &access.session {
        state.console.sessions.close(old);
    }
    let (id, _) = state.console.sessions.open();
    let mut response = see_other("/ui");
    response.headers_mut().insert(
        header::SET_COOKIE,
        auth::cookie(Some(&id), auth::SESSION_TTL),
    );
    response
}

pub async fn logout(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
) -> Response {
    if let Some((id, _)) = &access.session {
        state.console.sessions.close(id);
    }
    let mut response = see_other("/ui");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, auth::cookie(None, auth::SESSION_TTL));
    response
}

#[derive(Deserialize)]
pub struct ListQuery {
    reason: Option<String>,
    after: Option<u64>,
}

/// The action buttons of one dead letter (signed in only): requeue, and
/// with `bury` (the letter's own page, never the list, where a misplaced
/// click would be too easy) the button that deletes it for good.
fn actions(access: &Access, seq: u64, bury: bool) -> String {
    let Some((_, csrf)) = &access.session else {
        return String::new();
    };
    let form = |action: &str, label: &str| {
        format!(
            "<form method=\"post\" action=\"/ui/dead-letters/{action}\" class=\"inline\">{}\
             <input type=\"hidden\" name=\"seq\" value=\"{seq}\">\
             <button type=\"submit\" id=\"{action}-{seq}\">{label}</button></form>",
            csrf_field(csrf)
        )
    };
    if bury {
        format!(
            "{} {}",
            form("requeue", "Requeue"),
            form("bury", "Bury (delete for good)")
        )
    } else {
        form("requeue", "Requeue")
    }
}

fn event_field<'a>(letter: &'a DeadLetter, name: &str) -> &'a str {
    letter
        .event
        .get(name)
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

pub async fn dead_letters(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Query(q): Query<ListQuery>,
) -> Response {
    let reason = q
        .reason
        .filter(|r| !r.is_empty())
        .map(|r| cut(&r, 200).0.to_string());
    let (read, filter, after) = (state.clone(), reason.clone(), q.after);
    let scanned = blocking(move || scan(&read, filter.as_deref(), after, PAGE)).await;
    let (letters, next) = match scanned {
        Ok(s) => s,
        Err(response) => return response,
    };
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                format!("<a href=\"/ui/dead-letters/{0}\">{0}</a>", l.seq),
                escape(&rfc3339_millis(l.failed_at)),
                escape(event_field(l, "taskId")),
                escape(event_field(l, "state")),
                escape(cut(&l.reason, 300).0),
                actions(&access, l.seq, false),
            ]
        })
        .collect();
    let value = reason.as_deref().map(escape).unwrap_or_default();
    let mut body = format!(
        "<form method=\"get\" action=\"/ui/dead-letters\" class=\"filter\">\
         <label>Reason <input type=\"text\" name=\"reason\" value=\"{value}\" maxlength=\"200\"></label> \
         <button type=\"submit\">Filter</button> <a href=\"/ui/dead-letters\">all</a></form>"
    );
    if rows.is_empty() {
        body.push_str("<p>No dead letters here.</p>");
    } else {
        body.push_str(&table(
            "letters",
            &["seq", "failed at", "task", "state", "reason", ""],
            &rows,
        ));
    }
    if let Some(next) = next {
        let filter = reason
            .as_deref()
            .map(|r| format!("reason={}&amp;", url_encode(r)));
        body.push_str(&format!(
            "<p><a href=\"/ui/dead-letters?{}after={next}\">Next page</a></p>",
            filter.unwrap_or_default()
        ));
    }
    if access.session.is_none() {
        body.push_str("<p><a href=\"/ui/login\">Sign in</a> to requeue or bury.</p>");
    } else {
        body.push_str("<p>To bury a dead letter (delete it for good), open it.</p>");
    }
    page("Dead letters", &access.viewer(), &body).into_response()
}

pub async fn dead_letter(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(seq): Path<u64>,
) -> Response {
    let read = state.clone();
    let letter =
        match blocking(move || read.outbox.dead_letter(seq).map_err(|e| e.to_string())).await {
            Ok(Some(letter)) => letter,
            Ok(None) => return error(StatusCode::NOT_FOUND, "No such dead letter."),
            Err(response) => return response,
        };
    let shown = if letter.event.is_null() {
        letter.raw_hex.clone().unwrap_or_default()
    } else {
        serde_json::to_string_pretty(&letter.event).unwrap_or_default()
    };
    let (text, cut_off) = cut(&shown, SHOW_BYTES);
    let body = format!(
        "<dl class=\"figures\"><dt>Failed at</dt><dd>{}</dd><dt>Reason</dt><dd id=\"reason\">{}</dd>\
         <dt>Task</dt><dd>{}</dd></dl><p>{}</p><h2>{}</h2><pre id=\"body\">{}</pre>{}",
        escape(&rfc3339_millis(letter.failed_at)),
        escape(&letter.reason),
        task_link(event_field(&letter, "taskId")),
        actions(&access, seq, true),
        if letter.event.is_null() { "Stored bytes (hex)" } else { "Event" },
        escape(text),
        if cut_off { "<p><small>(cut for display)</small></p>" } else { "" },
    );
    page(&format!("Dead letter {seq}"), &access.viewer(), &body).into_response()
}

fn task_link(task_id: &str) -> String {
    if task_id.is_empty() {
        return "-".to_string();
    }
    format!(
        "<a href=\"/ui/tasks/{}\">{}</a>",
        url_encode(task_id),
        escape(task_id)
    )
}

/// The `seq` field of an action's form.
fn seq_of(access: &Access) -> Option<u64> {
    access.field("seq").and_then(|s| s.parse().ok())
}

fn no_seq() -> Response {
    error(StatusCode::BAD_REQUEST, "Name a dead letter (seq).")
}

/// The answer to an action: what happened, and the way back.
fn done(access: &Access, title: &str, message: String) -> Response {
    let body = format!(
        "<p class=\"ok\" id=\"result\">{}</p><p><a href=\"/ui/dead-letters\">Back to the dead letters</a></p>",
        escape(&message)
    );
    page(title, &access.viewer(), &body).into_response()
}

pub async fn requeue(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
) -> Response {
    let Some(seq) = seq_of(&access) else {
        return no_seq();
    };
    match state.outbox.requeue_dead_letters(Some(vec![seq])).await {
        Ok(moved) if moved.contains(&seq) => {
            tracing::info!(seq, "console: dead letter requeued");
            done(
                &access,
                "Requeued",
                format!("Dead letter {seq} is pending again."),
            )
        }
        Ok(_) => error(
            StatusCode::NOT_FOUND,
            &format!("Dead letter {seq} was not requeued: unknown, or without a readable event."),
        ),
        Err(e) => internal(&e.to_string()),
    }
}

pub async fn bury(State(state): State<AppState>, Extension(access): Extension<Access>) -> Response {
    let Some(seq) = seq_of(&access) else {
        return no_seq();
    };
    match state.outbox.delete_dead_letters(vec![seq]).await {
        Ok(deleted) if deleted.contains(&seq) => {
            tracing::info!(seq, "console: dead letter buried");
            done(
                &access,
                "Buried",
                format!("Dead letter {seq} is deleted for good."),
            )
        }
        Ok(_) => error(StatusCode::NOT_FOUND, &format!("No dead letter {seq}.")),
        Err(e) => internal(&e.to_string()),
    }
}
