use std::net::IpAddr;

use super::*;

/// Asserts that `toml` is refused with a message naming `key`.
fn refused(toml: &str, key: &str) {
    let err = Config::from_toml(toml).unwrap_err();
    assert!(err.to_string().contains(key), "{err}");
}

#[test]
fn shipped_config_files_parse() {
    for name in ["default.toml", "kafka.toml", "nats.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        Config::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

#[test]
fn unknown_keys_are_refused() {
    refused("[server]\nlisten = \"127.0.0.1:1\"\nlisen = 3\n", "lisen");
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"x:1\"\ntopik = \"t\"\n",
        "topik",
    );
}

#[test]
fn invalid_values_name_their_key() {
    refused("[outbox]\nmax_pending = 0\n", "outbox.max_pending");
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"\"\n",
        "publisher.brokers",
    );
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\nacks = \"1\"\n",
        "acks",
    );
    refused(
        "[publisher]\ntype = \"nats\"\nurl = \"x\"\nsubject = \"a.{taskId}\"\n",
        "publisher.subject",
    );
    // A topic per task would be a topic per callback.
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\ntopic = \"a.{task}\"\n",
        "publisher.topic",
    );
    refused("[server]\nlisten = \"nowhere\"\n", "listen");
    refused(
        "[server]\nbody_limit_bytes = 67108865\n[outbox]\nmax_pending_bytes = 1000000000\n",
        "server.body_limit_bytes",
    );
}

#[test]
fn provider_settings_are_checked() {
    refused("[provider]\nverify = true\n", "provider.verify");
    refused(
        "[provider]\napi_key = \"k\"\ntasks_token = \"0123456789abcdef\"\n",
        "provider.tasks_token",
    );
    refused(
        "[provider]\nbase_url = \"kinovi.ai\"\n",
        "provider.base_url",
    );
    refused(
        "[reconcile]\nfirst_poll_after_secs = 60\ndeadline_secs = 60\n",
        "reconcile.deadline_secs",
    );
    let config = Config::from_toml(
        "[provider]\napi_key = \"sk-live-secret\"\npublic_url = \"https://h.example\"\n\
         tasks_token = \"0123456789abcdef\"\nverify = true\n",
    )
    .unwrap();
    assert!(config.provider.verify);
    let printed = format!("{config:?}");
    assert!(!printed.contains("sk-live-secret") && !printed.contains("0123456789abcdef"));
}

#[test]
fn edge_settings_are_checked() {
    refused("[admin]\nlisten = \"0.0.0.0:9091\"\n", "admin.listen");
    let config =
        Config::from_toml("[admin]\nlisten = \"0.0.0.0:9091\"\ntoken = \"0123456789abcdef\"\n")
            .unwrap();
    assert!(!format!("{config:?}").contains("0123456789abcdef"));
    refused(
        "[server.rate_limit]\ntrusted_proxies = [\"10.0.0.0/33\"]\n",
        "trusted_proxies",
    );
    refused("[server]\nmax_connections = 0\n", "server.max_connections");
    refused(
        "[outbox]\nmax_tracked_tasks = 0\n",
        "outbox.max_tracked_tasks",
    );
}

#[test]
fn cidrs_match_their_addresses() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    let net = Cidr::parse("10.1.0.0/16").unwrap();
    assert!(net.contains(ip("10.1.200.3")) && !net.contains(ip("10.2.0.1")));
    assert!(net.contains(ip("::ffff:10.1.0.9")), "IPv4-mapped");
    let one = Cidr::parse("2001:db8::1").unwrap();
    assert!(one.contains(ip("2001:db8::1")) && !one.contains(ip("2001:db8::2")));
    assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("192.0.2.1")));
    assert!(Cidr::parse("nope").is_err() && Cidr::parse("::/129").is_err());
}

#[test]
fn kafka_option_keys_may_use_underscores_for_dots() {
    refused("[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\nenable_idempotence = \"false\"\n", "enable.idempotence");
    assert_eq!(librdkafka_key("sasl_password"), "sasl.password");
}

