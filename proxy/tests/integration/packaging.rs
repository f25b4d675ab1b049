//! The container files in `docker/` (no Docker engine runs here, so they are checked by
//! reading): every YAML, JSON and TOML file parses, and they agree with each other and
//! with spillway — compose services and mounts exist, `spillway.toml` is a valid
//! spillway config whose ports are the ones published, scraped and health-checked,
//! Grafana's dashboard uses the provisioned data source and only metric names spillway
//! exports, and the stop grace period covers the shutdown drain.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value as Json;
use serde_norway::Value as Yaml;
use spillway::config::Config;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the proxy crate sits in the workspace")
        .to_owned()
}

fn docker(path: &str) -> PathBuf {
    root().join("docker").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: &str) -> Yaml {
    let p = docker(path);
    serde_norway::from_str(&read(&p)).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn str_of<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

fn seq<'a>(v: &'a Yaml, what: &str) -> &'a Vec<Yaml> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

fn compose() -> Yaml {
    yaml("compose.yml")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(s.is_mapping(), "compose service {name} missing");
    s
}

/// A service's volumes as (source, container path); short syntax `src:dst[:mode]`.
fn mounts(svc: &Yaml, name: &str) -> Vec<(String, String)> {
    seq(&svc["volumes"], &format!("{name}.volumes"))
        .iter()
        .map(|v| {
            let parts: Vec<&str> = str_of(v, "volume").split(':').collect();
            assert!(parts.len() >= 2, "{name}: volume {v:?} needs source:target");
            (parts[0].to_owned(), parts[1].to_owned())
        })
        .collect()
}

fn mount_source(svc: &Yaml, name: &str, target: &str) -> String {
    mounts(svc, name)
        .into_iter()
        .find(|(_, t)| t == target)
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("{name}: nothing mounted at {target}"))
}

/// Container ports a service publishes (`[ip:]host:container`).
fn published(svc: &Yaml, name: &str) -> Vec<u16> {
    seq(&svc["ports"], &format!("{name}.ports"))
        .iter()
        .map(|p| {
            str_of(p, "port")
                .rsplit(':')
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("{name}: port {p:?}"))
        })
        .collect()
}

fn command(svc: &Yaml, name: &str) -> Vec<String> {
    seq(&svc["command"], &format!("{name}.command"))
        .iter()
        .map(|c| str_of(c, "command").to_owned())
        .collect()
}

/// The value after `--config` in an argument list.
fn config_arg(args: &[String]) -> &str {
    args.iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .expect("--config FILE in the command")
}

fn spillway_config() -> Config {
    Config::from_toml_str(&read(&docker("spillway.toml")))
        .unwrap_or_else(|e| panic!("docker/spillway.toml is not a valid config: {e}"))
}

fn metrics_addr(config: &Config) -> SocketAddr {
    config
        .metrics
        .listen
        .expect("docker/spillway.toml sets metrics.listen")
}

#[test]
fn compose_services_mounts_and_dependencies_exist() {
    services_mounts_and_dependencies_exist(
        &compose(),
        &["postgres", "migrate", "spillway", "prometheus", "grafana"],
    );
}

/// `names` are services of `c`; every dependency is a service (with a known
/// condition), every mounted file exists, every named volume is declared, every build
/// is the one Dockerfile.
fn services_mounts_and_dependencies_exist(c: &Yaml, names: &[&str]) {
    let c = c.clone();
    let services = c["services"].as_mapping().expect("services");
    for name in names {
        service(&c, name);
    }
    let declared_volumes = c["volumes"].as_mapping().expect("top-level volumes");
    for (name, svc) in services {
        let name = str_of(name, "service name");
        match &svc["depends_on"] {
            Yaml::Null => {}
            Yaml::Sequence(deps) => {
                for d in deps {
                    service(&c, str_of(d, "depends_on"));
                }
            }
            Yaml::Mapping(deps) => {
                for (d, cond) in deps {
                    service(&c, str_of(d, "depends_on"));
                    let cond = str_of(&cond["condition"], "condition");
                    assert!(
                        [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully"
                        ]
                        .contains(&cond),
                        "{name}: condition {cond}"
                    );
                }
            }
            other => panic!("{name}: depends_on {other:?}"),
        }
        if svc["volumes"].is_null() {
            continue;
        }
        for (source, target) in mounts(svc, name) {
            assert!(target.starts_with('/'), "{name}: target {target}");
            if source.starts_with('.') || source.starts_with('/') {
                let path = docker(&source);
                assert!(
                    path.exists(),
                    "{name} mounts {source}, which does not exist"
                );
            } else {
                assert!(
                    declared_volumes.contains_key(source.as_str()),
                    "{name}: volume {source} is not declared"
                );
            }
        }
        let build = &svc["build"];
        if !build.is_null() {
            let context = str_of(&build["context"], "build.context");
            let dockerfile = str_of(&build["dockerfile"], "build.dockerfile");
            let file = docker(context).join(dockerfile);
            assert!(file.exists(), "{name}: {} missing", file.display());
            assert_eq!(
                std::fs::canonicalize(&file).expect("dockerfile"),
                std::fs::canonicalize(docker("Dockerfile")).expect("dockerfile")
            );
        }
    }
}

