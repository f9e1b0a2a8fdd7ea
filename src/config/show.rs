//! `hookbridge check`: the effective configuration as TOML that `--config`
//! reads again, with the secrets masked; and [`mask_url`] for logs.
//!
//! What is masked, always as [`MASK`] (`"***"`):
//! - every [`Secret`](super::Secret) (tokens, the provider API key): a
//!   `Secret` serializes as the mask, whoever serializes it;
//! - the librdkafka options that hold secrets, see [`is_secret_option`];
//!   every other option (`compression.type`, ...) is shown as it is;
//! - any other string setting whose key names a secret (contains
//!   `password`, `secret`, `passphrase`, `token` or `api_key`);
//! - the userinfo of every URL: `nats://user:***@host`, or `nats://***@host`
//!   when it has no password (a NATS token in the URL).
//!
//! A masked printout fed back with `--config` is refused, naming the masked
//! key, unless the environment supplies the real value
//! (`HOOKBRIDGE_PROVIDER__API_KEY=...` wins over the file's `"***"`). So a
//! mask never silently becomes a credential, and `check` output plus the
//! secrets in the environment is a working configuration.

use toml::Value;

use super::{librdkafka_key, Config, ConfigError, PublisherConfig};
use crate::secret::{mask_url, MASK};

/// Whether a librdkafka property (`sasl.password` or its environment form
/// `sasl_password`) holds a secret: its name contains `password`, `secret`,
/// `passphrase`, `credential`, `token` (but not a token endpoint's URL) or
/// `private`, ends in `key.pem` (an inline private key), or it is one of
/// the properties that may carry credentials (`sasl.oauthbearer.config`,
/// `sasl.oauthbearer.extensions`).
pub fn is_secret_option(key: &str) -> bool {
    let key = librdkafka_key(key).to_ascii_lowercase();
    let key = key.strip_prefix("topic.").unwrap_or(&key);
    ["password", "secret", "passphrase", "credential", "private"]
        .iter()
        .any(|word| key.contains(word))
        || (key.contains("token") && !key.ends_with(".url"))
        || key.ends_with("key.pem")
        || key.ends_with(".key")
        || ["sasl.oauthbearer.config", "sasl.oauthbearer.extensions"].contains(&key)
}

/// Whether a string setting named `key` holds a secret, whatever its type.
fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "passphrase", "token", "api_key"]
        .iter()
        .any(|word| key.contains(word))
}

impl Config {
    /// The configuration as TOML that [`Config::load`] reads again, secrets
    /// masked (see the module docs). Fails only for a number TOML cannot
    /// hold (above `i64::MAX`, settable through the environment alone).
    pub fn to_masked_toml(&self) -> Result<String, toml::ser::Error> {
        let mut tree = tree(self)?;
        if let (Value::Table(root), PublisherConfig::Kafka(kafka)) = (&mut tree, &self.publisher) {
            let options = root
                .get_mut("publisher")
                .and_then(|p| p.get_mut("options"))
                .and_then(Value::as_table_mut);
            if let Some(options) = options {
                for (key, value) in &kafka.options {
                    if !is_secret_option(key) {
                        options.insert(key.clone(), Value::String(value.expose().to_string()));
                    }
                }
            }
        }
        mask(&mut tree, None);
        toml::to_string(&tree)
    }
}

/// The whole configuration as a TOML tree, `[publisher]` included (it is
/// not part of `Config`'s own serialization, see [`Config::publisher`]),
/// in the order of the struct's fields.
fn tree(config: &Config) -> Result<Value, toml::ser::Error> {
    let publisher = Value::try_from(&config.publisher)?;
    let Value::Table(root) = Value::try_from(config)? else {
        return Ok(Value::Table(Default::default()));
    };
    let mut ordered = toml::Table::new();
    let mut publisher = Some(publisher);
    for (key, value) in root {
        let after_outbox = key == "outbox";
        ordered.insert(key, value);
        if after_outbox {
            if let Some(p) = publisher.take() {
                ordered.insert("publisher".into(), p);
            }
        }
    }
    if let Some(p) = publisher {
        ordered.insert("publisher".into(), p);
    }
    Ok(Value::Table(ordered))
}

