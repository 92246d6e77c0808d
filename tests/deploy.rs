//! The files under `deploy/` agree with the worker: every metric the dashboard, the alert rules and
//! the manifests name is one `src/telemetry.rs` exports, the configurations they ship load, and the
//! files refer to each other consistently. Checks that need `python3` with PyYAML or `promtool` say
//! they were skipped when those are not installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yml") | Some("yaml")
    )
}

/// The metric names of `pub mod names` in src/telemetry.rs, by constant name.
fn exported_constants() -> BTreeMap<String, String> {
    let text = read(&root().join("src/telemetry.rs"));
    let start = text
        .find("pub mod names")
        .expect("src/telemetry.rs declares `pub mod names`");
    let mut out = BTreeMap::new();
    for line in text[start..].lines().skip(1) {
        let line = line.trim();
        if line == "}" {
            break;
        }
        let Some(rest) = line.strip_prefix("pub const ") else {
            continue;
        };
        let (ident, rest) = rest
            .split_once(':')
            .unwrap_or_else(|| panic!("`pub const NAME: &str = \"...\";` expected: {line}"));
        let value = rest
            .split('"')
            .nth(1)
            .unwrap_or_else(|| panic!("a string constant expected: {line}"));
        out.insert(ident.trim().to_string(), value.to_string());
    }
    assert!(
        out.len() >= 10,
        "found only {} metric names in src/telemetry.rs: {out:?}",
        out.len()
    );
    for name in out.values() {
        assert!(
            name.starts_with("ragar_"),
            "metric `{name}` lacks the ragar_ prefix"
        );
    }
    out
}

fn exported() -> BTreeSet<String> {
    exported_constants().into_values().collect()
}

/// The metrics described with `describe_histogram!` (they also export `_bucket`, `_sum`, `_count`).
fn histograms() -> BTreeSet<String> {
    let consts = exported_constants();
    let text = read(&root().join("src/telemetry.rs"));
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("describe_histogram!(") {
        let after = &text[at..];
        let names_at = after
            .find("names::")
            .expect("describe_histogram! names its metric by names::CONST");
        let ident: String = after[names_at + "names::".len()..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let name = consts
            .get(&ident)
            .unwrap_or_else(|| panic!("describe_histogram!(names::{ident}) is not in `names`"));
        out.insert(name.clone());
    }
    assert!(
        out.contains("ragar_stage_seconds"),
        "ragar_stage_seconds is a histogram: {out:?}"
    );
    out
}

/// Every `ragar_...` token (lower case, not part of a longer identifier) in `text`.
fn metric_tokens(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("ragar_") {
        let start = i + off;
        let mut end = start + "ragar_".len();
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        let at_boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if at_boundary {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// The tokens of `text` that are not metrics the worker exports.
fn unknown_metrics(text: &str) -> Vec<String> {
    let names = exported();
    let hists = histograms();
    metric_tokens(text)
        .into_iter()
        .filter(|tok| {
            let known = names.contains(tok)
                || ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                    tok.strip_suffix(*suffix)
                        .is_some_and(|base| hists.contains(base))
                });
            !known
        })
        .collect()
}

fn dashboard() -> Value {
    let path = deploy().join("grafana/dashboards/ragar.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn collect_panels<'a>(panels: &'a [Value], out: &mut Vec<&'a Value>) {
    for panel in panels {
        out.push(panel);
        if let Some(inner) = panel.get("panels").and_then(Value::as_array) {
            collect_panels(inner, out);
        }
    }
}

/// Every target expression of the dashboard, after checking that each panel has targets.
fn dashboard_exprs(dash: &Value) -> Vec<String> {
    let top = dash["panels"].as_array().expect("dashboard has panels");
    let mut panels = Vec::new();
    collect_panels(top, &mut panels);
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("<untitled>");
        let id = panel["id"]
            .as_u64()
            .unwrap_or_else(|| panic!("panel `{title}` has an id"));
        assert!(ids.insert(id), "panel id {id} is used twice");
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel `{title}` has targets"));
        assert!(!targets.is_empty(), "panel `{title}` has no target");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of `{title}` has no expr"));
            assert!(
                !expr.trim().is_empty(),
                "a target of `{title}` has an empty expr"
            );
            let uid = if target["datasource"].is_null() {
                &panel["datasource"]["uid"]
            } else {
                &target["datasource"]["uid"]
            };
            assert_eq!(
                uid, "prometheus",
                "`{title}` must use the provisioned data source (uid prometheus)"
            );
            exprs.push(expr.to_string());
        }
    }
    exprs
}

#[test]
fn dashboard_queries_name_exported_metrics_and_cover_the_pipeline() {
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 10, "only {} queries", exprs.len());
    let all = exprs.join("\n");

    let unknown = unknown_metrics(&all);
    assert!(
        unknown.is_empty(),
        "dashboard queries name metrics the worker does not export: {unknown:?}"
    );
    // Template variables and descriptions too.
    let unknown = unknown_metrics(&dash.to_string());
    assert!(
        unknown.is_empty(),
        "dashboard names unknown metrics: {unknown:?}"
    );

    for needed in [
        "ragar_events_total",                 // throughput
        "ragar_consumer_lag_messages",        // lag
        "ragar_stage_seconds_bucket",         // stage latency
        "ragar_end_to_end_seconds_bucket",    // end-to-end latency
        "ragar_dlq_messages_total",           // dead letters
        "ragar_redis_fallbacks_total",        // Redis fallbacks
        "ragar_redis_up",                     // Redis reachability
        "ragar_generation_batch_size_bucket", // batch sizes
        "ragar_outputs_total",
        "ragar_in_flight_messages",
        "ragar_consumer_paused",
    ] {
        assert!(
            all.contains(needed),
            "the dashboard has no query on {needed}"
        );
    }
    // A metric added to the worker needs a panel.
    let shown = metric_tokens(&all);
    for name in exported() {
        let covered = shown.iter().any(|tok| {
            tok == &name
                || tok
                    .strip_prefix(name.as_str())
                    .is_some_and(|rest| ["_bucket", "_sum", "_count"].contains(&rest))
        });
        assert!(covered, "no dashboard panel shows {name}");
    }
    assert!(
        all.contains(
            "histogram_quantile(0.99, sum by (stage, le) (rate(ragar_stage_seconds_bucket"
        ),
        "stage latency p99 per stage"
    );

    let datasources = read(&deploy().join("grafana/provisioning/datasources/prometheus.yml"));
    assert!(
        datasources.lines().any(|l| l.trim() == "uid: prometheus"),
        "the provisioned data source has the uid the panels use"
    );
    let providers = read(&deploy().join("grafana/provisioning/dashboards/ragar.yml"));
    assert!(providers.contains("path: /var/lib/grafana/dashboards"));
    let compose = read(&deploy().join("docker-compose.yml"));
    assert!(compose.contains("./grafana/dashboards:/var/lib/grafana/dashboards"));
}

