//! `postern service install|start|stop|uninstall`: the agent as a systemd
//! service, as ngrok's `ngrok service`. `install` checks the config files,
//! writes `postern.service` running `postern start --all` with them, and
//! enables it; the unit in `/etc/systemd/system` takes the place of the
//! one the Debian package ships.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;

/// The unit's name.
const UNIT: &str = "postern.service";
/// Where a running systemd keeps its runtime state: absent, no systemd.
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Check the config files, write postern.service running `postern
    /// start --all` with them, and enable it (needs root and systemd).
    Install {
        /// Where the unit is written.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
    },
    /// Start the service (systemctl start postern).
    Start,
    /// Stop the service (systemctl stop postern).
    Stop,
    /// Stop and disable the service and remove its unit (needs root).
    Uninstall {
        /// Where the unit was written.
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: PathBuf,
    },
}

/// Runs the command; `config` are the files `install` runs the agent
/// with (already checked by the caller).
pub fn run(command: ServiceCommand, config: &[PathBuf]) -> anyhow::Result<()> {
    match command {
        ServiceCommand::Install { unit_dir } => {
            need_root("install", &unit_dir)?;
            let unit = unit_dir.join(UNIT);
            let binary = std::env::current_exe()
                .and_then(|p| p.canonicalize())
                .context("finding the postern binary")?;
            std::fs::write(&unit, unit_text(&binary, config))
                .with_context(|| format!("writing {}", unit.display()))?;
            println!("wrote {}", unit.display());
            systemd_running(&format!(
                "{} is written but not enabled; remove it with `postern service uninstall`",
                unit.display()
            ))?;
            systemctl(&["daemon-reload"])?;
            systemctl(&["enable", UNIT])?;
            println!("enabled {UNIT}; start it with `postern service start`");
            Ok(())
        }
        ServiceCommand::Start => {
            systemd_running("the service cannot be started")?;
            systemctl(&["start", UNIT])
        }
        ServiceCommand::Stop => {
            systemd_running("the service cannot be stopped")?;
            systemctl(&["stop", UNIT])
        }
        ServiceCommand::Uninstall { unit_dir } => {
            need_root("uninstall", &unit_dir)?;
            let unit = unit_dir.join(UNIT);
            if !unit.exists() {
                bail!(
                    "{} does not exist: the service is not installed there",
                    unit.display()
                );
            }
            let running = Path::new(SYSTEMD_RUNNING).is_dir();
            if running {
                systemctl(&["disable", "--now", UNIT])?;
            }
            std::fs::remove_file(&unit).with_context(|| format!("removing {}", unit.display()))?;
            println!("removed {}", unit.display());
            if running {
                systemctl(&["daemon-reload"])?;
            } else {
                println!(
                    "systemd is not running ({SYSTEMD_RUNNING} is missing): nothing to disable"
                );
            }
            Ok(())
        }
    }
}

/// The unit for `postern start --all` with `config`: restarted on
/// failure, read-only access to the system and home directories.
fn unit_text(binary: &Path, config: &[PathBuf]) -> String {
    let mut exec = vec![binary.display().to_string(), "start".into(), "--all".into()];
    for path in config {
        exec.push("--config".into());
        exec.push(path.display().to_string());
    }
    let exec: Vec<String> = exec.iter().map(|a| quote(a)).collect();
    format!(
        "# Written by `postern service install`; `postern service uninstall` removes it.\n\
         [Unit]\n\
         Description=Postern agent (postern start --all)\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         ExecStart={}\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         NoNewPrivileges=yes\n\
         ProtectSystem=strict\n\
         ProtectHome=read-only\n\
         PrivateTmp=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exec.join(" ")
    )
}

/// An `ExecStart=` word: quoted, with systemd's specifiers and variables
/// escaped.
fn quote(word: &str) -> String {
    let escaped = word
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('%', "%%")
        .replace('$', "$$");
    format!("\"{escaped}\"")
}

/// The effective user id, from `/proc/self/status`.
fn effective_uid() -> anyhow::Result<u32> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("/proc/self/status has no effective Uid")
}

fn need_root(verb: &str, unit_dir: &Path) -> anyhow::Result<()> {
    if effective_uid()? != 0 {
        bail!(
            "postern service {verb} needs root: it writes in {} and runs systemctl; run it with sudo",
            unit_dir.display()
        );
    }
    Ok(())
}

fn systemd_running(consequence: &str) -> anyhow::Result<()> {
    if !Path::new(SYSTEMD_RUNNING).is_dir() {
        bail!(
            "systemd is not running on this machine ({SYSTEMD_RUNNING} is missing), so {consequence}; \
             run `postern start --all --config <file>` under this machine's own init system instead"
        );
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .args(args)
        .status()
        .context("running systemctl (is systemd installed?)")?;
    if !status.success() {
        bail!("systemctl {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_words_are_quoted_for_systemd() {
        let unit = unit_text(
            Path::new("/usr/bin/postern"),
            &[PathBuf::from("/etc/my postern/100%.yml")],
        );
        assert!(
            unit.contains(
                "ExecStart=\"/usr/bin/postern\" \"start\" \"--all\" \"--config\" \"/etc/my postern/100%%.yml\"\n"
            ),
            "{unit}"
        );
    }
}
