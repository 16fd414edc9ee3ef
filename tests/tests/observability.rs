//! Dashboards, alert rules and scrape wiring of the chart, checked by the tools that consume
//! them: every dashboard type-checks against Grafana's published schema (`@grafana/schema`
//! through `tsc`), every panel and alert query is valid PromQL (`promtool check rules`) naming
//! only metrics the operator and trainer register, the alerts pass `promtool check rules` and
//! their `promtool test rules` cases, and the chart's monitors point at the ports and labels
//! the code uses.
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output};

use dinoflow_e2e::{cache_dir, find_binary, parse_manifests, repo_root};
use kube::api::DynamicObject;
use serde_json::Value;

fn chart() -> PathBuf {
    repo_root().join("charts/dinoflow")
}

fn rules_file() -> PathBuf {
    chart().join("files/alerts/dinoflow.rules.yaml")
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = chart().join("files/dashboards");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{p:?}: {e}"));
            (p.file_stem().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 2, "training and operator dashboards: {out:?}");
    out
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn promtool() -> PathBuf {
    find_binary("promtool").unwrap_or_else(|e| {
        panic!("{e}: promtool comes with Debian's prometheus package (scripts/setup.sh)")
    })
}

// ---- dashboards against Grafana's schema

/// `$DINOFLOW_CACHE/npm`, where scripts/setup.sh installs @grafana/schema and typescript.
fn npm_dir() -> PathBuf {
    let dir = cache_dir().join("npm");
    for needed in [
        "node_modules/@grafana/schema",
        "node_modules/typescript/bin/tsc",
    ] {
        assert!(
            dir.join(needed).exists(),
            "{} is missing: run scripts/setup.sh (step \"npm packages\")",
            dir.join(needed).display()
        );
    }
    dir
}

/// Type-checks each dashboard as a `StrictDashboard` literal (tests/dashboards/schema.ts);
/// the compiler's output on failure.
fn tsc_check(dashboards: &[(String, Value)]) -> Result<(), String> {
    let npm = npm_dir();
    // Inside the npm directory, so that `@grafana/schema` resolves from its node_modules.
    let dir = tempfile::Builder::new()
        .prefix("dashboard-check-")
        .tempdir_in(&npm)
        .unwrap();
    std::fs::copy(
        repo_root().join("tests/dashboards/schema.ts"),
        dir.path().join("schema.ts"),
    )
    .unwrap();
    let mut files = Vec::new();
    for (name, json) in dashboards {
        let file = format!("{name}.ts");
        let source = format!(
            "import type {{ StrictDashboard }} from './schema';\n\
             export const dashboard: StrictDashboard = {};\n",
            serde_json::to_string_pretty(json).unwrap()
        );
        std::fs::write(dir.path().join(&file), source).unwrap();
        files.push(file);
    }
    let tsconfig = serde_json::json!({
        "compilerOptions": {
            "strict": true, "noEmit": true, "module": "esnext", "moduleResolution": "bundler",
            "target": "es2020", "types": [],
            // The schema's own .d.ts files are not ours to check; our files are.
            "skipLibCheck": true
        },
        "files": files,
    });
    std::fs::write(dir.path().join("tsconfig.json"), tsconfig.to_string()).unwrap();
    let node = find_binary("node").unwrap_or_else(|e| panic!("{e}: install Node.js"));
    let out = run(Command::new(node)
        .arg(npm.join("node_modules/typescript/bin/tsc"))
        .arg("-p")
        .arg(dir.path()));
    if out.status.success() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

#[test]
fn dashboards_type_check_against_grafanas_dashboard_schema() {
    if let Err(errors) = tsc_check(&dashboards()) {
        panic!("dashboards do not match @grafana/schema:\n{errors}");
    }
}

#[test]
fn the_schema_check_rejects_a_misspelled_key_and_a_wrong_option_value() {
    let (name, mut json) = dashboards().remove(0);
    let panel = json["panels"][0].as_object_mut().unwrap();
    let pos = panel.remove("gridPos").unwrap();
    panel.insert("gridPosition".into(), pos);
    let errors = tsc_check(&[(name.clone(), json)]).expect_err("a misspelled key must fail");
    assert!(errors.contains("gridPosition"), "{errors}");

    let (name, mut json) = dashboards().remove(0);
    let panel = json["panels"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|p| p["type"] == "timeseries")
        .unwrap();
    panel["options"]["legend"]["displayMode"] = "sideways".into();
    let errors = tsc_check(&[(name, json)]).expect_err("an unknown legend mode must fail");
    assert!(errors.contains("sideways"), "{errors}");
}

// ---- queries: valid PromQL naming registered metrics

/// Every PromQL expression of a dashboard, with the dashboard's variables filled in, named
/// by where it comes from. Variable queries (`label_values(selector, label)`) give their
/// selector.
fn dashboard_queries(name: &str, json: &Value) -> Vec<(String, String)> {
    let fill = |q: &str| {
        q.replace("$__rate_interval", "5m")
            .replace("$namespace", ".*")
            .replace("$job", ".*")
    };
    let mut out = Vec::new();
    for panel in json["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().map_or(&[][..], Vec::as_slice);
        assert!(
            !targets.is_empty(),
            "{name}: panel {} has no query",
            panel["title"]
        );
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: {} has a target without expr", panel["title"]));
            out.push((
                format!("{name}: {}", panel["title"].as_str().unwrap_or("")),
                fill(expr),
            ));
        }
    }
    for var in json["templating"]["list"].as_array().unwrap() {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"].as_str().unwrap();
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|s| s.rsplit_once(','))
            .map(|(selector, _)| selector)
            .unwrap_or_else(|| panic!("{name}: variable query {q} is not label_values(..)"));
        out.push((format!("{name}: variable {}", var["name"]), fill(inner)));
    }
    out
}

