//! Callback bodies in every shape the provider's documents show.

use serde_json::{json, Value};

/// The provider page's success example, for `task_id`.
pub fn success(task_id: &str) -> Value {
    json!({
        "code": 200, "message": "success",
        "data": {
            "taskId": task_id, "orderId": "order_clxxxxxx", "model": "seedance-20",
            "state": "success", "creditsUsed": 200,
            "output": [{"url": "https://static.kinovi.ai/generated/video.mp4", "width": 1280, "height": 720}],
            "error": null, "createTime": 1735599634000i64, "completeTime": 1735599754000i64,
            "updateTime": 1735599754000i64
        }
    })
}

/// The provider page's failure example.
pub fn failure(task_id: &str) -> Value {
    json!({
        "code": 200, "message": "success",
        "data": {
            "taskId": task_id, "orderId": "order_clxxxxxx", "model": "seedance-20",
            "state": "fail", "creditsUsed": 0, "output": null,
            "error": {"code": "2038", "message": "Your input text violates platform rules. Please modify and try again."},
            "createTime": 1735599634000i64, "completeTime": null, "updateTime": 1735599754000i64
        }
    })
}

/// A bare status record with `status`, no orderId/updateTime, fractional credits.
pub fn bare_status(task_id: &str) -> Value {
    json!({
        "taskId": task_id, "model": "seedance-20", "status": "success", "creditsUsed": 2.17,
        "output": [{"url": "https://static.kinovi.ai/v.mp4", "width": 1920, "height": 1080,
                    "mediaType": "video", "seed": 42, "lastFrameImage": "https://static.kinovi.ai/f.png"}],
        "error": null, "createTime": 1735599634000i64, "completeTime": 1735599754000i64
    })
}

/// The older flat body whose `error` is a plain string.
pub fn error_string(task_id: &str) -> Value {
    json!({
        "taskId": task_id, "model": "seedance-20", "state": "fail",
        "error": "Failed to download your reference video", "createTime": 1735599634000i64
    })
}

/// An envelope whose data is the status record (`data.status`).
pub fn envelope_status(task_id: &str, status: &str) -> Value {
    json!({"code": 200, "message": "success",
           "data": {"taskId": task_id, "model": "seedance-20", "status": status,
                    "createTime": 1735599634000i64}})
}

/// A progress callback with a given state and update time.
pub fn progress(task_id: &str, state: &str, update_time: i64) -> Value {
    let mut body = json!({"code": 200, "message": "success",
        "data": {"taskId": task_id, "model": "seedance-20", "state": state,
                 "createTime": 1735599634000i64, "updateTime": update_time}});
    if state == "success" {
        body["data"]["output"] = json!([{"url": "https://static.kinovi.ai/v.mp4"}]);
    }
    body
}

/// The five variants with the normalized state each must produce.
pub fn variants(prefix: &str) -> Vec<(String, Value, &'static str)> {
    let id = |n: &str| format!("{prefix}_{n}");
    vec![
        (id("success"), success(&id("success")), "success"),
        (id("failure"), failure(&id("failure")), "fail"),
        (id("bare"), bare_status(&id("bare")), "success"),
        (id("errstr"), error_string(&id("errstr")), "fail"),
        (
            id("envstatus"),
            envelope_status(&id("envstatus"), "generating"),
            "generating",
        ),
    ]
}
