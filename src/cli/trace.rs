//! `hookbridge trace TASK_ID`: `/admin/tasks/{taskId}` as a timeline, the
//! callbacks and the publications of the task in time order.

use hookbridge::http::console::html::url_encode as encode_segment;
use hookbridge::Config;
use serde_json::Value;

use super::client::AdminClient;
use super::table::render;
use super::{print_json, CliError, Remote};

pub async fn run(task_id: &str, remote: &Remote, config: &Config) -> Result<(), CliError> {
    let path = format!("/admin/tasks/{}", encode_segment(task_id));
    let trace = match AdminClient::new(remote, config)?.get(&path).await {
        Err(CliError::NotFound(_)) => {
            return Err(CliError::NotFound(format!(
                "nothing is kept about task {task_id:?} (never seen, past the dedup window, \
                 pushed out by trace.max_bytes, or from before the last restart)"
            )))
        }
        other => other?,
    };
    if remote.json {
        return print_json(&trace);
    }
    println!("{}", timeline(&trace));
    Ok(())
}

fn text(v: &Value) -> String {
    v.as_str().map_or_else(String::new, str::to_owned)
}

/// The OpenTelemetry trace id of an entry (telemetry on), at the end of
/// its detail.
fn trace_id(entry: &Value, detail: &mut String) {
    if let Some(id) = entry["traceId"].as_str() {
        detail.push_str(&format!(" (trace {id})"));
    }
}

/// One line per callback and per publication, in time order.
fn timeline(trace: &Value) -> String {
    let empty = Vec::new();
    let mut rows: Vec<Vec<String>> = Vec::new();
    for c in trace["callbacks"].as_array().unwrap_or(&empty) {
        let mut detail = text(&c["source"]);
        if let Some(client) = c["client"].as_str() {
            detail.push_str(&format!(" from {client}"));
        }
        if let Some(status) = c["status"].as_u64() {
            detail.push_str(&format!(", answered {status}"));
        }
        if let Some(reason) = c["reason"].as_str() {
            detail.push_str(&format!(": {reason}"));
        }
        trace_id(c, &mut detail);
        rows.push(vec![
            text(&c["receivedAt"]),
            "callback".into(),
            text(&c["state"]),
            text(&c["decision"]),
            detail,
            text(&c["eventId"]),
        ]);
    }
    for p in trace["published"].as_array().unwrap_or(&empty) {
        let mut detail = text(&p["broker"]);
        for key in ["topic", "subject"] {
            if let Some(place) = p[key].as_str() {
                detail.push_str(&format!(" {place}"));
            }
        }
        if let (Some(partition), Some(offset)) = (p["partition"].as_i64(), p["offset"].as_i64()) {
            detail.push_str(&format!(" partition {partition} offset {offset}"));
        }
        if let (Some(stream), Some(seq)) = (p["stream"].as_str(), p["sequence"].as_u64()) {
            detail.push_str(&format!(" stream {stream} sequence {seq}"));
        }
        trace_id(p, &mut detail);
        rows.push(vec![
            text(&p["at"]),
            "published".into(),
            text(&p["state"]),
            "acknowledged".into(),
            detail,
            text(&p["eventId"]),
        ]);
    }
    // RFC 3339 times of one format sort as text; the sort is stable, so a
    // callback stays before a publication of the same millisecond.
    rows.sort_by(|a, b| a[0].cmp(&b[0]));
    let title = format!("task {}", text(&trace["taskId"]));
    let table = render(
        &["TIME", "WHAT", "STATE", "DECISION", "DETAIL", "EVENT ID"],
        &rows,
    );
    format!("{title}\n{table}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_prints_as_one_timeline_in_time_order() {
        let trace = serde_json::json!({
            "taskId": "t1",
            "callbacks": [
                {"receivedAt": "2026-12-07T12:00:00.000Z", "source": "webhook", "client": "10.0.0.1",
                 "state": "generating", "decision": "accepted", "eventId": "e1"},
                {"receivedAt": "2026-12-07T12:00:02.000Z", "source": "webhook", "client": "10.0.0.1",
                 "state": "waiting", "decision": "stale", "reason": "the task reached generating", "eventId": "e0"},
            ],
            "published": [
                {"eventId": "e1", "state": "generating", "at": "2026-12-07T12:00:01.000Z",
                 "broker": "kafka", "topic": "kinovi.tasks", "partition": 2, "offset": 41},
            ],
        });
        let text = timeline(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "task t1");
        assert!(
            lines[2].contains("callback") && lines[2].contains("accepted"),
            "{text}"
        );
        assert!(
            lines[3].contains("published") && lines[3].contains("partition 2 offset 41"),
            "{text}"
        );
        assert!(
            lines[4].contains("stale") && lines[4].contains("reached generating"),
            "{text}"
        );
    }

    #[test]
    fn a_task_id_is_one_path_segment() {
        assert_eq!(encode_segment("abc-1_2.3~"), "abc-1_2.3~");
        assert_eq!(encode_segment("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    }
}