#[test]
fn spillway_config_is_valid_and_matches_compose() {
    let c = compose();
    let config = spillway_config();
    let metrics = metrics_addr(&config);
    // Reachable from other containers and through published ports.
    assert!(config.server.listen.ip().is_unspecified(), "server.listen");
    assert!(metrics.ip().is_unspecified(), "metrics.listen");
    let deferred: Vec<String> = config
        .table_policies()
        .expect("policies")
        .into_iter()
        .filter(|(_, t)| t.policy.is_deferred())
        .map(|(n, _)| n.to_string())
        .collect();
    assert!(!deferred.is_empty(), "the example defers a table");

    // The config file is mounted where both spillway commands read it.
    for name in ["migrate", "spillway"] {
        let svc = service(&c, name);
        let args = command(svc, name);
        let target = config_arg(&args);
        assert_eq!(mount_source(svc, name, target), "./spillway.toml", "{name}");
        assert_eq!(
            str_of(&svc["image"], "image"),
            str_of(&service(&c, "migrate")["image"], "image"),
            "migrate and spillway run one image"
        );
    }
    assert_eq!(command(service(&c, "migrate"), "migrate")[0], "migrate");
    let svc = service(&c, "spillway");
    assert_eq!(command(svc, "spillway")[0], "run");
    let ports = published(svc, "spillway");
    assert!(ports.contains(&config.server.listen.port()), "{ports:?}");
    assert!(ports.contains(&metrics.port()), "{ports:?}");

    // The journal is on the volume, not in the container's writable layer.
    let data = mounts(svc, "spillway")
        .into_iter()
        .find(|(s, _)| !s.starts_with('.'))
        .map(|(_, t)| t)
        .expect("spillway mounts a named volume");
    assert!(
        config.journal.dir.starts_with(&data),
        "journal.dir {} is not under {data}",
        config.journal.dir.display()
    );
    let dockerfile = read(&docker("Dockerfile"));
    assert!(
        dockerfile.contains(&format!("VOLUME [\"{data}\"]")),
        "the image declares {data} a volume"
    );

    // The backend is the compose PostgreSQL with its credentials and database.
    let url = url::Url::parse(&config.backend.url).expect("backend.url");
    let host = url.host_str().expect("host");
    let pg = service(&c, host);
    let env = &pg["environment"];
    assert_eq!(
        url.username(),
        str_of(&env["POSTGRES_USER"], "POSTGRES_USER")
    );
    assert_eq!(
        url.password(),
        Some(str_of(&env["POSTGRES_PASSWORD"], "POSTGRES_PASSWORD"))
    );
    assert_eq!(
        url.path().trim_start_matches('/'),
        str_of(&env["POSTGRES_DB"], "POSTGRES_DB")
    );
    assert_eq!(url.port().unwrap_or(5432), 5432);
    assert!(str_of(&pg["image"], "image").starts_with("postgres:15"));

    // Deferred tables must exist at startup: the init script creates them.
    let init_target = mounts(pg, host)
        .into_iter()
        .find(|(s, _)| s == "./postgres/init.sql")
        .map(|(_, t)| t)
        .expect("init.sql mounted");
    assert!(init_target.starts_with("/docker-entrypoint-initdb.d/"));
    let init = read(&docker("postgres/init.sql"));
    for table in &deferred {
        assert!(
            init.contains(&format!("CREATE TABLE {table} (")),
            "init.sql does not create {table}"
        );
    }

    // SIGTERM drains sessions, then deferred writes, each within shutdown_timeout.
    let grace = humantime::parse_duration(str_of(&svc["stop_grace_period"], "grace"))
        .expect("stop_grace_period");
    let needed = config.server.shutdown_timeout * 2 + Duration::from_secs(5);
    assert!(grace >= needed, "stop_grace_period {grace:?} < {needed:?}");
}