const REQUIRED_ALERTS: [&str; 5] = [
    "RagarConsumerLagGrowing",
    "RagarDeadLetterRateHigh",
    "RagarNoOutput",
    "RagarRedisDown",
    "RagarLanceWriteErrors",
];

#[test]
fn alert_rules_name_exported_metrics() {
    let text = read(&deploy().join("prometheus/alerts.yml"));
    let unknown = unknown_metrics(&text);
    assert!(
        unknown.is_empty(),
        "alerts.yml names metrics the worker does not export: {unknown:?}"
    );
    let expr_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:"))
        .collect();
    let mut names = BTreeSet::new();
    for block in text.split("- alert:").skip(1) {
        let name = block.lines().next().unwrap_or("").trim().to_string();
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(block.contains(key), "alert {name} lacks `{key}`");
        }
        names.insert(name);
    }
    assert_eq!(
        expr_lines.len(),
        names.len(),
        "one expr per alert in alerts.yml"
    );
    for needed in REQUIRED_ALERTS {
        assert!(names.contains(needed), "alerts.yml has no {needed}");
    }
    // The unit tests cover the required alerts.
    let tests = read(&deploy().join("prometheus/alerts.test.yml"));
    for needed in REQUIRED_ALERTS {
        assert!(
            tests.contains(&format!("alertname: {needed}")),
            "alerts.test.yml does not test {needed}"
        );
    }
}

#[test]
fn every_deploy_file_names_only_exported_metrics() {
    let mut checked = 0;
    for path in files_under(&deploy()) {
        // Configuration, monitoring and documentation; scripts may use `ragar_` for other things.
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !["yml", "yaml", "json", "toml", "md"].contains(&ext) {
            continue;
        }
        let text = read(&path);
        let unknown = unknown_metrics(&text);
        assert!(
            unknown.is_empty(),
            "{} names metrics the worker does not export: {unknown:?}",
            path.display()
        );
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} files under deploy/");
}

/// `${NAME:-default}` → `default`, as docker compose interpolates with NAME unset.
fn compose_defaults(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let inner_end = rest[at..].find('}').expect("closed ${...}") + at;
        let inner = &rest[at + 2..inner_end];
        if let Some((_, default)) = inner.split_once(":-") {
            out.push_str(default);
        }
        rest = &rest[inner_end + 1..];
    }
    out.push_str(rest);
    out
}