/// The alert expressions of the rules file.
fn alert_queries() -> Vec<(String, String)> {
    let rules: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            out.push((
                format!("alert {}", rule["alert"].as_str().unwrap()),
                rule["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

const PROMQL_KEYWORDS: [&str; 13] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
];

/// The metric names a PromQL expression selects: identifiers that are not functions or
/// aggregations (followed by `(`), keywords, label names (inside `{}` or a `by (...)`-style
/// list), strings, numbers or durations.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            if chars[*i] == '"' {
                *i += 1;
                while *i < chars.len() && chars[*i] != '"' {
                    *i += if chars[*i] == '\\' { 2 } else { 1 };
                }
            }
            *i += 1;
        }
        *i += 1;
    };
    let mut skip_next_list = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                skip_to(&mut i, c);
            }
            '{' => skip_to(&mut i, '}'),
            '[' => skip_to(&mut i, ']'),
            '(' if skip_next_list => {
                skip_next_list = false;
                skip_to(&mut i, ')');
            }
            '0'..='9' | '.' => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let rest: String = chars[j..].iter().take(8).collect();
                // `sum by (x) (...)`: an aggregation with its grouping before its argument.
                let grouped = ["by", "without"].iter().any(|k| {
                    rest.strip_prefix(k)
                        .is_some_and(|r| r.starts_with(|c: char| c == '(' || c.is_whitespace()))
                });
                let call = j < chars.len() && chars[j] == '(' || grouped;
                let lower = word.to_ascii_lowercase();
                if [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                ]
                .contains(&lower.as_str())
                {
                    skip_next_list = call;
                } else if !call && !PROMQL_KEYWORDS.contains(&lower.as_str()) {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

#[test]
fn the_metric_name_scanner_finds_metrics_and_nothing_else() {
    let names = metric_names(
        r#"histogram_quantile(0.9, sum by (job_name, le) (rate(a_bucket{x=~"$y", z!="by(q)"}[5m])))
           / on (job_name) group_left(kind) b_total offset 10m and c < bool 0.8 * d unless absent(e)"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["a_bucket", "b_total", "c", "d", "e"]
    );
}

/// Names the operator registers (histograms with their series suffixes). Trainer names are
/// checked against the trainer's registry by its own unit test
/// (`metrics::tests::dashboards_and_alerts_name_only_registered_trainer_metrics`), since this
/// crate does not link libtorch.
fn operator_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for n in dinoflow_operator::metrics::Metrics::default().names() {
        for suffix in ["", "_bucket", "_sum", "_count"] {
            names.insert(format!("{n}{suffix}"));
        }
    }
    names
}

#[test]
fn every_dashboard_and_alert_query_is_valid_promql_naming_registered_metrics() {
    let mut queries = alert_queries();
    for (name, json) in dashboards() {
        queries.extend(dashboard_queries(&name, &json));
    }
    let operator = operator_names();
    let mut bad = Vec::new();
    for (origin, expr) in &queries {
        let names = metric_names(expr);
        if names.is_empty() {
            bad.push(format!("{origin}: names no metric: {expr}"));
        }
        for n in names {
            let known = if n.starts_with("dinoflow_operator_") {
                operator.contains(&n)
            } else {
                // The trainer's own unit test checks these against its registry.
                n.starts_with("dinoflow_trainer_")
            };
            if !known {
                bad.push(format!("{origin}: {n} is not a registered metric"));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));

    // Syntax: every expression as a recording rule, which promtool parses.
    let rules = serde_json::json!({
        "groups": [{
            "name": "dashboard-queries",
            "rules": queries.iter().enumerate().map(|(i, (_, expr))| serde_json::json!({
                "record": format!("dashboard_query:{i}"), "expr": expr,
            })).collect::<Vec<_>>(),
        }]
    });
    let file = tempfile::NamedTempFile::with_suffix(".yaml").unwrap();
    std::fs::write(file.path(), serde_yaml_ng::to_string(&rules).unwrap()).unwrap();
    let out = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(file.path()));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
}

