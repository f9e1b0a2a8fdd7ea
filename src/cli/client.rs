//! A small client of the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use hookbridge::Config;
use serde_json::Value;

use super::{CliError, Remote};

pub struct AdminClient {
    http: reqwest::Client,
    base: String,
    /// `admin.token`; without one, any `Authorization` does (loopback).
    authorization: String,
}

/// `http://` + the admin listen address; an unspecified address
/// (`0.0.0.0`, `::`) is reached on loopback.
fn base_of(listen: SocketAddr) -> String {
    let mut addr = listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

impl AdminClient {
    pub fn new(remote: &Remote, config: &Config) -> Result<Self, CliError> {
        let base = match &remote.admin {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => base_of(config.admin.listen),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| CliError::Local(format!("cannot build the HTTP client: {e}")))?;
        let token = config.admin.token.as_ref().map(|t| t.expose().to_string());
        Ok(Self {
            http,
            base,
            authorization: format!("Bearer {}", token.as_deref().unwrap_or("cli")),
        })
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        self.send(self.http.get(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let request = self
            .http
            .post(self.url(path))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        self.send(request).await
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Value, CliError> {
        let response = request
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                detail: chain(&e),
            })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| CliError::Unreachable {
            url: self.base.clone(),
            detail: chain(&e),
        })?;
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let message = || {
            body["message"].as_str().map_or_else(
                || String::from_utf8_lossy(&bytes).into_owned(),
                str::to_string,
            )
        };
        match status.as_u16() {
            200..=299 if !body.is_null() => Ok(body),
            200..=299 => Err(CliError::Api {
                status: status.as_u16(),
                message: "the answer is not JSON (is --admin the admin listener?)".into(),
            }),
            401 => Err(CliError::Unauthorized),
            403 => Err(CliError::Forbidden(message())),
            404 => Err(CliError::NotFound(message())),
            code => Err(CliError::Api {
                status: code,
                message: message(),
            }),
        }
    }
}

/// The root cause (refused, timed out, ...): reqwest's own message only
/// says that sending failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut root = e;
    while let Some(cause) = root.source() {
        root = cause;
    }
    root.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_url_comes_from_the_listen_address() {
        assert_eq!(
            base_of("127.0.0.1:9091".parse().unwrap()),
            "http://127.0.0.1:9091"
        );
        assert_eq!(
            base_of("0.0.0.0:9091".parse().unwrap()),
            "http://127.0.0.1:9091"
        );
        assert_eq!(base_of("[::]:80".parse().unwrap()), "http://[::1]:80");
    }
}
