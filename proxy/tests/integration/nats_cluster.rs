//! A throwaway three-node `nats-server` cluster with JetStream for the tests of the
//! NATS journal: client and route ports picked free on loopback, each node's store in
//! one temporary directory, started by the test and killed on drop (also when the test
//! panics). Like `ops/throwaway.rs` does for PostgreSQL.
//!
//! Invariant: the servers live exactly as long as the [`NatsCluster`] value; a node
//! stopped by [`NatsCluster::stop_node`] restarts on the same ports and store. The
//! nodes do not advertise their client ports: a client reaches only the servers its
//! configuration names (so a relay in front of one node is its only way in).

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary: Debian's package installs it in /usr/sbin.
fn binary() -> PathBuf {
    let sbin = PathBuf::from("/usr/sbin/nats-server");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nats-server")
    }
}

/// `n` distinct free loopback ports (each held until all are picked, so none is
/// picked twice).
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

struct Node {
    client_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` nodes clustered with each other and waits until each accepts clients.
    pub fn start(n: usize) -> NatsCluster {
        let dir = tempfile::Builder::new()
            .prefix("spillway-nats-")
            .tempdir()
            .expect("temp dir");
        let free = free_ports(2 * n);
        let ports: Vec<(u16, u16)> = free.chunks(2).map(|p| (p[0], p[1])).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, route)| format!("\"nats-route://127.0.0.1:{route}\""))
            .collect();
        let nodes = ports
            .iter()
            .enumerate()
            .map(|(i, (client, route))| {
                let store = dir.path().join(format!("n{i}"));
                let text = format!(
                    "server_name: n{i}\nlisten: \"127.0.0.1:{client}\"\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: spillway-test\n listen: \"127.0.0.1:{route}\"\n \
                     no_advertise: true\n routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                );
                let config = dir.path().join(format!("n{i}.conf"));
                std::fs::write(&config, text).expect("write nats config");
                Node {
                    client_port: *client,
                    config,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster { nodes, dir };
        for i in 0..n {
            cluster.start_node(i);
        }
        cluster
    }

    /// `servers = [...]` for `[journal.nats]`.
    pub fn servers_toml(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"nats://127.0.0.1:{}\"", n.client_port))
            .collect();
        format!("[{}]", urls.join(", "))
    }

    /// The `[journal]` sections of a spillway using this cluster with `replicas`,
    /// its local directory `dir` (unused by the NATS journal; a test deletes it).
    pub fn journal_toml(&self, replicas: usize, dir: &std::path::Path) -> String {
        journal_toml(&self.servers_toml(), replicas, dir)
    }

    /// Node `i`'s client port.
    pub fn client_port(&self, i: usize) -> u16 {
        self.nodes[i].client_port
    }

    /// (Re)starts node `i` on its ports and store; waits until it accepts clients.
    pub fn start_node(&mut self, i: usize) {
        let log_path = self.dir.path().join(format!("n{i}.log"));
        let log = std::fs::File::create(&log_path).expect("nats log file");
        let node = &mut self.nodes[i];
        let child = Command::new(binary())
            .arg("-c")
            .arg(&node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn nats-server (apt-get install nats-server)");
        node.child = Some(child);
        let until = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", node.client_port)).is_err() {
            assert!(
                Instant::now() < until,
                "nats-server n{i} did not listen; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs node `i` (its store stays).
    pub fn stop_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `[journal]` sections of a spillway using the NATS servers `servers` (a TOML
/// list) with `replicas`, its local directory `dir`.
pub fn journal_toml(servers: &str, replicas: usize, dir: &std::path::Path) -> String {
    format!(
        "[journal]\nbackend = \"nats\"\ndir = \"{}\"\n[journal.nats]\nservers = {servers}\n\
         replicas = {replicas}\nstream = \"spillway\"\n",
        dir.display(),
    )
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i);
        }
    }
}