#[test]
fn the_training_dashboard_filters_every_panel_by_job() {
    let (_, training) = dashboards()
        .into_iter()
        .find(|(n, _)| n == "training")
        .expect("training.json");
    let vars: Vec<&str> = training["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"job"), "{vars:?}");
    for panel in training["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            assert!(
                expr.contains("job_name=~\"$job\""),
                "{}: {expr}",
                panel["title"]
            );
        }
    }
}

// ---- alert rules

#[test]
fn alert_rules_pass_promtool_check_and_their_tests() {
    let out = run(Command::new(promtool())
        .args(["check", "rules"])
        .arg(rules_file()));
    assert!(
        out.status.success(),
        "promtool check rules:\n{}",
        text(&out)
    );
    let tests = repo_root().join("tests/alerts/dinoflow.rules.test.yaml");
    let out = run(Command::new(promtool()).args(["test", "rules"]).arg(&tests));
    assert!(out.status.success(), "promtool test rules:\n{}", text(&out));

    // Every alert has a case where it fires and one where it must not.
    let cases: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(&tests).unwrap()).unwrap();
    let all_cases: Vec<&Value> = cases["tests"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().unwrap())
        .collect();
    for (origin, _) in alert_queries() {
        let alert = origin.trim_start_matches("alert ");
        let of_alert = |fires: bool| {
            all_cases.iter().any(|c| {
                c["alertname"] == alert
                    && c["exp_alerts"]
                        .as_array()
                        .is_some_and(|a| a.is_empty() != fires)
            })
        };
        assert!(
            of_alert(true),
            "{alert} has no promtool case where it fires"
        );
        assert!(
            of_alert(false),
            "{alert} has no promtool case where it stays quiet"
        );
    }
}

#[test]
fn a_broken_alert_fails_the_promtool_tests() {
    // The tests must notice a rule that no longer fires: raise the stall window past the
    // test's horizon.
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(rules_file())
        .unwrap()
        .replace("[15m]) == 0", "[45m]) == 0");
    let alerts = dir.path().join("charts/dinoflow/files/alerts");
    std::fs::create_dir_all(&alerts).unwrap();
    std::fs::write(alerts.join("dinoflow.rules.yaml"), rules).unwrap();
    let tests = dir.path().join("tests/alerts");
    std::fs::create_dir_all(&tests).unwrap();
    std::fs::copy(
        repo_root().join("tests/alerts/dinoflow.rules.test.yaml"),
        tests.join("dinoflow.rules.test.yaml"),
    )
    .unwrap();
    let out = run(Command::new(promtool())
        .args(["test", "rules"])
        .arg(tests.join("dinoflow.rules.test.yaml")));
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("DinoflowRunStalled"), "{}", text(&out));
}

// ---- chart wiring

fn helm(args: &[&str]) -> Output {
    let helm = find_binary("helm").unwrap_or_else(|e| panic!("{e}"));
    run(Command::new(helm).args(args))
}

fn render(sets: &[&str]) -> Vec<DynamicObject> {
    let chart = chart();
    let mut args = vec![
        "template",
        "dinoflow",
        chart.to_str().unwrap(),
        "--namespace",
        "dinoflow-system",
    ];
    for set in sets {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    assert!(out.status.success(), "helm template:\n{}", text(&out));
    parse_manifests(&String::from_utf8_lossy(&out.stdout)).expect("rendered YAML parses")
}

fn of_kind<'a>(objects: &'a [DynamicObject], kind: &str) -> Vec<&'a DynamicObject> {
    objects
        .iter()
        .filter(|o| o.types.as_ref().is_some_and(|t| t.kind == kind))
        .collect()
}

const ALL_ON: [&str; 4] = [
    "serviceMonitor.enabled=true",
    "trainerMetrics.podMonitor.enabled=true",
    "prometheusRule.enabled=true",
    "grafana.dashboards.enabled=true",
];

#[test]
fn helm_lint_passes_with_every_monitoring_part_on() {
    let chart = chart();
    let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
    for set in ALL_ON {
        args.extend(["--set", set]);
    }
    let out = helm(&args);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn monitoring_objects_are_off_by_default() {
    let objects = render(&[]);
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(
            of_kind(&objects, kind).is_empty(),
            "{kind} rendered by default"
        );
    }
}

