//! Installing Postern as an operator does: the Debian packages built with
//! cargo-deb (their contents, control data and units, installed with dpkg
//! into a throwaway root and run from there), `postern service` and the
//! config checks of both binaries.
//!
//! The packages are built from the binaries of the test build (debug
//! profile): cargo-deb refuses the dev profile, so they are hard-linked into
//! a staging target directory as `release/` and packaged with `--no-build`.
//! Releases run `cargo deb -p postern-edge` and `cargo deb -p postern-agent`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Instant,
};

use postern_tests::{TempDir, binary};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} does not run: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `command`, which must fail: what it printed.
fn fails(command: &mut Command) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} does not run: {e}"));
    let report = text(&out);
    assert!(!out.status.success(), "{command:?} succeeded: {report}");
    report
}

/// An agent config `postern start --all` runs.
const VALID_AGENT: &str = "authtoken: t0k3n\nserver_addr: tunnel.us.connect.example.test:443\n\
                           tunnels:\n  web:\n    proto: http\n    addr: 8080\n";

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Builds the `.deb` of `package` into `out` from the test build's
/// binaries; its path.
fn build_deb(package: &str, binary_name: &str, staging: &Path, out: &Path) -> PathBuf {
    let release = staging.join("release");
    std::fs::create_dir_all(&release).unwrap();
    let staged = release.join(binary_name);
    if !staged.exists() {
        std::fs::hard_link(binary(binary_name), &staged)
            .or_else(|_| std::fs::copy(binary(binary_name), &staged).map(|_| ()))
            .unwrap();
    }
    let started = Instant::now();
    let built = run(Command::new(env!("CARGO"))
        .current_dir(workspace())
        .env("CARGO_TARGET_DIR", staging)
        .args([
            "deb",
            "-p",
            package,
            "--no-build",
            "--strip",
            "--fast",
            "-o",
        ])
        .arg(out));
    println!("cargo deb -p {package}: {:?}", started.elapsed());
    let path = String::from_utf8_lossy(&built.stdout).trim().to_string();
    PathBuf::from(path.lines().last().unwrap())
}

/// `dpkg-deb -c`: (mode, path) of every file.
fn contents(deb: &Path) -> Vec<(String, String)> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (
                fields[0].to_string(),
                fields[5].trim_start_matches('.').to_string(),
            )
        })
        .collect()
}

fn control_file(deb: &Path, name: &str) -> String {
    text(&run(Command::new("dpkg-deb").arg("-I").arg(deb).arg(name)))
}

