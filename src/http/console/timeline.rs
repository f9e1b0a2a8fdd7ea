//! The task page: one task's trace as a timeline, and the search box's
//! target.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::html::{cut, escape, url_encode};
use super::{error, page, see_other, Access};
use crate::http::AppState;
use crate::publish::rfc3339_millis;
use crate::trace::{CallbackEntry, Publication, TaskTrace};

/// Longest task id the search box takes (the parser's limit is lower).
const MAX_TASK_ID: usize = 200;

#[derive(Deserialize)]
pub struct Search {
    #[serde(rename = "taskId")]
    task_id: Option<String>,
}

/// `GET /ui/tasks?taskId=..`: to the task's page.
pub async fn search(Query(q): Query<Search>) -> Response {
    match q.task_id.as_deref().map(str::trim) {
        Some(id) if !id.is_empty() && id.len() <= MAX_TASK_ID => {
            see_other(&format!("/ui/tasks/{}", url_encode(id)))
        }
        _ => error(StatusCode::BAD_REQUEST, "Give a task id."),
    }
}

/// One line of the timeline: when, its class (the decision, or
/// `published`), and its HTML.
type Line = (i64, &'static str, String);

fn callback_line(c: &CallbackEntry) -> Line {
    let mut parts = Vec::new();
    if let Some(state) = c.state {
        parts.push(format!("state <b>{}</b>", escape(state.as_str())));
    }
    parts.push(format!("via {}", escape(c.origin.as_str())));
    if let Some(ip) = c.client {
        parts.push(format!("from {}", escape(&ip.to_string())));
    }
    if let Some(status) = c.status {
        parts.push(format!("answered {status}"));
    }
    if let Some(reason) = &c.reason {
        parts.push(format!("reason: {}", escape(reason)));
    }
    if let Some(id) = &c.event_id {
        parts.push(format!("event <code>{}</code>", escape(id)));
    }
    if let Some(id) = &c.trace_id {
        parts.push(format!("trace <code>{}</code>", escape(id)));
    }
    let decision = c.decision.as_str();
    let html = format!(
        "<span class=\"when\">{}</span><span class=\"decision\">{}</span> {}",
        escape(&rfc3339_millis(c.received_at)),
        escape(decision),
        parts.join(" · ")
    );
    (c.received_at, decision, html)
}

fn publication_line(p: &Publication) -> Line {
    let mut parts = vec![
        format!("state <b>{}</b>", escape(p.state.as_str())),
        format!("on {}", escape(p.broker)),
    ];
    if p.broker != "file" {
        parts.push(format!("<code>{}</code>", escape(&p.topic)));
    }
    let r = &p.receipt;
    if let Some(partition) = r.partition {
        parts.push(format!("partition <b class=\"partition\">{partition}</b>"));
    }
    if let Some(offset) = r.offset {
        parts.push(format!("offset <b class=\"offset\">{offset}</b>"));
    }
    if let Some(stream) = &r.stream {
        parts.push(format!("stream <code>{}</code>", escape(stream)));
    }
    if let Some(sequence) = r.sequence {
        parts.push(format!("sequence <b class=\"sequence\">{sequence}</b>"));
    }
    parts.push(format!("event <code>{}</code>", escape(&p.event_id)));
    if let Some(id) = &p.trace_id {
        parts.push(format!("trace <code>{}</code>", escape(id)));
    }
    let html = format!(
        "<span class=\"when\">{}</span><span class=\"decision\">published</span> {}",
        escape(&rfc3339_millis(p.at)),
        parts.join(" · ")
    );
    (p.at, "published", html)
}

/// The trace as one list, oldest first (a publication after the callback
/// it came from when both fall in the same millisecond).
pub fn timeline(trace: &TaskTrace) -> String {
    let mut lines: Vec<Line> = trace.callbacks.iter().map(callback_line).collect();
    lines.extend(trace.published.iter().map(publication_line));
    // Stable: callbacks stay before publications of the same millisecond.
    lines.sort_by_key(|line| line.0);
    let items: String = lines
        .iter()
        .map(|(_, class, html)| format!("<li class=\"{class}\">{html}</li>"))
        .collect();
    format!("<ol class=\"timeline\" id=\"timeline\">{items}</ol>")
}

pub async fn task(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    Path(task_id): Path<String>,
) -> Response {
    let title = format!("Task {}", cut(&task_id, MAX_TASK_ID).0);
    match state.traces.get(&task_id) {
        Some(trace) => {
            let body = format!(
                "<p>{} callbacks, {} publications (kept in memory for the dedup window, \
                 capped per task; a restart starts empty).</p>{}",
                trace.callbacks.len(),
                trace.published.len(),
                timeline(&trace)
            );
            page(&title, &access.viewer(), &body).into_response()
        }
        None => {
            let body = format!(
                "<p id=\"no-trace\">No trace for <code>{}</code>: no callback of it within the \
                 dedup window since this instance started (or its trace was pushed out).</p>",
                escape(&task_id)
            );
            (StatusCode::NOT_FOUND, page(&title, &access.viewer(), &body)).into_response()
        }
    }
}