/// `request.required.acks` is `acks` under its other name; both would
/// weaken "published means acknowledged by all in-sync replicas".
#[test]
fn delivery_guarantees_cannot_be_overridden_under_another_name() {
    for key in [
        "acks",
        "\"request.required.acks\"",
        "request_required_acks",
        "\"Request.Required.Acks\"",
        "\"topic.request.required.acks\"",
        "\"topic.acks\"",
        "enable_idempotence",
        "\"metadata.broker.list\"",
    ] {
        let text = format!(
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n{key} = \"1\"\n"
        );
        let err = Config::from_toml(&text).expect_err(key).to_string();
        assert!(
            err.contains("publisher.options") && err.contains("may not be overridden"),
            "{key}: {err}"
        );
    }
    let fine = "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n\
                [publisher.options]\n\"linger.ms\" = \"5\"\n\"topic.metadata.refresh.interval.ms\" = \"1000\"\n";
    Config::from_toml(fine).unwrap();
}

#[test]
fn secrets_are_not_printed() {
    let config = Config::from_toml(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n\"sasl.password\" = \"hunter2-hunter2\"\n",
    )
    .unwrap();
    assert!(!format!("{config:?}").contains("hunter2"));
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's own signature
fn unknown_sectioned_variables_are_refused_by_name() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("HOOKBRIDGE_SERVER__LISTN", "127.0.0.1:1");
        let err = Config::load(None).expect_err("a misspelt key is refused");
        assert!(err.to_string().contains("listn"), "{err}");
        Ok(())
    });
}

#[test]
#[allow(clippy::result_large_err)] // figment::Jail's own signature
fn environment_overrides_nested_keys() {
    figment::Jail::expect_with(|jail| {
        jail.set_env("HOOKBRIDGE_PUBLISHER__TYPE", "kafka");
        jail.set_env("HOOKBRIDGE_PUBLISHER__BROKERS", "127.0.0.1:4999");
        jail.set_env("HOOKBRIDGE_PUBLISHER__OPTIONS__LINGER_MS", "20");
        jail.set_env("HOOKBRIDGE_OUTBOX__MAX_PENDING", "42");
        jail.set_env("HOOKBRIDGE_CONFIG", "ignored.toml");
        jail.set_env("HOOKBRIDGE_TEST_KAFKA_BOOTSTRAP", "127.0.0.1:1");
        // docker-compose.yml's own variables are not configuration.
        jail.set_env("HOOKBRIDGE_ADMIN_TOKEN", "x");
        jail.set_env("HOOKBRIDGE_KAFKA_PORT", "8080");
        let config = Config::load(None).map_err(|e| e.to_string())?;
        assert_eq!(config.outbox.max_pending, 42);
        match config.publisher {
            PublisherConfig::Kafka(k) => {
                assert_eq!(k.brokers, "127.0.0.1:4999");
                assert_eq!(
                    k.options["linger_ms"].expose(),
                    "20",
                    "numbers read as text"
                );
            }
            other => panic!("{other:?}"),
        }
        Ok(())
    });
}

#[test]
fn dead_letter_caps_and_segment_size_are_checked() {
    refused(
        "[outbox]\nmax_dead_letters = 0\n",
        "outbox.max_dead_letters",
    );
    refused(
        "[outbox]\ndead_letter_keep_bytes = 10\n",
        "outbox.dead_letter_keep_bytes",
    );
    refused(
        "[outbox]\nmax_dead_letter_bytes = 100000\n",
        "outbox.max_dead_letter_bytes",
    );
    refused("[outbox]\nsegment_bytes = 100\n", "outbox.segment_bytes");
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.outbox.max_dead_letters, 100_000);
    assert_eq!(config.outbox.max_dead_letter_bytes, 256 << 20);
    assert_eq!(config.outbox.dead_letter_keep_bytes, 64 << 10);
}