/// The arguments of the first Dockerfile instruction `name`, continuation lines joined.
fn instruction(dockerfile: &str, name: &str) -> String {
    let mut lines = dockerfile
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{name} ")));
    let mut out = String::new();
    for line in lines.by_ref() {
        match line.strip_suffix('\\') {
            Some(part) => out.push_str(part),
            None => {
                out.push_str(line);
                break;
            }
        }
    }
    let args = out
        .strip_prefix(name)
        .unwrap_or_else(|| panic!("no {name} instruction"));
    args.trim().to_owned()
}

#[test]
fn dockerfile_matches_the_config_and_the_workspace() {
    let dockerfile = read(&docker("Dockerfile"));
    let config = spillway_config();
    let metrics = metrics_addr(&config);
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2,
        "multi-stage"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );

    let healthcheck = instruction(&dockerfile, "HEALTHCHECK");
    assert!(
        healthcheck.contains(&format!("/dev/tcp/127.0.0.1/{}", metrics.port())),
        "health check port is metrics.listen's:\n{healthcheck}"
    );
    assert!(healthcheck.contains("GET /healthz "), "{healthcheck}");

    let expose = instruction(&dockerfile, "EXPOSE");
    for port in [config.server.listen.port(), metrics.port()] {
        assert!(
            expose.split_whitespace().any(|p| p == port.to_string()),
            "EXPOSE {expose} lacks {port}"
        );
    }
    // The image's default command reads the file compose mounts.
    let cmd = instruction(&dockerfile, "CMD");
    let args: Vec<String> = serde_json::from_str(&cmd).expect("CMD in exec form");
    let c = compose();
    assert_eq!(
        config_arg(&args),
        config_arg(&command(service(&c, "spillway"), "spillway"))
    );

    // The builder's toolchain is at least the workspace's rust-version.
    let version = |s: &str| -> (u32, u32) {
        let mut it = s
            .split('.')
            .map(|p| p.parse::<u32>().expect("version number"));
        (it.next().unwrap_or(0), it.next().unwrap_or(0))
    };
    let rust = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ARG RUST_VERSION="))
        .expect("ARG RUST_VERSION");
    let manifest = read(&root().join("Cargo.toml"));
    let msrv = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("workspace rust-version");
    assert!(version(rust) >= version(msrv), "{rust} < {msrv}");

    let ignore = read(&docker("Dockerfile.dockerignore"));
    assert!(ignore.lines().any(|l| l.trim() == "target"));
}

#[test]
fn prometheus_scrapes_the_metrics_port() {
    let c = compose();
    let prom = yaml("prometheus.yml");
    let metrics = metrics_addr(&spillway_config());
    let jobs = seq(&prom["scrape_configs"], "scrape_configs");
    let job = jobs
        .iter()
        .find(|j| j["job_name"].as_str() == Some("spillway"))
        .expect("a spillway job");
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    let targets: Vec<&str> = seq(&job["static_configs"], "static_configs")
        .iter()
        .flat_map(|s| seq(&s["targets"], "targets"))
        .map(|t| str_of(t, "target"))
        .collect();
    assert_eq!(targets, [format!("spillway:{}", metrics.port())]);
    for t in targets {
        let host = t.split(':').next().unwrap_or_default();
        service(&c, host);
    }
    // Prometheus reads the file compose mounts.
    let svc = service(&c, "prometheus");
    let file = command(svc, "prometheus")
        .iter()
        .find_map(|a| a.strip_prefix("--config.file=").map(str::to_owned))
        .expect("--config.file");
    assert_eq!(mount_source(svc, "prometheus", &file), "./prometheus.yml");
    assert!(published(svc, "prometheus").contains(&9090));
}

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    let mut todo: Vec<&Json> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .collect();
    while let Some(p) = todo.pop() {
        if let Some(nested) = p["panels"].as_array() {
            todo.extend(nested);
        }
        out.push(p);
    }
    out
}

