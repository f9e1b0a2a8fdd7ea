//! The shipped configuration files, the settings docker-compose.yml passes,
//! and `hookbridge check` as a user runs it (the real binary).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hookbridge::config::ConfigError;
use hookbridge::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `*.toml` under config/ (new files are picked up on their own).
fn config_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 3,
        "config/ lost its example files: {files:?}"
    );
    files
}

/// `hookbridge ARGS` with `env` and no other `HOOKBRIDGE_*` variable.
fn hookbridge(args: &[&str], env: &[(String, String)]) -> Output {
    let mut cmd = crate::support::bin::hookbridge(args);
    cmd.current_dir(root()).env("RUST_BACKTRACE", "0");
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The file with every commented-out setting (`# key = <TOML value>`)
/// enabled, except keys the file already sets in that table.
fn uncommented(file: &str) -> String {
    let mut out = String::new();
    let mut table = String::new();
    let mut set = BTreeSet::new();
    let key_of = |line: &str| line.split('=').next().unwrap_or("").trim().to_string();
    for line in file.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed.to_string();
        } else if !trimmed.starts_with('#') && trimmed.contains('=') {
            set.insert((table.clone(), key_of(trimmed)));
        }
    }
    table.clear();
    for line in file.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            table = trimmed.to_string();
        }
        let candidate = trimmed.strip_prefix('#').map(str::trim);
        // A commented-out table of its own (`# [server.tls]`) is enabled
        // with its settings.
        if let Some(header) = candidate.filter(|c| {
            c.starts_with('[')
                && c.ends_with(']')
                && !file.lines().any(|l| l.trim() == *c)
                && toml::from_str::<toml::Table>(c).is_ok()
        }) {
            table = header.to_string();
            out.push_str(header);
            out.push('\n');
            continue;
        }
        let setting = candidate.filter(|c| {
            c.contains(" = ")
                && !set.contains(&(table.clone(), key_of(c)))
                && toml::from_str::<toml::Table>(c).is_ok()
        });
        match setting {
            Some(setting) => {
                set.insert((table.clone(), key_of(setting)));
                out.push_str(setting);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Every (table, key) a configuration file shows, set or commented out.
/// Table names lose their quotes (`[publisher.models."a-b"]` is
/// `publisher.models.a-b`, as [`keys_of`] names it); an array of tables
/// `[[x.y]]` also counts as the key `y` of table `x`.
fn documented_keys(file: &str) -> BTreeSet<(String, String)> {
    let mut keys = BTreeSet::new();
    let mut table = String::new();
    for line in file.lines() {
        let line = line.trim().trim_start_matches('#').trim();
        if line.starts_with('[') && line.ends_with(']') {
            table = line.trim_matches(['[', ']']).replace('"', "");
            if line.starts_with("[[") {
                let (parent, last) = table.rsplit_once('.').unwrap_or(("", &table));
                keys.insert((parent.to_string(), last.to_string()));
            }
        } else if let Ok(t) = toml::from_str::<toml::Table>(line) {
            keys_of(&t, &table, &mut keys);
        }
    }
    keys
}

/// Every (table, key) of a TOML document, tables by dotted path.
fn keys_of(value: &toml::Table, table: &str, out: &mut BTreeSet<(String, String)>) {
    for (k, v) in value {
        match v {
            toml::Value::Table(t) => {
                let path = if table.is_empty() {
                    k.clone()
                } else {
                    format!("{table}.{k}")
                };
                keys_of(t, &path, out);
            }
            _ => {
                out.insert((table.to_string(), k.clone()));
            }
        }
    }
}

#[test]
fn every_config_file_passes_check_and_its_printout_reads_back_the_same() {
    for path in config_files() {
        let name = path.display().to_string();
        let original = Config::from_toml(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // `--config` after the subcommand, as the README writes it, and before.
        let after = hookbridge(&["check", "--config", &name], &[]);
        assert!(
            after.status.success(),
            "{name}: check failed: {}",
            text(&after.stderr)
        );
        let before = hookbridge(&["--config", &name, "check"], &[]);
        assert_eq!(before.stdout, after.stdout, "{name}: --config before check");

        let printed = text(&after.stdout);
        let again = Config::from_toml(&printed).unwrap_or_else(|e| {
            panic!("{name}: check's printout does not read back: {e}\n{printed}")
        });
        assert_eq!(
            format!("{again:#?}"),
            format!("{original:#?}"),
            "{name}: read back differently"
        );
        assert_eq!(
            again.to_masked_toml().unwrap(),
            original.to_masked_toml().unwrap()
        );
    }
}

#[test]
fn documented_settings_are_accepted_with_the_commented_ones_enabled() {
    for path in config_files() {
        let file = std::fs::read_to_string(&path).unwrap();
        let all = uncommented(&file);
        // Every key known, every value of its type. Validation across keys
        // may refuse the lot: commented examples can be alternatives, or
        // name files that exist only where hookbridge is deployed.
        match Config::from_toml(&all) {
            Ok(_) | Err(ConfigError::Invalid { .. }) => {}
            Err(e) => panic!(
                "{}, commented-out settings enabled: {e}\n{all}",
                path.display()
            ),
        }
    }
}

#[test]
fn every_setting_is_documented_in_a_config_file() {
    let mut documented = BTreeSet::new();
    let mut effective = BTreeSet::new();
    for path in config_files() {
        let file = std::fs::read_to_string(&path).unwrap();
        documented.extend(documented_keys(&file));
        let config = Config::from_toml(&file).unwrap();
        let printed: toml::Table = toml::from_str(&config.to_masked_toml().unwrap()).unwrap();
        keys_of(&printed, "", &mut effective);
    }
    let missing: Vec<String> = effective
        .difference(&documented)
        // librdkafka's own properties, passed through.
        .filter(|(table, _)| table != "publisher.options")
        .map(|(table, key)| format!("[{table}] {key}"))
        .collect();
    assert!(
        missing.is_empty(),
        "settings no file under config/ documents (add them, commented out if optional): {missing:?}"
    );
}

/// `${VAR}`, `${VAR:-default}`, `${VAR:?message}` as compose reads them:
/// the default where there is one, else a stand-in long enough for a token.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 2..start + len];
        match inner.split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str("compose-stand-in-0123456789"),
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    out
}

/// A scalar from the YAML as the text compose passes.
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(n) => Some(n.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A docker-compose service that runs hookbridge.
struct Bridge {
    name: String,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
}

/// Each compose service that runs hookbridge: its name, the config file
/// its `--config` names (the image has config/ at /etc/hookbridge), and
/// its `HOOKBRIDGE_*` variables. Parsed with a YAML parser (yaml-rust2)
/// rather than scanned by line, so the list and map forms of `environment`
/// and of `command` both work.
fn compose_bridges() -> Vec<Bridge> {
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is YAML");
    let services = docs[0]["services"].as_hash().expect("services");
    let mut bridges = Vec::new();
    for (name, service) in services {
        let name = scalar(name).unwrap_or_default();
        let mut env = Vec::new();
        match &service["environment"] {
            Yaml::Hash(map) => env.extend(
                map.iter()
                    .filter_map(|(k, v)| Some((scalar(k)?, scalar(v).unwrap_or_default()))),
            ),
            Yaml::Array(items) => env.extend(items.iter().filter_map(|i| {
                let item = scalar(i)?;
                let (k, v) = item.split_once('=')?;
                Some((k.to_string(), v.to_string()))
            })),
            _ => {}
        }
        let env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HOOKBRIDGE_"))
            .map(|(k, v)| (k, interpolate(&v)))
            .collect();
        let command: Vec<String> = match &service["command"] {
            Yaml::Array(items) => items.iter().filter_map(scalar).collect(),
            Yaml::String(s) => s.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let config = command
            .iter()
            .position(|a| a == "--config" || a == "-c")
            .and_then(|i| command.get(i + 1))
            .map(|p| {
                let file = p.strip_prefix("/etc/hookbridge/").unwrap_or_else(|| {
                    panic!("{name}: --config {p} is not a file of the image's /etc/hookbridge")
                });
                root().join("config").join(file)
            });
        // Settings may come from a YAML merge key (`<<: *hookbridge`), which
        // the parser keeps as a member of its own.
        let merged = &service["<<"];
        let is_bridge = [service, merged].iter().any(|s| {
            s["build"] != Yaml::BadValue
                || scalar(&s["image"]).is_some_and(|i| i.contains("hookbridge"))
        });
        if is_bridge {
            bridges.push(Bridge { name, config, env });
        }
    }
    bridges
}

#[test]
fn docker_compose_settings_are_accepted() {
    let bridges = compose_bridges();
    assert!(
        !bridges.is_empty(),
        "no hookbridge service in docker-compose.yml"
    );
    for Bridge { name, config, env } in bridges {
        let mut args = vec!["check".to_string()];
        if let Some(config) = &config {
            args.extend(["--config".into(), config.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = hookbridge(&args, &env);
        assert!(
            out.status.success(),
            "docker-compose service {name} ({args:?}, {env:?}): {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn check_masks_secrets_and_url_userinfo() {
    let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let nats = hookbridge(
        &["check", "--config", "config/nats.toml"],
        &env(&[
            (
                "HOOKBRIDGE_PUBLISHER__URL",
                "nats://user:pass-in-url@127.0.0.1:4222",
            ),
            ("HOOKBRIDGE_PUBLISHER__TOKEN", "nats-token-xyz"),
            (
                "HOOKBRIDGE_PROVIDER__PUBLIC_URL",
                "https://hook:pw-public@h.example",
            ),
        ]),
    );
    assert!(nats.status.success(), "{}", text(&nats.stderr));
    let printed = text(&nats.stdout);
    for secret in ["pass-in-url", "nats-token-xyz", "pw-public"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    assert!(
        printed.contains(r#"url = "nats://user:***@127.0.0.1:4222""#),
        "{printed}"
    );
    assert!(
        printed.contains(r#"public_url = "https://hook:***@h.example""#),
        "{printed}"
    );
    assert!(printed.contains(r#"token = "***""#), "{printed}");

    let kafka = hookbridge(
        &["check", "--config", "config/kafka.toml"],
        &env(&[
            (
                "HOOKBRIDGE_PUBLISHER__OPTIONS__SASL_PASSWORD",
                "hunter2-hunter2",
            ),
            ("HOOKBRIDGE_PUBLISHER__OPTIONS__SASL_USERNAME", "bridge"),
            ("HOOKBRIDGE_PROVIDER__API_KEY", "sk-live-key"),
        ]),
    );
    assert!(kafka.status.success(), "{}", text(&kafka.stderr));
    let printed = text(&kafka.stdout);
    for secret in ["hunter2", "sk-live-key"] {
        assert!(!printed.contains(secret), "{secret} printed:\n{printed}");
    }
    for shown in [
        r#""compression.type" = "lz4""#,
        r#"sasl_username = "bridge""#,
        r#"sasl_password = "***""#,
        r#"api_key = "***""#,
    ] {
        assert!(printed.contains(shown), "{shown} missing:\n{printed}");
    }

    // Fed back, the masked key is refused by name, unless the environment
    // supplies the real value.
    let dir = super::support::app::temp_dir();
    let file = dir.path().join("printed.toml");
    std::fs::write(&file, &printed).unwrap();
    let file = file.display().to_string();
    let refused = hookbridge(&["check", "--config", &file], &[]);
    assert!(!refused.status.success());
    let err = text(&refused.stderr);
    assert!(
        err.contains("provider.api_key") && err.contains("***"),
        "{err}"
    );
    let supplied = hookbridge(
        &["check", "--config", &file],
        &env(&[
            ("HOOKBRIDGE_PROVIDER__API_KEY", "sk-live-key"),
            (
                "HOOKBRIDGE_PUBLISHER__OPTIONS__SASL_PASSWORD",
                "hunter2-hunter2",
            ),
        ]),
    );
    assert!(supplied.status.success(), "{}", text(&supplied.stderr));
}

#[test]
fn check_fails_naming_the_key() {
    let out = hookbridge(
        &["check"],
        &[("HOOKBRIDGE_OUTBOX__RELAY_BATCH".into(), "0".into())],
    );
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing printed for an invalid configuration"
    );
    let err = text(&out.stderr);
    assert!(err.contains("outbox.relay_batch"), "{err}");

    let out = hookbridge(&["check", "--config", "config/no-such-file.toml"], &[]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no-such-file.toml"));
}

#[test]
fn uncommenting_enables_settings_but_not_prose() {
    let file = "[a]\nx = 1\n# x = 2\n# y = \"on\"\n# Run: hookbridge --config f\n# z = {not toml\n# [a.b]\n# c = 3\n";
    assert_eq!(
        uncommented(file),
        "[a]\nx = 1\n# x = 2\ny = \"on\"\n# Run: hookbridge --config f\n# z = {not toml\n[a.b]\nc = 3\n"
    );
    assert_eq!(
        interpolate("${HOOKBRIDGE_ADMIN_TOKEN:?set it} ${A:-dflt}/x"),
        "compose-stand-in-0123456789 dflt/x"
    );
}

#[test]
fn logs_mask_url_userinfo() {
    let dir = super::support::app::temp_dir();
    let log = dir.path().join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_hookbridge"))
        .current_dir(root())
        .env("HOOKBRIDGE_PUBLISHER__TYPE", "nats")
        // Nothing listens on port 1: hookbridge starts anyway and retries.
        .env(
            "HOOKBRIDGE_PUBLISHER__URL",
            "nats://user:pw-in-log@127.0.0.1:1",
        )
        // Any free ports: only the log is read. (The admin default, 9091,
        // may be taken by anything else running on this machine.)
        .env("HOOKBRIDGE_SERVER__LISTEN", "127.0.0.1:0")
        .env("HOOKBRIDGE_ADMIN__LISTEN", "127.0.0.1:0")
        .env("HOOKBRIDGE_OUTBOX__DATA_DIR", dir.path().join("data"))
        .env("HOOKBRIDGE_LOG__LEVEL", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let logged = loop {
        let logged = std::fs::read_to_string(&log).unwrap_or_default();
        if logged.contains("hookbridge listening") || std::time::Instant::now() >= deadline {
            break logged;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(logged.contains("hookbridge listening"), "{logged}");
    assert!(logged.contains("nats://user:***@127.0.0.1:1"), "{logged}");
    assert!(!logged.contains("pw-in-log"), "{logged}");
}