/// Every value that turned a protection off or made a check lie is refused,
/// naming its key (issue 20).
#[test]
fn values_out_of_range_are_refused_by_key() {
    for (toml, key) in [
        (
            "[outbox]\ndedup_window_secs = 9223372036854775807\n",
            "outbox.dedup_window_secs",
        ),
        (
            "[health]\nstall_secs = 9223372036854775807\n",
            "health.stall_secs",
        ),
        (
            "[outbox]\nretry_initial_ms = 9000000000000000000\n",
            "outbox.retry_initial_ms",
        ),
        (
            "[outbox]\nretry_initial_ms = 0\n",
            "outbox.retry_initial_ms",
        ),
        (
            "[provider]\nretry_initial_ms = 9000000000000000000\n",
            "provider.retry_initial_ms",
        ),
        ("[server]\nbody_timeout_ms = 1\n", "server.body_timeout_ms"),
        (
            "[server]\nmax_connections = 100000000\n",
            "server.max_connections",
        ),
        (
            "[outbox]\nrelay_batch_bytes = 1\n",
            "outbox.relay_batch_bytes",
        ),
        (
            "[outbox]\nrefusal_attempts = 0\n",
            "outbox.refusal_attempts",
        ),
        ("[outbox]\ncache_mib = 10000000\n", "outbox.cache_mib"),
        (
            "[reconcile]\ndeadline_secs = 9223372036854775807\n",
            "reconcile.deadline_secs",
        ),
        (
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\nmessage_timeout_ms = 0\n",
            "publisher.message_timeout_ms",
        ),
        (
            "[publisher]\ntype = \"nats\"\nurl = \"x\"\nack_timeout_ms = 0\n",
            "publisher.ack_timeout_ms",
        ),
    ] {
        let err = Config::from_toml(toml).expect_err(toml).to_string();
        assert!(
            err.contains(key) && err.contains("between"),
            "{toml}: {err}"
        );
    }
    Config::default().validate().unwrap();
}

#[test]
fn trusting_every_peer_is_refused() {
    for cidr in ["0.0.0.0/0", "::/0"] {
        refused(
            &format!("[server.rate_limit]\ntrusted_proxies = [\"{cidr}\"]\n"),
            "server.rate_limit.trusted_proxies",
        );
    }
    Config::from_toml("[server.rate_limit]\ntrusted_proxies = [\"10.0.0.0/8\"]\n").unwrap();
}

#[test]
fn kafka_internal_topics_are_refused() {
    for topic in ["__consumer_offsets", "__anything"] {
        refused(
            &format!("[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\ntopic = \"{topic}\"\n"),
            "publisher.topic",
        );
    }
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\ntopic = \"{model}\"\nmodels = [\"__consumer_offsets\"]\n",
        "publisher.topic",
    );
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[cluster]\nenabled = true\n\
         transactional_id = \"r1\"\ninternal_topic = \"__x\"\n",
        "cluster.internal_topic",
    );
}

#[test]
fn kafka_options_that_break_the_guarantees_are_refused() {
    for (option, value) in [
        ("\"transactional.id\"", "x"),
        ("delivery_report_only_error", "true"),
        ("\"security.protocol\"", "carrier_pigeon"),
        ("\"allow.auto.create.topics\"", "true"),
        ("\"message.max.bytes\"", "lots"),
    ] {
        let text = format!(
            "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n{option} = \"{value}\"\n"
        );
        refused(&text, "publisher.options");
    }
    let fine = "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n\
                [publisher.options]\n\"security.protocol\" = \"SASL_SSL\"\n";
    Config::from_toml(fine).unwrap();
    // A producer limit below what the ingress accepts.
    refused(
        "[server]\nbody_limit_bytes = 2000000\n[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n\
         [publisher.options]\n\"message.max.bytes\" = \"1000000\"\n",
        "server.body_limit_bytes",
    );
}

