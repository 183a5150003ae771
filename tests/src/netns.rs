//! Hosts for multi-host tests: network namespaces made by the test, joined
//! by veth pairs to a bridge in a switch namespace, removed on drop.

use std::process::Command;

pub struct Lab {
    prefix: String,
    /// (host name, namespace, veth end on the switch)
    hosts: Vec<(String, String, String)>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Lab {
    /// One namespace per `(name, address/prefix)`, all on one bridge.
    pub fn new(hosts: &[(&str, &str)]) -> Lab {
        let prefix = format!("m{}", std::process::id() % 100_000);
        let sw = format!("{prefix}-sw");
        let mut lab = Lab { prefix: prefix.clone(), hosts: Vec::new() };
        ip(&["netns", "add", &sw]);
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, (name, addr)) in hosts.iter().enumerate() {
            let ns = format!("{prefix}-{name}");
            let (host_end, sw_end) = (format!("{prefix}h{i}"), format!("{prefix}s{i}"));
            ip(&["netns", "add", &ns]);
            ip(&["link", "add", &host_end, "type", "veth", "peer", "name", &sw_end]);
            ip(&["link", "set", &host_end, "netns", &ns]);
            ip(&["link", "set", &sw_end, "netns", &sw]);
            ip(&["-n", &ns, "link", "set", &host_end, "name", "eth0"]);
            ip(&["-n", &ns, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &sw, "link", "set", &sw_end, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &sw_end, "up"]);
            lab.hosts.push((name.to_string(), ns, sw_end));
        }
        lab
    }

    fn host(&self, name: &str) -> &(String, String, String) {
        self.hosts.iter().find(|h| h.0 == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A command that runs `program` on `host`.
    pub fn command(&self, host: &str, program: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.host(host).1, program]);
        c
    }

    /// Unplugs `host` from the switch (its processes keep running).
    pub fn cut(&self, host: &str) {
        ip(&["-n", &format!("{}-sw", self.prefix), "link", "set", &self.host(host).2, "down"]);
    }

    pub fn restore(&self, host: &str) {
        ip(&["-n", &format!("{}-sw", self.prefix), "link", "set", &self.host(host).2, "up"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, ns, _) in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &format!("{}-sw", self.prefix)]).status();
    }
}
