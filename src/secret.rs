//! Secrets: a string that never shows in logs or serialized output, and
//! URLs with their credentials masked or taken apart. Imports nothing of the
//! crate.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What `check` prints in place of a secret.
pub const MASK: &str = "***";

/// Why a value equal to [`MASK`] is refused.
pub const MASKED_READ_BACK: &str = "holds \"***\", the mask `hookbridge check` prints in place \
     of a secret; set the real value (e.g. through its HOOKBRIDGE_* variable)";

/// A string that never appears in logs, `Debug` or serialized output (it
/// serializes as [`MASK`], and [`MASK`] is refused when read back, naming
/// the key). Numbers and booleans are read as their text, so
/// `HOOKBRIDGE_PUBLISHER__OPTIONS__LINGER_MS=20` works although the
/// environment layer reads `20` as a number.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(MASK)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Scalar {
            Text(String),
            Unsigned(u64),
            Signed(i64),
            Float(f64),
            Bool(bool),
        }
        Ok(Self(match Scalar::deserialize(d)? {
            Scalar::Text(s) if s == MASK => return Err(serde::de::Error::custom(MASKED_READ_BACK)),
            Scalar::Text(s) => s,
            Scalar::Unsigned(n) => n.to_string(),
            Scalar::Signed(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        }))
    }
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `text` with the userinfo of every URL in it masked: `nats://u:p@h` ->
/// `nats://u:***@h`, `nats://tok@h` -> `nats://***@h`. Works on lists
/// (`nats://a:p@h1,nats://a:p@h2`) and on text around URLs (error messages).
pub fn mask_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | ',' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                if let Some((user, _)) = userinfo.split_once(':') {
                    out.push_str(user);
                    out.push(':');
                }
                out.push_str(MASK);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// `url` without its userinfo, and the userinfo it held, percent-decoded:
/// `nats://u:p%40ss@h` -> (`nats://h`, `Some(("u", Some("p@ss")))`). For
/// clients that take credentials apart from the URL, and log the URL.
pub fn split_userinfo(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some(i) = url.find("://") else {
        return (url.to_string(), None);
    };
    let (head, tail) = url.split_at(i + 3);
    let end = tail.find(['/', '?', '#']).unwrap_or(tail.len());
    let Some(at) = tail[..end].rfind('@') else {
        return (url.to_string(), None);
    };
    let userinfo = match tail[..at].split_once(':') {
        Some((user, pass)) => (percent_decode(user), Some(percent_decode(pass))),
        None => (percent_decode(&tail[..at]), None),
    };
    (format!("{head}{}", &tail[at + 1..]), Some(userinfo))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_userinfo_is_masked() {
        let cases = [
            ("nats://user:pass@h:4222", "nats://user:***@h:4222"),
            ("nats://s3cr3t-token@h:4222", "nats://***@h:4222"),
            (
                "nats://a:p1@h1:4222, nats://b:p2@h2:4222",
                "nats://a:***@h1:4222, nats://b:***@h2:4222",
            ),
            (
                "https://u:p@hooks.example.com/x?y=a@b",
                "https://u:***@hooks.example.com/x?y=a@b",
            ),
            ("https://kinovi.ai", "https://kinovi.ai"),
            ("no url, user@example.com", "no url, user@example.com"),
            (
                "cannot reach \"nats://u:p@h\": refused",
                "cannot reach \"nats://u:***@h\": refused",
            ),
        ];
        for (url, masked) in cases {
            assert_eq!(mask_url(url), masked, "{url}");
        }
    }

    #[test]
    fn userinfo_is_taken_out_of_urls() {
        let none = |u: &str| (u.to_string(), None);
        assert_eq!(split_userinfo("nats://h:4222"), none("nats://h:4222"));
        assert_eq!(split_userinfo("h:4222"), none("h:4222"));
        assert_eq!(
            split_userinfo("nats://u:p%40ss@h:4222/x@y"),
            (
                "nats://h:4222/x@y".to_string(),
                Some(("u".to_string(), Some("p@ss".to_string())))
            )
        );
        assert_eq!(
            split_userinfo("tls://tok@h"),
            ("tls://h".to_string(), Some(("tok".to_string(), None)))
        );
    }
}