#[test]
fn the_debian_packages_install_into_a_root_and_their_binaries_run() {
    let dir = TempDir::new("debs");
    let staging = dir.path().join("target");
    let debs = dir.path().join("debs");
    let edge = build_deb("postern-edge", "postern-edge", &staging, &debs);
    let agent = build_deb("postern-agent", "postern", &staging, &debs);

    // What each package holds: the binary, the unit, the system user and
    // the config, readable by its group only and marked as a conffile.
    for (deb, package, bin, unit, config) in [
        (
            &edge,
            "postern-edge",
            "postern-edge",
            "postern-edge.service",
            "/etc/postern/edge.toml",
        ),
        (
            &agent,
            "postern",
            "postern",
            "postern.service",
            "/etc/postern/postern.yml",
        ),
    ] {
        let files = contents(deb);
        let mode_of = |path: &str| {
            files
                .iter()
                .find(|(_, p)| p == path)
                .map(|(m, _)| m.clone())
                .unwrap_or_else(|| panic!("{path} not in {package}: {files:?}"))
        };
        assert_eq!(mode_of(&format!("/usr/bin/{bin}")), "-rwxr-xr-x");
        assert_eq!(
            mode_of(&format!("/usr/lib/systemd/system/{unit}")),
            "-rw-r--r--"
        );
        assert_eq!(
            mode_of(&format!("/usr/lib/sysusers.d/{package}.conf")),
            "-rw-r--r--"
        );
        assert_eq!(mode_of(config), "-rw-r-----");
        let control = control_file(deb, "control");
        assert!(
            control.contains(&format!("Package: {package}\n")),
            "{control}"
        );
        assert!(control.contains("Version: 0.1.0"), "{control}");
        assert!(control.contains("systemd-sysusers"), "{control}");
        assert_eq!(control_file(deb, "conffiles").trim(), config);
        let postinst = control_file(deb, "postinst");
        assert!(
            postinst.contains(&format!(
                "systemd-sysusers ${{DPKG_ROOT:+--root=\"$DPKG_ROOT\"}} {package}.conf"
            )) && postinst.contains("chgrp"),
            "{postinst}"
        );
    }

    // Installed with dpkg into a throwaway root (maintainer scripts run
    // without chroot and honour DPKG_ROOT; the root has no libc package,
    // hence --force-depends).
    let root = dir.path().join("root");
    let admin = root.join("var/lib/dpkg");
    std::fs::create_dir_all(admin.join("info")).unwrap();
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(admin.join("status"), "").unwrap();
    let started = Instant::now();
    let installed = run(Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["--force-script-chrootless", "--force-depends", "-i"])
        .arg(&edge)
        .arg(&agent));
    println!(
        "dpkg -i of both: {:?}\n{}",
        started.elapsed(),
        text(&installed)
    );
    for package in ["postern-edge", "postern"] {
        let status = run(Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["-s", package]));
        assert!(
            text(&status).contains("Status: install ok installed"),
            "{}",
            text(&status)
        );
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let user = passwd
        .lines()
        .find(|l| l.starts_with("postern:"))
        .unwrap_or_else(|| panic!("no user postern in {passwd}"));
    let group = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("postern:x:"))
        .and_then(|rest| rest.split(':').next())
        .and_then(|g| g.parse().ok())
        .unwrap_or_else(|| panic!("no group postern in {group}"));
    assert!(
        user.ends_with(":/usr/sbin/nologin"),
        "a system user: {user}"
    );
    for config in ["etc/postern/edge.toml", "etc/postern/postern.yml"] {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(root.join(config)).unwrap();
        assert_eq!((meta.gid(), meta.mode() & 0o777), (gid, 0o640), "{config}");
    }

    // The units, as systemd reads them, in the installed root.
    verify_units(&root);

    // The installed binaries run, and check the packaged configs.
    let edge_bin = root.join("usr/bin/postern-edge");
    let version = run(Command::new(&edge_bin).arg("--version"));
    assert_eq!(text(&version).trim(), "postern-edge 0.1.0");
    let checked = run(Command::new(&edge_bin)
        .arg("--check-config")
        .arg(root.join("etc/postern/edge.toml")));
    assert_eq!(String::from_utf8_lossy(&checked.stdout), "ok\n");
    let agent_bin = root.join("usr/bin/postern");
    assert_eq!(
        text(&run(Command::new(&agent_bin).arg("--version"))).trim(),
        "postern 0.1.0"
    );
    // The packaged agent config is a template: the check names each key
    // still to fill in, and passes once a file gives them.
    let packaged = root.join("etc/postern/postern.yml");
    let report = fails(
        Command::new(&agent_bin)
            .args(["config", "check", "--config"])
            .arg(&packaged),
    );
    assert!(report.contains("3 problems in"), "{report}");
    for key in [
        "authtoken: missing",
        "server_addr: missing",
        "tunnels: the config defines no tunnels",
    ] {
        assert!(report.contains(key), "{key} in {report}");
    }
    let site = dir.path().join("site.yml");
    std::fs::write(&site, VALID_AGENT).unwrap();
    let filled = run(Command::new(&agent_bin)
        .args(["config", "check", "--config"])
        .arg(&packaged)
        .arg("--config")
        .arg(&site));
    assert!(
        text(&filled).starts_with("Valid configuration file at "),
        "{}",
        text(&filled)
    );
}

/// `systemd-analyze verify` (unknown keys, missing binaries; units of the
/// root's missing systemd itself not followed) and the offline security
/// score of the installed units, or why they cannot be checked here.
fn verify_units(root: &Path) {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        println!("systemd-analyze is not installed: the units are not verified");
        return;
    };
    println!("{}", text(&version).lines().next().unwrap_or_default());
    for unit in ["postern-edge.service", "postern.service"] {
        let path = root.join("usr/lib/systemd/system").join(unit);
        let verified = Command::new("systemd-analyze")
            .args(["verify", "--recursive-errors=no"])
            .arg(format!("--root={}", root.display()))
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            verified.status.success() && verified.stderr.is_empty(),
            "systemd-analyze verify {unit}: {}",
            text(&verified)
        );
        // The hardening, as systemd scores it (0 best, 10 worst).
        let security = Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(format!("--root={}", root.display()))
            .arg(&path)
            .output()
            .unwrap();
        let report = text(&security);
        let score: f32 = report
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no exposure level in: {report}"));
        println!("{unit}: exposure {score}");
        assert!(score <= 2.0, "{unit} is exposed ({score}): {report}");
    }
}

