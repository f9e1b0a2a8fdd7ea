//! The task page: one task's trace as a timeline, and the search box's
//! target.

use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;

use super::html::{escape, url_encode};
use super::{error, page, see_other, Access};

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

pub async fn task(Extension(access): Extension<Access>, Path(task_id): Path<String>) -> Response {
    let body = format!("<p>No trace for <code>{}</code>.</p>", escape(&task_id));
    (StatusCode::NOT_FOUND, page("Task", &access.viewer(), &body)).into_response()
}
