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