/// The `RAGAR_*` variables that docker-compose.yml gives the worker, defaults interpolated.
fn compose_env() -> Vec<(String, String)> {
    let text = read(&deploy().join("docker-compose.yml"));
    let mut env = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if !line.starts_with("RAGAR_") {
            continue;
        }
        let (name, value) = line.split_once(':').expect("NAME: value");
        let value = value.trim().trim_matches('"');
        env.push((name.trim().to_string(), compose_defaults(value)));
    }
    assert!(
        env.iter().any(|(k, _)| k == "RAGAR_REDIS__URL"),
        "compose passes the Redis URL (with its password): {env:?}"
    );
    env
}

/// The `RAGAR_*` variables of deployment.yaml, with stand-ins for their Secret values.
fn deployment_env() -> Vec<(String, String)> {
    let text = read(&deploy().join("k8s/deployment.yaml"));
    let mut env = Vec::new();
    for line in text.lines() {
        let Some(name) = line.trim().strip_prefix("- name: ") else {
            continue;
        };
        if !name.starts_with("RAGAR_") {
            continue;
        }
        let value = if name == "RAGAR_REDIS__URL" {
            "redis://:placeholder@redis:6379/"
        } else {
            "placeholder"
        };
        env.push((name.to_string(), value.to_string()));
    }
    env
}

/// The `ragar.toml` entry of configmap.yaml (a `|` block scalar indented by four spaces).
fn configmap_toml() -> String {
    let text = read(&deploy().join("k8s/configmap.yaml"));
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| l.trim() == "ragar.toml: |")
        .expect("configmap.yaml has a `ragar.toml: |` entry");
    let mut out = String::new();
    for line in lines {
        if line.trim().is_empty() {
            out.push('\n');
            continue;
        }
        let Some(body) = line.strip_prefix("    ") else {
            break;
        };
        out.push_str(body);
        out.push('\n');
    }
    assert!(out.contains("[kafka]"), "ragar.toml block: {out}");
    out
}

fn load(file: &Path, env: Vec<(String, String)>) -> ragar::config::Config {
    ragar::config::Config::load_from(Some(file), env)
        .unwrap_or_else(|e| panic!("{} does not load: {e}", file.display()))
}

#[test]
fn shipped_configurations_load() {
    // The host example, unchanged.
    load(&deploy().join("ragar.toml"), Vec::new());

    // The image's file, with the variables compose adds.
    let c = load(&deploy().join("container.toml"), compose_env());
    assert!(
        c.telemetry.listen.ip().is_unspecified(),
        "reachable from outside the container"
    );
    assert_eq!(c.telemetry.listen.port(), 9464);
    assert_eq!(c.kafka.brokers, "kafka:9092");
    assert!(c.redis.url.starts_with("redis://:") && c.redis.url.ends_with("@redis:6379/"));
    assert_eq!(c.lance.uri, "/var/lib/ragar/lancedb");

    // Kubernetes: the ConfigMap's file with the Deployment's Secret-backed variables.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ragar.toml");
    std::fs::write(&file, configmap_toml()).unwrap();
    let env = deployment_env();
    assert!(
        env.len() >= 3,
        "Redis URL and SASL credentials from Secrets: {env:?}"
    );
    let c = load(&file, env);
    assert!(c.telemetry.listen.ip().is_unspecified());
    assert_eq!(c.telemetry.listen.port(), 9464);
    assert_eq!(c.redis.url, "redis://:placeholder@redis:6379/");
    for key in ["sasl.username", "sasl.password"] {
        assert_eq!(
            c.kafka.options.get(key).map(String::as_str),
            Some("placeholder"),
            "{key} comes from a Secret through the environment"
        );
    }
    assert_eq!(
        c.kafka.options.get("security.protocol").map(String::as_str),
        Some("SASL_SSL")
    );
    let deployment = read(&deploy().join("k8s/deployment.yaml"));
    let ca = c
        .kafka
        .options
        .get("ssl.ca.location")
        .expect("ssl.ca.location is set");
    let ca_dir = Path::new(ca).parent().unwrap().to_str().unwrap();
    assert!(
        deployment.contains(&format!("mountPath: {ca_dir}")),
        "the CA file {ca} lies in a mounted volume"
    );
    assert!(
        deployment.contains(&format!("mountPath: {}", c.lance.uri)),
        "lance.uri {} is a mounted volume",
        c.lance.uri
    );
    // SIGKILL must not come before the drain deadline.
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .expect("terminationGracePeriodSeconds is set")
        .trim()
        .parse()
        .unwrap();
    assert!(
        grace > c.shutdown.grace.as_secs() + 5,
        "terminationGracePeriodSeconds {grace} leaves no room after shutdown.grace {:?}",
        c.shutdown.grace
    );
}

