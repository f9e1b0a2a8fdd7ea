//! `hookbridge status`: `/admin/status` as a table.

use hookbridge::Config;
use serde_json::Value;

use super::client::AdminClient;
use super::table::{age, cell, pairs};
use super::{print_json, CliError, Remote};

pub async fn run(remote: &Remote, config: &Config) -> Result<(), CliError> {
    let status = AdminClient::new(remote, config)?
        .get("/admin/status")
        .await?;
    if remote.json {
        return print_json(&status);
    }
    println!("{}", render(&status));
    Ok(())
}

fn render(status: &Value) -> String {
    let (outbox, poll) = (&status["outbox"], &status["poll"]);
    let mut rows = vec![
        ("publisher", cell(&status["publisher"])),
        ("pending", cell(&outbox["pending"])),
        ("pending bytes", cell(&outbox["pendingBytes"])),
        (
            "oldest pending",
            outbox["oldestPendingAgeMs"]
                .as_i64()
                .map_or("-".into(), |ms| format!("{} ago", age(ms))),
        ),
        ("dead letters", cell(&outbox["deadLetters"])),
        ("tasks tracked", cell(&outbox["tasksTracked"])),
        ("polling", cell(&poll["polling"])),
        ("verify", cell(&poll["verify"])),
        ("poll halted", cell(&poll["halted"])),
        ("active tasks", cell(&poll["activeTasks"])),
        ("awaiting verification", cell(&poll["awaitingVerification"])),
    ];
    let counters = [("outbox", &outbox["counters"]), ("poll", &poll["counters"])];
    let names: Vec<(String, String)> = counters
        .iter()
        .filter_map(|(section, c)| c.as_object().map(|c| (section, c)))
        .flat_map(|(section, c)| {
            c.iter()
                .map(move |(k, v)| (format!("{section}.{k}"), cell(v)))
        })
        .collect();
    rows.extend(names.iter().map(|(k, v)| (k.as_str(), v.clone())));
    pairs(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_renders_as_name_value_lines() {
        let status = serde_json::json!({
            "publisher": "kafka",
            "outbox": {"pending": 2, "oldestPendingAgeMs": 61_000, "counters": {"accepted": 7}},
            "poll": {"halted": null, "counters": {}},
        });
        let text = render(&status);
        assert!(text.starts_with("publisher  "), "{text}");
        assert!(text.contains("\noldest pending  "), "{text}");
        assert!(
            text.contains("1m1s ago") && text.contains("outbox.accepted"),
            "{text}"
        );
    }
}