/// The `spillway_…` names in a PromQL expression.
fn metric_names(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("spillway_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(&tail[..end]);
        rest = &tail[end..];
    }
    out
}

#[test]
fn grafana_provisioning_and_dashboard_agree() {
    let c = compose();
    let grafana = service(&c, "grafana");
    let provisioning = mount_source(grafana, "grafana", "/etc/grafana/provisioning");
    assert_eq!(provisioning, "./grafana/provisioning");

    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = seq(&ds["datasources"], "datasources");
    let [source] = sources.as_slice() else {
        panic!("one data source: {sources:?}");
    };
    assert_eq!(source["type"].as_str(), Some("prometheus"));
    let uid = str_of(&source["uid"], "uid");
    let url = url::Url::parse(str_of(&source["url"], "url")).expect("data source url");
    service(&c, url.host_str().expect("host"));
    assert_eq!(url.host_str(), Some("prometheus"));
    assert_eq!(url.port(), Some(9090));
    let prom = yaml("prometheus.yml");
    assert_eq!(
        source["jsonData"]["timeInterval"].as_str(),
        prom["global"]["scrape_interval"].as_str(),
        "Grafana's timeInterval is Prometheus' scrape interval"
    );

    let providers = yaml("grafana/provisioning/dashboards/spillway.yml");
    let provider = &seq(&providers["providers"], "providers")[0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    let path = str_of(&provider["options"]["path"], "options.path");
    assert_eq!(
        mount_source(grafana, "grafana", path),
        "./grafana/dashboards"
    );
    let home = str_of(
        &grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"],
        "home dashboard",
    );
    let file = home
        .strip_prefix(&format!("{path}/"))
        .expect("the home dashboard is a provisioned one");
    let text = read(&docker("grafana/dashboards").join(file));
    let dashboard: Json = serde_json::from_str(&text).expect("dashboard JSON");
    assert_eq!(dashboard["uid"].as_str(), Some("spillway"));

    let mut ids = std::collections::HashSet::new();
    let mut queried = std::collections::BTreeSet::new();
    let mut exprs = Vec::new();
    for p in panels(&dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "{title}");
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "{title} is wider than the grid");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"].as_str(), Some(uid), "{title}");
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}");
        for t in targets {
            assert_eq!(t["datasource"]["uid"].as_str(), Some(uid), "{title}");
            let expr = t["expr"].as_str().expect("expr");
            exprs.push(expr.to_owned());
            for name in metric_names(expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|b| spillway::metrics::HISTOGRAMS.contains(b))
                    })
                    .unwrap_or(name);
                assert!(
                    spillway::metrics::ALL.contains(&base),
                    "panel {title:?} queries {name}, which spillway does not export"
                );
                queried.insert(base.to_owned());
            }
        }
    }
    // What the issue asks the dashboard to show.
    let shows = |needle: &str| exprs.iter().any(|e| e.contains(needle));
    assert!(shows("spillway_cache_hits_total") && shows("spillway_cache_misses_total"));
    assert!(shows(
        "histogram_quantile(0.5, sum by (le, path) (rate(spillway_query_duration_seconds_bucket"
    ));
    assert!(shows(
        "histogram_quantile(0.99, sum by (le, path) (rate(spillway_query_duration_seconds_bucket"
    ));
    assert!(shows("spillway_pending_writes"));
    assert!(shows("spillway_pending_oldest_age_seconds"));
    assert!(shows("reason) (rate(spillway_fallbacks_total"));
    assert!(shows("spillway_dead_letters_total"));
    assert!(queried.len() >= 15, "{queried:?}");
}

/// Host ports a service publishes (`ip:host:container`).
fn host_ports(svc: &Yaml, name: &str) -> Vec<u16> {
    seq(&svc["ports"], &format!("{name}.ports"))
        .iter()
        .map(|p| {
            let parts: Vec<&str> = str_of(p, "port").split(':').collect();
            parts[parts.len() - 2]
                .parse()
                .unwrap_or_else(|_| panic!("{name}: port {p:?}"))
        })
        .collect()
}

/// The value after `flag` in an argument list.
fn flag<'a>(args: &'a [String], flag: &str, name: &str) -> &'a str {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or_else(|| panic!("{name}: no {flag} in {args:?}"))
}