#[test]
fn dockerfile_copies_what_exists() {
    let text = read(&deploy().join("Dockerfile"));
    assert!(text.contains("EXPOSE 9464"));
    assert!(
        text.contains("ENTRYPOINT [\"ragar\", \"run\", \"--config\", \"/etc/ragar/ragar.toml\"]")
    );
    let mut copies = 0;
    for line in text.lines() {
        let Some(args) = line.strip_prefix("COPY ") else {
            continue;
        };
        if args.starts_with("--from") {
            continue;
        }
        let parts: Vec<&str> = args.split_whitespace().collect();
        assert!(parts.len() >= 2, "COPY SRC... DEST: {line}");
        for src in &parts[..parts.len() - 1] {
            assert!(root().join(src).exists(), "Dockerfile copies missing {src}");
        }
        copies += 1;
    }
    assert!(
        copies >= 2,
        "the Dockerfile copies the sources and the configuration"
    );
}

// ----- checks that need python3 with PyYAML

fn python_yaml() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Every document of a YAML file, as JSON (through python3 and PyYAML's safe loader).
fn yaml_docs(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice::<Value>(&out.stdout).expect("python3 printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn str_list(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn yaml_files_parse_and_refer_to_each_other() {
    if !python_yaml() {
        println!("skipped: python3 with PyYAML is not available");
        return;
    }
    let yaml_files: Vec<PathBuf> = files_under(&deploy())
        .into_iter()
        .filter(|p| is_yaml(p))
        .collect();
    assert!(yaml_files.len() >= 10, "{yaml_files:?}");
    for path in &yaml_files {
        assert!(!yaml_docs(path).is_empty(), "{} is empty", path.display());
    }

    // docker compose: services, bind mounts and the build.
    let compose = yaml_docs(&deploy().join("docker-compose.yml")).remove(0);
    let services = compose["services"].as_object().expect("services");
    for name in [
        "kafka",
        "kafka-init",
        "redis",
        "ragar",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "compose has no {name} service");
    }
    for (name, service) in services {
        for volume in str_list(&service["volumes"]) {
            let source = volume.split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    deploy().join(source).exists(),
                    "service {name} mounts missing {source}"
                );
            }
        }
    }
    let worker = &services["ragar"];
    let context = worker["build"]["context"].as_str().expect("ragar is built");
    let dockerfile = worker["build"]["dockerfile"].as_str().expect("dockerfile");
    assert!(deploy().join(context).join(dockerfile).is_file());
    assert!(
        str_list(&worker["healthcheck"]["test"])
            .join(" ")
            .contains("/healthz"),
        "the worker's health check asks /healthz"
    );
    assert_eq!(
        worker["depends_on"]["kafka-init"]["condition"], "service_completed_successfully",
        "the worker starts once the topics exist"
    );
    let prometheus = yaml_docs(&deploy().join("prometheus/prometheus.yml")).remove(0);
    for rule_file in str_list(&prometheus["rule_files"]) {
        assert!(
            deploy().join("prometheus").join(&rule_file).is_file(),
            "{rule_file}"
        );
    }
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| str_list(&sc["targets"]))
        .collect();
    assert!(targets.contains(&"ragar:9464".to_string()), "{targets:?}");

    // Kubernetes: every manifest is listed in the kustomization, and the names line up.
    let k8s = deploy().join("k8s");
    let kustomization = yaml_docs(&k8s.join("kustomization.yaml")).remove(0);
    let listed: BTreeSet<String> = str_list(&kustomization["resources"]).into_iter().collect();
    let present: BTreeSet<String> = std::fs::read_dir(&k8s)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && is_yaml(p))
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .filter(|n| n != "kustomization.yaml")
        .collect();
    assert_eq!(
        listed, present,
        "kustomization.yaml lists every manifest in deploy/k8s"
    );
    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for file in &listed {
        for doc in yaml_docs(&k8s.join(file)) {
            assert!(
                doc["metadata"]["namespace"].is_null(),
                "{file}: manifests leave the namespace to kubectl -n"
            );
            let kind = doc["kind"].as_str().expect("kind").to_string();
            by_kind.entry(kind).or_default().push(doc);
        }
    }
    for kind in [
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Service",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
    ] {
        assert!(by_kind.contains_key(kind), "no {kind} in deploy/k8s");
    }
    let deployment = &by_kind["Deployment"][0];
    let deployment_name = deployment["metadata"]["name"].as_str().unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(port["containerPort"], 9464);
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["port"], "metrics");
    assert_eq!(container["readinessProbe"]["httpGet"]["port"], "metrics");
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Volumes: the ConfigMap holds the file the command names, the claim exists.
    let configmap = &by_kind["ConfigMap"][0];
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount_of = |volume: &str| -> String {
        mounts
            .iter()
            .find(|m| m["name"] == volume)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("volume {volume} is mounted"))
            .to_string()
    };
    let config_volume = volumes
        .iter()
        .find(|v| v["configMap"]["name"] == configmap["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    let config_path = format!(
        "{}/ragar.toml",
        mount_of(config_volume["name"].as_str().unwrap())
    );
    assert!(configmap["data"]["ragar.toml"].is_string());
    assert!(
        str_list(&container["command"]).contains(&config_path),
        "the worker reads {config_path}: {}",
        container["command"]
    );
    let claim = by_kind["PersistentVolumeClaim"][0]["metadata"]["name"].clone();
    assert!(
        volumes
            .iter()
            .any(|v| v["persistentVolumeClaim"]["claimName"] == claim),
        "the Deployment mounts the PVC {claim}"
    );

    // Secrets: every reference names a Secret and key of the example.
    let mut secrets: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for doc in yaml_docs(&k8s.join("examples/secret.example.yaml")) {
        assert_eq!(doc["kind"], "Secret");
        let keys = doc["stringData"]
            .as_object()
            .expect("stringData")
            .keys()
            .cloned()
            .collect();
        secrets.insert(doc["metadata"]["name"].as_str().unwrap().to_string(), keys);
    }
    let mut references = 0;
    for var in container["env"].as_array().unwrap() {
        let r = &var["valueFrom"]["secretKeyRef"];
        if r.is_null() {
            continue;
        }
        let (name, key) = (r["name"].as_str().unwrap(), r["key"].as_str().unwrap());
        assert!(
            secrets.get(name).is_some_and(|keys| keys.contains(key)),
            "{} refers to secret {name} key {key}, which the example does not show",
            var["name"]
        );
        references += 1;
    }
    assert!(references >= 3, "Redis URL, SASL username and password");
    for volume in volumes {
        let secret = &volume["secret"];
        if secret.is_null() {
            continue;
        }
        let name = secret["secretName"].as_str().unwrap();
        let keys = secrets.get(name).unwrap_or_else(|| panic!("secret {name}"));
        for item in secret["items"].as_array().cloned().unwrap_or_default() {
            assert!(
                keys.contains(item["key"].as_str().unwrap()),
                "{name}: {item}"
            );
        }
    }

    // Autoscaling and the metrics Service point at the Deployment's pods.
    let hpa = &by_kind["HorizontalPodAutoscaler"][0];
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], deployment_name);
    let metrics = hpa["spec"]["metrics"].as_array().unwrap();
    assert!(metrics.iter().any(|m| m["resource"]["name"] == "cpu"));
    assert!(metrics
        .iter()
        .any(|m| m["external"]["metric"]["name"] == "ragar_consumer_lag_messages"));
    let max = hpa["spec"]["maxReplicas"].as_u64().unwrap();
    let min = hpa["spec"]["minReplicas"].as_u64().unwrap();
    assert!(min >= 1 && min <= max);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    let service = &by_kind["Service"][0];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service selects the worker's pods");
    }
    assert!(service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["targetPort"] == "metrics"));
    let pdb = &by_kind["PodDisruptionBudget"][0];
    for (key, value) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &labels[key], value,
            "the PodDisruptionBudget selects the worker's pods"
        );
    }
}

// ----- checks that need promtool (Debian: apt-get install prometheus)

fn promtool() -> bool {
    Command::new("promtool")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_promtool(dir: &Path, args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_rules_config_and_dashboard_queries() {
    if !promtool() {
        println!("skipped: promtool is not on PATH");
        return;
    }
    let dir = deploy().join("prometheus");
    run_promtool(&dir, &["check", "rules", "alerts.yml"]);
    run_promtool(&dir, &["test", "rules", "alerts.test.yml"]);
    run_promtool(&dir, &["check", "config", "prometheus.yml"]);

    // The dashboard's queries, with Grafana's variables filled in, as recording rules: promtool
    // parses each one as PromQL.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*");
        assert!(!expr.contains('$'), "unknown dashboard variable in {expr}");
        rules.push_str(&format!(
            "      - record: dashboard:expr_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("dashboard.yml"), rules).unwrap();
    run_promtool(tmp.path(), &["check", "rules", "dashboard.yml"]);
}