/// `{model}` without an allowlist would let every sender name a destination.
#[test]
fn a_model_placeholder_needs_an_allowlist() {
    refused(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\ntopic = \"t.{model}\"\n",
        "publisher.models",
    );
    refused(
        "[publisher]\ntype = \"nats\"\nurl = \"x\"\nsubject = \"s.{model}.{state}\"\n",
        "publisher.models",
    );
    Config::from_toml(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\ntopic = \"t.{model}\"\nmodels = [\"m1\"]\n",
    )
    .unwrap();
}

#[test]
fn a_stream_must_capture_every_subject_published_to() {
    let nats = |subjects: &str| {
        format!(
            "[publisher]\ntype = \"nats\"\nurl = \"x\"\nsubject = \"k.{{model}}.{{state}}\"\n\
             models = [\"m1\"]\n[publisher.stream]\nname = \"S\"\nsubjects = {subjects}\n"
        )
    };
    refused(&nats("[\"k.m1.>\"]"), "publisher.stream.subjects");
    refused(&nats("[\"k.*.success\"]"), "publisher.stream.subjects");
    Config::from_toml(&nats("[\"k.>\"]")).unwrap();
    Config::from_toml(&nats("[\"k.m1.*\", \"k.unknown.*\"]")).unwrap();
}

#[test]
fn tokens_count_characters_not_bytes() {
    // 8 characters, 16 bytes.
    let short = "éééééééé";
    assert_eq!(short.len(), 16);
    refused(
        &format!("[admin]\nlisten = \"0.0.0.0:9091\"\ntoken = \"{short}\"\n"),
        "admin.token",
    );
    refused(
        &format!(
            "[provider]\napi_key = \"k\"\npublic_url = \"https://h.example\"\ntasks_token = \"{short}\"\n"
        ),
        "provider.tasks_token",
    );
}

#[test]
fn every_secret_bearing_kafka_option_is_masked() {
    for key in [
        "sasl.oauthbearer.extensions",
        "sasl_oauthbearer_extensions",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.private.key.pem",
    ] {
        assert!(is_secret_option(key), "{key}");
    }
    for key in [
        "linger.ms",
        "sasl.oauthbearer.token.endpoint.url",
        "security.protocol",
    ] {
        assert!(!is_secret_option(key), "{key}");
    }
    let config = Config::from_toml(
        "[publisher]\ntype = \"kafka\"\nbrokers = \"a:1\"\n[publisher.options]\n\
         \"sasl.oauthbearer.extensions\" = \"supportFeatureX=true,apiKey=sk-hidden-value\"\n",
    )
    .unwrap();
    let printed = config.to_masked_toml().unwrap();
    assert!(!printed.contains("sk-hidden-value"), "{printed}");
    assert!(printed.contains("sasl.oauthbearer.extensions"), "{printed}");
}

#[test]
fn telemetry_is_off_by_default_and_its_settings_are_checked() {
    let config = Config::from_toml("").unwrap();
    assert_eq!(config.telemetry.endpoint(), None);
    let on = Config::from_toml("[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n").unwrap();
    assert_eq!(on.telemetry.endpoint(), Some("http://127.0.0.1:4318"));
    for bad in [
        "otlp_endpoint = \"127.0.0.1:4318\"",
        "otlp_endpoint = \"grpc://collector:4317\"",
        "otlp_endpoint = \"http://user:pw@collector:4318\"",
    ] {
        refused(&format!("[telemetry]\n{bad}\n"), "telemetry.otlp_endpoint");
    }
    refused(
        "[telemetry]\nsample_ratio = 1.5\n",
        "telemetry.sample_ratio",
    );
    refused(
        "[telemetry]\nsample_ratio = -0.1\n",
        "telemetry.sample_ratio",
    );
    refused(
        "[telemetry]\nservice_name = \" \"\n",
        "telemetry.service_name",
    );
    refused(
        "[telemetry]\nexport_timeout_ms = 10\n",
        "telemetry.export_timeout_ms",
    );
    refused("[telemetry]\nendpoint = \"http://x:1\"\n", "endpoint");
}