/// `postern service` where systemd does not run (as in the tests): the
/// unit written for the config given, refusals without root, clear errors
/// naming what is missing.
#[test]
fn service_install_writes_the_unit_and_says_what_is_missing() {
    let dir = TempDir::new("service");
    let units = dir.path().join("units");
    std::fs::create_dir_all(&units).unwrap();
    let config = dir.path().join("agent config.yml");
    std::fs::write(&config, VALID_AGENT).unwrap();
    let postern = || {
        let mut command = Command::new(binary("postern"));
        command.env("HOME", dir.path());
        command
    };
    let systemd_runs = Path::new("/run/systemd/system").is_dir();
    if systemd_runs {
        println!("systemd runs here: `service install` would enable a real unit; not run");
        return;
    }
    let report = fails(
        postern()
            .args(["service", "install", "--unit-dir"])
            .arg(&units)
            .arg("--config")
            .arg(&config),
    );
    assert!(
        report.contains("systemd is not running on this machine (/run/systemd/system is missing)"),
        "{report}"
    );
    let unit = std::fs::read_to_string(units.join("postern.service")).unwrap();
    let exec = format!(
        "ExecStart=\"{}\" \"start\" \"--all\" \"--config\" \"{}\"\n",
        binary("postern").canonicalize().unwrap().display(),
        config.display()
    );
    assert!(unit.contains(&exec), "{exec} in:\n{unit}");
    let verified = Command::new("systemd-analyze")
        .arg("verify")
        .arg(units.join("postern.service"))
        .output();
    match verified {
        Ok(out) => assert!(out.status.success(), "{}", text(&out)),
        Err(e) => println!("systemd-analyze does not run ({e}): the unit is not verified"),
    }

    // A config the agent could not start with is not installed.
    let broken = dir.path().join("broken.yml");
    std::fs::write(&broken, "authtoken: t\ntunnels:\n  w:\n    proto: udp\n").unwrap();
    let report = fails(
        postern()
            .args(["service", "install", "--unit-dir"])
            .arg(&units)
            .arg("--config")
            .arg(&broken),
    );
    assert!(
        report.contains("server_addr: missing") && report.contains("tunnels.w.proto"),
        "{report}"
    );

    // Without root: refused, naming why (as nobody, with setpriv).
    let as_nobody = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("postern"))
        .args(["service", "install", "--unit-dir"])
        .arg(&units)
        .arg("--config")
        .arg(&config)
        .output();
    match as_nobody {
        Ok(out) if text(&out).contains("Operation not permitted") => {
            println!("setpriv cannot change user here: the root check is not run")
        }
        Ok(out) => {
            let report = text(&out);
            assert!(!out.status.success(), "{report}");
            assert!(
                report.contains("postern service install needs root") && report.contains("sudo"),
                "{report}"
            );
        }
        Err(e) => println!("setpriv does not run ({e}): the root check is not run"),
    }

    for verb in ["start", "stop"] {
        let report = fails(postern().args(["service", verb]));
        assert!(
            report.contains("(/run/systemd/system is missing)"),
            "{verb}: {report}"
        );
    }
    let uninstall = run(postern()
        .args(["service", "uninstall", "--unit-dir"])
        .arg(&units));
    assert!(
        text(&uninstall).contains("nothing to disable"),
        "{}",
        text(&uninstall)
    );
    assert!(!units.join("postern.service").exists());
    let again = fails(
        postern()
            .args(["service", "uninstall", "--unit-dir"])
            .arg(&units),
    );
    assert!(
        again.contains("the service is not installed there"),
        "{again}"
    );
}

/// `postern-edge --check-config`: "ok", or the problem naming the file and
/// key; the certificate files it names are read too.
#[test]
fn the_edge_checks_a_config_file_and_the_files_it_names() {
    let dir = TempDir::new("check-config");
    let edge = |toml: &str| {
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, toml).unwrap();
        let mut command = Command::new(binary("postern-edge"));
        command.arg("--check-config").arg(path);
        command
    };
    let good = run(&mut edge(
        "domain = \"example.test\"\n[tls]\ndev_ca = true\n",
    ));
    assert_eq!(text(&good), "ok\n");
    let report = fails(&mut edge(
        "domain = \"example.test\"\ncolour = 1\n[tls]\ndev_ca = true\n",
    ));
    assert!(
        report.starts_with("ERROR: in ")
            && report.contains("edge.toml")
            && report.contains("colour"),
        "{report}"
    );
    let report = fails(&mut edge(
        "domain = \"example.test\"\n[tls]\nagent_cert = \"/nonexistent/tunnel.pem\"\n\
         agent_key = \"/nonexistent/tunnel-key.pem\"\n",
    ));
    assert!(
        report.contains("reading /nonexistent/tunnel.pem"),
        "{report}"
    );
    assert!(
        !dir.path().join("postern-data").exists(),
        "a check writes nothing"
    );
}

/// `postern config check` lists every problem it finds, each with its key.
#[test]
fn the_agent_config_check_lists_every_problem() {
    let dir = TempDir::new("config-check");
    let path = dir.path().join("postern.yml");
    std::fs::write(
        &path,
        "authtoken: t\nserver_addr: edge\nheartbeat_interval: soon\napi_url: ftp://x\n\
         tunnels:\n  a:\n    proto: udp\n    addr: 1\n  b:\n    proto: http\n    addr: 99999\n",
    )
    .unwrap();
    let report = fails(
        Command::new(binary("postern"))
            .args(["config", "check", "--config"])
            .arg(&path),
    );
    assert!(report.contains("5 problems in"), "{report}");
    for key in [
        "server_addr: \"edge\" is not host:port",
        "heartbeat_interval",
        "api_url: \"ftp://x\": the scheme must be http or https",
        "tunnels.a.proto",
        "tunnels.b.addr",
    ] {
        assert!(report.contains(key), "{key} in {report}");
    }
    let flag = fails(
        Command::new(binary("postern"))
            .args(["config", "check", "--authtoken", "x", "--config"])
            .arg(&path),
    );
    assert!(
        flag.contains("--authtoken: `postern config check` starts no session"),
        "{flag}"
    );
}