/// Masks URL userinfo everywhere and string values under secret-looking
/// keys (numbers and booleans are never secrets, so `tokens_per_sec`-like
/// settings stay readable). `Secret`s are already masked.
fn mask(value: &mut Value, key: Option<&str>) {
    match value {
        Value::String(s) if key.is_some_and(is_secret_key) => *s = MASK.to_string(),
        Value::String(s) => *s = mask_url(s),
        Value::Array(items) => items.iter_mut().for_each(|item| mask(item, key)),
        Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                mask(v, Some(k));
            }
        }
        _ => {}
    }
}

/// Refuses a URL whose userinfo is the mask (`nats://user:***@host`): a
/// `check` printout fed back without the real URL. (A masked [`Secret`] is
/// refused when it is read.)
pub(super) fn refuse_masked_urls(config: &Config) -> Result<(), ConfigError> {
    fn find(value: &Value, path: &mut Vec<String>) -> Option<String> {
        match value {
            Value::String(s) if s.contains(":***@") || s.contains("//***@") => Some(path.join(".")),
            Value::Array(items) => items.iter().find_map(|item| find(item, path)),
            Value::Table(table) => table.iter().find_map(|(k, v)| {
                path.push(k.clone());
                let found = find(v, path);
                path.pop();
                found
            }),
            _ => None,
        }
    }
    // A tree that cannot be built has no URL to look at; `check` reports it.
    match tree(config).ok().and_then(|t| find(&t, &mut Vec::new())) {
        Some(key) => Err(ConfigError::Masked { key }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_librdkafka_options_are_recognised() {
        for key in [
            "sasl.password",
            "sasl_password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.truststore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.oauthbearer.assertion.private.key.passphrase",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_option(key), "{key}");
        }
        for key in [
            "compression.type",
            "linger.ms",
            "sasl.username",
            "ssl.ca.location",
            "ssl.certificate.pem",
            "security.protocol",
        ] {
            assert!(!is_secret_option(key), "{key}");
        }
    }

    #[test]
    fn printout_masks_secrets_and_shows_the_rest() {
        let config = Config::from_toml(
            r#"
            [admin]
            token = "admin-token-0123456789"
            [publisher]
            type = "kafka"
            brokers = "k1:9092"
            [publisher.options]
            "compression.type" = "lz4"
            "sasl.username" = "bridge"
            "sasl.password" = "hunter2-hunter2"
            sasl_oauthbearer_client_secret = "client-secret-xyz"
            [provider]
            api_key = "sk-live-key"
            public_url = "https://hook:pw-in-url@h.example"
            tasks_token = "tasks-token-0123456789"
            "#,
        )
        .unwrap();
        let printed = config.to_masked_toml().unwrap();
        for secret in [
            "admin-token-0123456789",
            "hunter2",
            "client-secret-xyz",
            "sk-live-key",
            "pw-in-url",
            "tasks-token-0123456789",
        ] {
            assert!(!printed.contains(secret), "{secret} in\n{printed}");
        }
        for shown in [
            r#""compression.type" = "lz4""#,
            r#""sasl.username" = "bridge""#,
            r#""sasl.password" = "***""#,
            r#"public_url = "https://hook:***@h.example""#,
            r#"brokers = "k1:9092""#,
        ] {
            assert!(printed.contains(shown), "{shown} missing in\n{printed}");
        }
    }

    #[test]
    fn masked_printout_read_back_is_refused_naming_the_key() {
        let secret = Config::from_toml("[provider]\napi_key = \"sk-live-key\"\n").unwrap();
        let err = Config::from_toml(&secret.to_masked_toml().unwrap()).unwrap_err();
        assert!(err.to_string().contains("provider.api_key"), "{err}");
        assert!(err.to_string().contains("***"), "{err}");

        let url = Config::from_toml(
            "[publisher]\ntype = \"nats\"\nurl = \"nats://u:p@127.0.0.1:4222\"\n",
        )
        .unwrap();
        let err = Config::from_toml(&url.to_masked_toml().unwrap()).unwrap_err();
        assert!(err.to_string().contains("publisher.url"), "{err}");
    }

    #[test]
    fn printout_without_secrets_reads_back_the_same() {
        let config = Config::from_toml(
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n\"linger.ms\" = 20\n",
        )
        .unwrap();
        let printed = config.to_masked_toml().unwrap();
        let again = Config::from_toml(&printed).unwrap();
        assert_eq!(format!("{again:?}"), format!("{config:?}"));
        assert_eq!(again.to_masked_toml().unwrap(), printed);
    }
}