/// `compose.nats.yml` (issue 17): three JetStream nodes routed to each other as one
/// cluster, and two spillway instances running `spillway-nats.toml`, whose journal is
/// that cluster with three replicas, on their own host ports.
#[test]
fn nats_compose_runs_two_instances_on_a_three_node_jetstream_cluster() {
    let c = yaml("compose.nats.yml");
    let nodes = ["nats-1", "nats-2", "nats-3"];
    let instances = ["spillway-a", "spillway-b"];
    let mut names = vec!["postgres", "migrate"];
    names.extend(nodes);
    names.extend(instances);
    services_mounts_and_dependencies_exist(&c, &names);

    // One cluster: JetStream on, one cluster name, routes to every node's cluster port.
    let routes: Vec<String> = nodes.iter().map(|n| format!("nats://{n}:6222")).collect();
    for node in nodes {
        let args = command(service(&c, node), node);
        assert!(args.iter().any(|a| a == "--jetstream"), "{node}: {args:?}");
        assert_eq!(flag(&args, "--server_name", node), node);
        assert_eq!(flag(&args, "--cluster_name", node), "spillway");
        assert_eq!(flag(&args, "--cluster", node), "nats://0.0.0.0:6222");
        let listed: Vec<&str> = flag(&args, "--routes", node).split(',').collect();
        assert_eq!(listed, routes, "{node}");
        let store = flag(&args, "--store_dir", node);
        assert!(
            mounts(service(&c, node), node)
                .iter()
                .any(|(source, target)| target == store && !source.starts_with('.')),
            "{node}: its store {store} is on a named volume"
        );
    }

    let config = Config::from_toml_str(&read(&docker("spillway-nats.toml")))
        .unwrap_or_else(|e| panic!("docker/spillway-nats.toml is not a valid config: {e}"));
    assert_eq!(
        config.journal.backend,
        spillway_policies::config::JournalBackend::Nats
    );
    let nats = &config.journal.nats;
    assert_eq!(nats.replicas, nodes.len());
    let servers: Vec<String> = nodes.iter().map(|n| format!("nats://{n}:4222")).collect();
    assert_eq!(nats.servers, servers);
    let metrics = metrics_addr(&config);
    let url = url::Url::parse(&config.backend.url).expect("backend.url");
    service(&c, url.host_str().expect("host"));

    let migrate = service(&c, "migrate");
    let target = config_arg(&command(migrate, "migrate")).to_owned();
    assert_eq!(
        mount_source(migrate, "migrate", &target),
        "./spillway-nats.toml"
    );
    let mut host = Vec::new();
    for name in instances {
        let svc = service(&c, name);
        let args = command(svc, name);
        assert_eq!(args[0], "run", "{name}");
        assert_eq!(
            mount_source(svc, name, config_arg(&args)),
            "./spillway-nats.toml",
            "{name}"
        );
        assert_eq!(
            str_of(&svc["image"], "image"),
            str_of(&migrate["image"], "image"),
            "{name} runs the image migrate runs"
        );
        let ports = published(svc, name);
        assert!(
            ports.contains(&config.server.listen.port()),
            "{name}: {ports:?}"
        );
        assert!(ports.contains(&metrics.port()), "{name}: {ports:?}");
        host.extend(host_ports(svc, name));
        let deps = svc["depends_on"].as_mapping().expect("depends_on");
        for dep in nodes.iter().chain(&["migrate", "postgres"]) {
            assert!(deps.contains_key(*dep), "{name} does not depend on {dep}");
        }
        let grace = humantime::parse_duration(str_of(&svc["stop_grace_period"], "grace"))
            .expect("stop_grace_period");
        let needed = config.server.shutdown_timeout * 2 + Duration::from_secs(5);
        assert!(
            grace >= needed,
            "{name}: stop_grace_period {grace:?} < {needed:?}"
        );
    }
    let distinct: std::collections::HashSet<u16> = host.iter().copied().collect();
    assert_eq!(distinct.len(), host.len(), "host ports collide: {host:?}");

    let init = read(&docker("postgres/init.sql"));
    for (table, t) in config.table_policies().expect("policies") {
        if t.policy.is_deferred() {
            assert!(
                init.contains(&format!("CREATE TABLE {table} (")),
                "init.sql does not create {table}"
            );
        }
    }
}
