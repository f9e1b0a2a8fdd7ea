//! The provider's task API (`[provider]`) and the reconciler that polls it
//! (`[reconcile]`), with their checks.

use serde::{Deserialize, Serialize};

use super::{invalid, Config, ConfigError, Secret};

/// The provider's task API and the endpoints that register tasks with hookbridge.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProviderConfig {
    /// Base URL of the provider's API (`/api/v1/jobs/...` is appended).
    pub base_url: String,
    /// The provider API key, sent as `Authorization: Bearer`. Needed for
    /// `POST /tasks`, polling and verify mode; never logged.
    pub api_key: Option<Secret>,
    /// Longest wait for one provider request, answer included, in milliseconds.
    pub request_timeout_ms: u64,
    /// Most status requests to the provider in flight at once.
    pub max_in_flight: usize,
    /// Most status requests to the provider per second.
    pub requests_per_sec: u32,
    /// Extra attempts of a status request after a 429, a 5xx or a network error.
    pub max_retries: u32,
    /// First delay before such a retry, in milliseconds; doubles per attempt.
    pub retry_initial_ms: u64,
    /// Longest delay between two attempts, in milliseconds.
    pub retry_max_ms: u64,
    /// hookbridge's own base URL as the provider reaches it, e.g.
    /// `https://hooks.example.com`; `POST /tasks` sets `callBackUrl` to
    /// `{public_url}/webhooks/kinovi?token=...`.
    pub public_url: Option<String>,
    /// Bearer token that protects `POST /tasks` and `POST /tasks/{taskId}/watch`.
    /// Unset: those endpoints answer 404. At least 16 characters.
    pub tasks_token: Option<Secret>,
    /// Confirm every callback against the status endpoint before publishing
    /// it; unconfirmed ones become dead letters. Needs `api_key`.
    pub verify: bool,
    /// Verify mode: most callbacks awaiting verification at once; past it
    /// the webhook answers 503. A repeated (taskId, state) takes no room.
    pub max_held: u64,
    /// Verify mode: most bytes of held callbacks (each keeps the task id,
    /// the state, the receive time, the sender's address and at most 256
    /// bytes of the body); past it the webhook answers 503.
    pub max_held_bytes: u64,
    /// Verify mode: most callbacks held at once for one client address (an
    /// IPv6 address counts by its /64), so that one address cannot fill the
    /// queue; past it that address gets 503.
    pub max_held_per_address: u64,
    /// Memory for the page cache of the task registry
    /// (`<outbox.data_dir>/tasks.redb`: registrations and held callbacks), in MiB.
    pub registry_cache_mib: usize,
}

impl Default for ProviderConfig {
    fn default() -> Self {
        Self {
            base_url: "https://kinovi.ai".into(),
            api_key: None,
            request_timeout_ms: 10_000,
            max_in_flight: 4,
            requests_per_sec: 10,
            max_retries: 3,
            retry_initial_ms: 500,
            retry_max_ms: 10_000,
            public_url: None,
            tasks_token: None,
            verify: false,
            max_held: 100_000,
            max_held_bytes: 64 * 1024 * 1024,
            max_held_per_address: 10_000,
            registry_cache_mib: 32,
        }
    }
}

/// The reconciler: polls registered tasks that have no terminal event yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Poll registered tasks. Has no effect without `provider.api_key`.
    pub enabled: bool,
    /// How long after registration a task without a terminal event is first
    /// polled, in seconds (the provider advises 10-15 minutes); 0 polls at once.
    pub first_poll_after_secs: u64,
    /// How long after registration a task without a terminal state is given
    /// up on: it becomes a dead letter with the reason `stuck`, in seconds.
    pub deadline_secs: u64,
    /// Delay between the first two polls of a task, in milliseconds; it
    /// doubles after each poll that finds the task still running.
    pub poll_initial_ms: u64,
    /// Longest delay between two polls of a task, in milliseconds.
    pub poll_max_ms: u64,
    /// How long the provider may answer 404 for a task (registered, or named
    /// by a callback in verify mode) before it counts as unknown, in seconds.
    pub unknown_task_grace_secs: u64,
    /// Also publish the non-terminal states (`waiting`, `generating`) that
    /// polling observes.
    pub publish_progress: bool,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            first_poll_after_secs: 600,
            deadline_secs: 1800,
            poll_initial_ms: 5_000,
            poll_max_ms: 60_000,
            unknown_task_grace_secs: 60,
            publish_progress: false,
        }
    }
}

impl Config {
    pub(super) fn validate_provider(&self) -> Result<(), ConfigError> {
        let (p, r) = (&self.provider, &self.reconcile);
        check_url("provider.base_url", &p.base_url)?;
        if let Some(url) = &p.public_url {
            check_url("provider.public_url", url)?;
            if url.contains(['?', '#']) {
                return invalid("provider.public_url", "must not carry a query or fragment");
            }
        }
        if p.api_key
            .as_ref()
            .is_some_and(|k| k.expose().trim().is_empty())
        {
            return invalid("provider.api_key", "must not be empty");
        }
        if p.max_held_bytes < 64 * 1024 {
            return invalid("provider.max_held_bytes", "must be at least 65536");
        }
        if p.max_held_per_address == 0 {
            return invalid("provider.max_held_per_address", "must be at least 1");
        }
        if p.verify && p.api_key.is_none() {
            return invalid("provider.verify", "needs provider.api_key");
        }
        if let Some(token) = &p.tasks_token {
            if token.expose().chars().count() < 16 {
                return invalid("provider.tasks_token", "must be at least 16 characters");
            }
            if p.api_key.is_none() || p.public_url.is_none() {
                return invalid(
                    "provider.tasks_token",
                    "needs provider.api_key and provider.public_url",
                );
            }
        }
        if r.deadline_secs == 0 || r.deadline_secs <= r.first_poll_after_secs {
            return invalid(
                "reconcile.deadline_secs",
                "must be greater than reconcile.first_poll_after_secs",
            );
        }
        Ok(())
    }
}

fn check_url(key: &'static str, url: &str) -> Result<(), ConfigError> {
    let ok = (url.starts_with("http://") || url.starts_with("https://"))
        && url
            .parse::<axum::http::Uri>()
            .is_ok_and(|u| u.host().is_some());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            key,
            reason: format!("{url:?} is not an http:// or https:// URL"),
        })
    }
}
