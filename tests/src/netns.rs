//! A network namespace joined to this one by a veth pair, for a node on
//! the other side of a link the test can cut: `ip link set … down` drops
//! everything both ways, as a partition between regions would. Needs root
//! (CAP_NET_ADMIN) and `ip` (iproute2).

use std::{net::Ipv4Addr, process::Command as StdCommand};

use tokio::process::Command;

pub struct NetNs {
    pub name: String,
    host_if: String,
    /// This side's address on the link.
    pub host_ip: Ipv4Addr,
    /// The namespace's address on the link.
    pub ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = StdCommand::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl NetNs {
    /// A new namespace `pst<random>` with loopback up and a /30 link to
    /// this namespace on 10.231.<random>.0.
    pub fn create() -> anyhow::Result<NetNs> {
        let tag = &postern_net::random_label()[..6].to_lowercase();
        let octet = 1 + rand_octet();
        let ns = NetNs {
            name: format!("pst{tag}"),
            host_if: format!("pv{tag}h"),
            host_ip: Ipv4Addr::new(10, 231, octet, 1),
            ns_ip: Ipv4Addr::new(10, 231, octet, 2),
        };
        let ns_if = format!("pv{tag}n");
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Cuts the link: nothing passes either way.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("cutting the link");
    }

    /// Restores the link.
    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("restoring the link");
    }
}

fn rand_octet() -> u8 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    (hasher.finish() % 250) as u8
}

impl Drop for NetNs {
    /// Deleting the namespace deletes the veth pair with it.
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("removing the test network namespace: {e:#}");
        }
    }
}
