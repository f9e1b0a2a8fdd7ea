//! The console's HTML floor: escaping (every piece of data on a page goes
//! through [`escape`]), the page frame, and small builders. It imports
//! nothing else of the console.

/// Text made safe for HTML content and quoted attribute values: task ids,
/// reasons and bodies come from outside and may hold markup.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newlines mean nothing
            // on a page and can confuse a terminal a page is copied into.
            c if c.is_control() && !matches!(c, '\t' | '\n' | '\r') => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `text` as one path segment or query value: everything but unreserved
/// characters percent-encoded.
pub fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Who is looking at a page, for the frame's header.
pub struct Viewer<'a> {
    /// The session's CSRF token when signed in.
    pub csrf: Option<&'a str>,
    /// Whether a login can give more rights (actions need one).
    pub can_login: bool,
}

/// A whole page: the header with the navigation and the task search, then
/// `body` (already HTML).
pub fn page(title: &str, viewer: &Viewer<'_>, body: &str) -> String {
    let account = match viewer.csrf {
        Some(csrf) => format!(
            "<form method=\"post\" action=\"/ui/logout\" class=\"inline\">{}\
             <button type=\"submit\">Sign out</button></form>",
            csrf_field(csrf)
        ),
        None if viewer.can_login => "<a href=\"/ui/login\">Sign in for actions</a>".to_string(),
        None => String::new(),
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · hookbridge</title>\
         <link rel=\"stylesheet\" href=\"/ui/assets/console.css\"></head><body>\
         <header><a class=\"brand\" href=\"/ui\">hookbridge</a>\
         <nav><a href=\"/ui\">Overview</a> <a href=\"/ui/dead-letters\">Dead letters</a></nav>\
         <form method=\"get\" action=\"/ui/tasks\" class=\"search\" role=\"search\">\
         <input type=\"search\" name=\"taskId\" placeholder=\"task id\" aria-label=\"task id\" \
         maxlength=\"200\" required> <button type=\"submit\">Find task</button></form>\
         <span class=\"account\">{account}</span></header>\
         <main><h1>{title}</h1>\n{body}\n</main></body></html>\n",
        title = escape(title),
    )
}

/// The hidden field every form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        escape(csrf)
    )
}

/// A table with `head` cells and rows of cells that are already HTML.
pub fn table(class: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!("<table class=\"{}\"><thead><tr>", escape(class));
    for h in head {
        out.push_str(&format!("<th>{}</th>", escape(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            out.push_str(&format!("<td>{cell}</td>"));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// How long ago, or how long, `ms` is, in the largest unit that fits.
pub fn duration_ms(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        3600..86_400 => format!("{} h {} min", s / 3600, s / 60 % 60),
        _ => format!("{} d {} h", s / 86_400, s / 3600 % 24),
    }
}

/// At most `max` bytes of `text` (on a character boundary), and whether
/// it was cut.
pub fn cut(text: &str, max: usize) -> (&str, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (&text[..end], true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_markup_and_no_way_out_of_an_attribute() {
        let hostile = "<script>alert('x')</script>\"><img src=x onerror=1>&amp;";
        let safe = escape(hostile);
        assert_eq!(
            safe,
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=1&gt;&amp;amp;"
        );
        for c in ['<', '>', '"', '\''] {
            assert!(!safe.contains(c), "{c} left in {safe}");
        }
        assert_eq!(
            escape("a\u{0}b\u{1b}[2Jc\td\n"),
            "a\u{fffd}b\u{fffd}[2Jc\td\n"
        );
        assert_eq!(escape("tâche ✓"), "tâche ✓");
    }

    #[test]
    fn url_encode_keeps_only_unreserved_characters() {
        assert_eq!(url_encode("task_1-a.b~"), "task_1-a.b~");
        assert_eq!(url_encode("a/../b?c=d&e f"), "a%2F..%2Fb%3Fc%3Dd%26e%20f");
        assert_eq!(url_encode("é"), "%C3%A9");
    }

    #[test]
    fn pages_escape_their_title_and_cut_keeps_characters_whole() {
        let viewer = Viewer {
            csrf: Some("t\"ok"),
            can_login: true,
        };
        let html = page("<b>", &viewer, "");
        assert!(html.contains("<title>&lt;b&gt; · hookbridge</title>"));
        assert!(html.contains("value=\"t&quot;ok\""));
        assert_eq!(cut("aé", 2), ("a", true));
        assert_eq!(cut("ab", 2), ("ab", false));
        assert_eq!(duration_ms(61_000), "1 min 1 s");
        assert_eq!(duration_ms(-5), "0 s");
    }
}
