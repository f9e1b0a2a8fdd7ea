//! Plain aligned columns, and the few formats the tables use.

/// Left-aligned columns separated by two spaces; the last one is not padded.
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// Two columns: a name and its value.
pub fn pairs(rows: &[(&str, String)]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(k, v)| vec![k.to_string(), v.clone()])
        .collect();
    let text = render(&["", ""], &rows);
    text.split_once('\n')
        .map_or(String::new(), |(_, rest)| rest.to_string())
}

/// Milliseconds since the epoch as RFC 3339 (UTC).
pub use hookbridge::publish::rfc3339_millis as utc;

/// A duration in milliseconds, in its largest whole unit or two.
pub fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `text` cut to `max` characters, marked with `…` when cut.
pub fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((at, _)) if text.chars().count() > max => format!("{}…", &text[..at]),
        _ => text.to_string(),
    }
}

/// A JSON value as a table cell: strings bare, `null` as `-`.
pub fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_and_the_last_is_not_padded() {
        let rows = vec![
            vec!["1".to_string(), "task_a".into(), "x".into()],
            vec!["1234".to_string(), "t".into(), "longer reason".into()],
        ];
        assert_eq!(
            render(&["SEQ", "TASK", "REASON"], &rows),
            "SEQ   TASK    REASON\n1     task_a  x\n1234  t       longer reason"
        );
        assert_eq!(
            pairs(&[("a", "1".into()), ("bbb", "2".into())]),
            "a    1\nbbb  2"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(age(59_999), "59s");
        assert_eq!(age(3_723_000), "1h2m");
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abcd", 4), "abcd");
        assert_eq!(cell(&serde_json::json!(null)), "-");
    }
}
