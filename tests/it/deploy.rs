//! The Kubernetes manifests in `deploy/kubernetes/`: valid against the
//! Kubernetes API schemas (offline, `kubernetes-validate` from PyPI, which
//! ships them), and consistent with each other and with hookbridge's
//! configuration: probes on the right paths and ports, the admin port kept
//! out of every Service, the outbox volume mounted at the configured
//! `data_dir`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use hookbridge::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
/// The Kubernetes version the schema check is for.
const KUBERNETES: &str = "1.30.0";

/// Every manifest file (not the kustomization) and its documents.
fn manifests() -> Vec<(String, Vec<Yaml>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(DIR).expect("deploy/kubernetes exists") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            out.push((name, docs));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn str_of(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

fn by_kind(docs: &[(String, Vec<Yaml>)], kind: &str) -> Vec<Yaml> {
    docs.iter()
        .flat_map(|(_, d)| d)
        .filter(|d| d["kind"].as_str() == Some(kind))
        .cloned()
        .collect()
}

/// A container port given by name or number, as a number.
fn port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(n) = port.as_i64() {
        return n;
    }
    let name = str_of(port);
    list(&container["ports"])
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    list(&container["env"])
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

#[test]
fn kubernetes_manifests_are_consistent_with_the_configuration() {
    let docs = manifests();
    let files: BTreeSet<String> = docs.iter().map(|(name, _)| name.clone()).collect();
    let kustomization = &by_kind(&docs, "Kustomization")[0];
    let resources: BTreeSet<String> = list(&kustomization["resources"])
        .iter()
        .map(|r| str_of(r).to_string())
        .chain(["kustomization.yaml".to_string()])
        .collect();
    assert_eq!(resources, files, "kustomization lists every manifest");

    let [statefulset] = &by_kind(&docs, "StatefulSet")[..] else {
        panic!("one StatefulSet");
    };
    let [config_map] = &by_kind(&docs, "ConfigMap")[..] else {
        panic!("one ConfigMap");
    };
    let [pdb] = &by_kind(&docs, "PodDisruptionBudget")[..] else {
        panic!("one PodDisruptionBudget");
    };
    let services = by_kind(&docs, "Service");
    assert!(!services.is_empty(), "a Service");

    let spec = &statefulset["spec"];
    let pod = &spec["template"]["spec"];
    let labels = &spec["template"]["metadata"]["labels"];
    assert_eq!(&spec["selector"]["matchLabels"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert!(pdb["spec"]["minAvailable"].as_i64().unwrap() < spec["replicas"].as_i64().unwrap());
    let [container] = list(&pod["containers"]) else {
        panic!("one container");
    };

    // The configuration the container reads parses and validates.
    let args: Vec<&str> = list(&container["args"]).iter().map(str_of).collect();
    let config_path = Path::new(args[args.iter().position(|a| *a == "--config").unwrap() + 1]);
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let config = Config::from_toml(str_of(&config_map["data"][file]))
        .unwrap_or_else(|e| panic!("the ConfigMap's {file}: {e}"));
    let mount = |volume: &str| -> PathBuf {
        list(&container["volumeMounts"])
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .map(|m| PathBuf::from(str_of(&m["mountPath"])))
            .unwrap_or_else(|| panic!("volume {volume} is mounted"))
    };
    let config_volume = list(&pod["volumes"])
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    assert_eq!(
        mount(str_of(&config_volume["name"])),
        config_path.parent().unwrap()
    );

    // The outbox: a claim per replica, mounted at data_dir, not overridden.
    let [claim] = list(&spec["volumeClaimTemplates"]) else {
        panic!("one volumeClaimTemplate");
    };
    assert_eq!(
        mount(str_of(&claim["metadata"]["name"])),
        config.outbox.data_dir
    );
    assert!(env_value(container, "HOOKBRIDGE_OUTBOX__DATA_DIR").is_none());
    let grace_ms = pod["terminationGracePeriodSeconds"].as_i64().unwrap() * 1000;
    assert!(grace_ms > config.outbox.shutdown_grace_ms as i64);

    // Liveness on the public port, readiness on the admin listener.
    let public = i64::from(config.server.listen.port());
    let liveness = &container["livenessProbe"]["httpGet"];
    assert_eq!(str_of(&liveness["path"]), "/healthz");
    assert_eq!(port(container, &liveness["port"]), public);
    let admin_listen = str_of(
        &env_value(container, "HOOKBRIDGE_ADMIN__LISTEN").expect("admin listen set")["value"],
    );
    let admin: std::net::SocketAddr = admin_listen.parse().unwrap();
    assert!(
        admin.ip().is_unspecified(),
        "the kubelet reaches the pod IP"
    );
    let admin = i64::from(admin.port());
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(str_of(&readiness["path"]), "/readyz");
    assert_eq!(port(container, &readiness["port"]), admin);
    let token = env_value(container, "HOOKBRIDGE_ADMIN__TOKEN").expect("admin token set");
    assert!(
        !token["valueFrom"]["secretKeyRef"].is_badvalue(),
        "the admin token comes from a Secret"
    );

    // No Service reaches the admin port; each selects the pods.
    for service in &services {
        assert_eq!(&service["spec"]["selector"], labels);
        for p in list(&service["spec"]["ports"]) {
            let target = port(container, &p["targetPort"]);
            assert_eq!(
                target, public,
                "{:?} exposes port {target}",
                service["metadata"]["name"]
            );
        }
    }
    assert!(services
        .iter()
        .any(|s| s["metadata"]["name"] == spec["serviceName"]));
}

/// `kubernetes-validate` on PATH, or installed once from PyPI into a venv
/// under `target/`.
fn kubernetes_validate() -> PathBuf {
    if let Ok(found) = which("kubernetes-validate") {
        return found;
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/kubernetes-validate");
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.exists() {
        let run = |cmd: &mut Command| {
            let status = cmd.status().unwrap_or_else(|e| {
                panic!("{cmd:?}: {e}; the schema check needs python3 with venv and pip")
            });
            assert!(status.success(), "{cmd:?} failed");
        };
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "kubernetes-validate==1.37.0",
        ]));
    }
    bin
}

pub(crate) fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or(())
}

#[test]
fn kubernetes_manifests_pass_the_schema_check() {
    let files: Vec<PathBuf> = manifests()
        .into_iter()
        .filter(|(name, _)| name != "kustomization.yaml")
        .map(|(name, _)| Path::new(DIR).join(name))
        .collect();
    let output = Command::new(kubernetes_validate())
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .args(&files)
        .output()
        .expect("kubernetes-validate runs");
    let report = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{report}");
    assert_eq!(report.matches(" passed ").count(), 5, "{report}");
}