#[test]
fn the_prometheus_rule_is_the_plain_rules_file() {
    let objects = render(&[
        "prometheusRule.enabled=true",
        "prometheusRule.labels.release=kps",
    ]);
    let rule = of_kind(&objects, "PrometheusRule");
    assert_eq!(rule.len(), 1);
    let plain: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    assert_eq!(rule[0].data["spec"], plain);
    assert_eq!(
        rule[0].metadata.labels.as_ref().unwrap()["release"],
        "kps",
        "selector labels"
    );
}

#[test]
fn the_stalled_run_window_and_delay_are_chart_values() {
    let objects = render(&[
        "prometheusRule.enabled=true",
        "prometheusRule.stalledRun.window=30s",
        "prometheusRule.stalledRun.for=5s",
    ]);
    let spec = &of_kind(&objects, "PrometheusRule")[0].data["spec"];
    let mut plain: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(rules_file()).unwrap()).unwrap();
    let stalled = plain["groups"][0]["rules"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r["alert"] == "DinoflowRunStalled")
        .unwrap();
    let expr = stalled["expr"].as_str().unwrap().to_string();
    assert!(expr.contains("[15m]"), "{expr}");
    stalled["expr"] = expr.replace("[15m]", "[30s]").into();
    assert_eq!(stalled["for"], "5m");
    stalled["for"] = "5s".into();
    // Only the stalled-run rule changes.
    assert_eq!(spec, &plain);

    let out = helm(&[
        "template",
        "dinoflow",
        chart().to_str().unwrap(),
        "--set",
        "prometheusRule.stalledRun.window=15",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/prometheusRule/stalledRun/window"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_pod_monitor_selects_trainer_pods_on_their_metrics_port() {
    use dinoflow_operator::desired::{LABEL_MANAGED_BY, MANAGED_BY, scrape};
    let objects = render(&["trainerMetrics.podMonitor.enabled=true"]);
    let monitor = of_kind(&objects, "PodMonitor");
    assert_eq!(monitor.len(), 1);
    let spec = &monitor[0].data["spec"];
    assert_eq!(
        spec["selector"]["matchLabels"][LABEL_MANAGED_BY],
        MANAGED_BY
    );
    assert_eq!(spec["namespaceSelector"]["any"], true);
    let endpoint = &spec["podMetricsEndpoints"][0];
    assert_eq!(endpoint["port"], scrape::METRICS_PORT_NAME);
    assert_eq!(endpoint["path"], "/metrics");

    let objects = render(&[
        "trainerMetrics.podMonitor.enabled=true",
        "trainerMetrics.podMonitor.namespaces={ml,research}",
    ]);
    let spec = &of_kind(&objects, "PodMonitor")[0].data["spec"];
    assert_eq!(
        spec["namespaceSelector"]["matchNames"],
        serde_json::json!(["ml", "research"])
    );
}

#[test]
fn the_service_monitor_scrapes_a_port_the_service_and_the_operator_container_have() {
    let objects = render(&["serviceMonitor.enabled=true"]);
    let monitor = &of_kind(&objects, "ServiceMonitor")[0].data["spec"];
    let port = monitor["endpoints"][0]["port"].as_str().unwrap();
    let service = of_kind(&objects, "Service")[0];
    let service_port = service.data["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port)
        .unwrap_or_else(|| panic!("the Service has no port named {port}"));
    let target = service_port["targetPort"].as_str().unwrap();
    let deployment = of_kind(&objects, "Deployment")[0];
    let container_ports = &deployment.data["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(
        container_ports
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == target),
        "the operator container has no port {target}: {container_ports}"
    );
    // The Service's labels are the ones the monitor selects.
    let labels = service.metadata.labels.as_ref().unwrap();
    for (k, v) in monitor["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(labels.get(k).map(String::as_str), v.as_str(), "{k}");
    }
}

#[test]
fn each_dashboard_ships_in_a_configmap_for_the_grafana_sidecar() {
    let objects = render(&["grafana.dashboards.enabled=true"]);
    let maps: Vec<_> = of_kind(&objects, "ConfigMap")
        .into_iter()
        .filter(|o| {
            o.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("grafana_dashboard").map(String::as_str) == Some("1"))
        })
        .collect();
    let shipped: BTreeSet<String> = maps
        .iter()
        .flat_map(|m| m.data["data"].as_object().unwrap().keys().cloned())
        .collect();
    let files: BTreeSet<String> = dashboards()
        .into_iter()
        .map(|(n, _)| format!("{n}.json"))
        .collect();
    assert_eq!(shipped, files);
    for m in maps {
        for (key, json) in m.data["data"].as_object().unwrap() {
            let on_disk: Value = serde_json::from_str(
                &std::fs::read_to_string(chart().join("files/dashboards").join(key)).unwrap(),
            )
            .unwrap();
            let shipped: Value = serde_json::from_str(json.as_str().unwrap()).unwrap();
            assert_eq!(shipped, on_disk, "{key}");
        }
    }
}
