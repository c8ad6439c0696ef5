//! A 3-node NATS cluster for the fault matrix: every node a real nats-server with
//! its own JetStream store, killable and restartable on the same addresses.
//!
//! On loopback the nodes differ by port only. Isolated, each node runs in its own
//! network namespace on a bridge, so that one node can be cut off from the others
//! and from every client (its interface goes down: packets are dropped, not
//! refused, as in a real partition) and joined again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use payledger_server_common::local_nats::{find_nats_server, free_port};

pub struct NatsCluster {
    nodes: Vec<Node>,
    net: Option<Bridge>,
}

struct Node {
    name: String,
    host: String,
    port: u16,
    cluster_port: u16,
    monitor_port: u16,
    dir: PathBuf,
    /// The JetStream store: `dir/jetstream`, or where the cluster was told.
    store: PathBuf,
    netns: Option<String>,
    child: Option<Child>,
}

/// Where the cluster's nodes listen.
pub enum Network {
    Loopback,
    /// One network namespace per node (needs root and `ip`).
    Isolated,
}

impl NatsCluster {
    /// Starts `nodes` nats-servers under `dir` (`dir/n{i}` each), each listening.
    pub fn start(dir: &Path, nodes: usize, network: Network) -> anyhow::Result<NatsCluster> {
        Self::start_with_stores(dir, nodes, network, |_| None)
    }

    /// [`NatsCluster::start`], where `store_dir(i)`, if it says so, puts node
    /// i's JetStream store elsewhere (on a small tmpfs, say).
    pub fn start_with_stores(
        dir: &Path,
        nodes: usize,
        network: Network,
        store_dir: impl Fn(usize) -> Option<PathBuf>,
    ) -> anyhow::Result<NatsCluster> {
        let net = match network {
            Network::Loopback => None,
            Network::Isolated => Some(Bridge::create(nodes)?),
        };
        let mut members = Vec::new();
        for i in 0..nodes {
            let (host, netns) = match &net {
                None => ("127.0.0.1".to_string(), None),
                Some(bridge) => (bridge.node_ip(i), Some(bridge.netns(i))),
            };
            // In its own namespace a node has the whole port range to itself.
            let port = |fixed: u16| -> anyhow::Result<u16> {
                if netns.is_some() {
                    Ok(fixed)
                } else {
                    free_port()
                }
            };
            members.push(Node {
                name: format!("n{i}"),
                host,
                port: port(4222)?,
                cluster_port: port(6222)?,
                monitor_port: port(8222)?,
                dir: dir.join(format!("n{i}")),
                store: store_dir(i).unwrap_or_else(|| dir.join(format!("n{i}")).join("jetstream")),
                netns,
                child: None,
            });
        }
        let mut cluster = NatsCluster {
            nodes: members,
            net,
        };
        for i in 0..nodes {
            cluster.start_node(i)?;
        }
        Ok(cluster)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every node's client URL, comma-separated: what `--nats-url` takes.
    pub fn urls(&self) -> String {
        (0..self.nodes.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, node: usize) -> String {
        let n = &self.nodes[node];
        format!("nats://{}:{}", n.host, n.port)
    }

    pub fn name(&self, node: usize) -> &str {
        &self.nodes[node].name
    }

    /// The node's JetStream store directory.
    pub fn store_dir(&self, node: usize) -> PathBuf {
        self.nodes[node].store.clone()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// Starts node `i` (again) on its addresses and store.
    pub fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let routes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, n)| format!("nats://{}:{}", n.host, n.cluster_port))
            .collect();
        let node = &mut self.nodes[i];
        std::fs::create_dir_all(&node.dir)?;
        let config = node.dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "server_name: {name}\n\
                 listen: {host}:{port}\n\
                 http: {host}:{monitor}\n\
                 max_payload: 8MB\n\
                 jetstream {{\n  store_dir: {store:?}\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: payledger\n  listen: {host}:{cluster}\n  routes: [{routes}]\n}}\n",
                name = node.name,
                host = node.host,
                port = node.port,
                monitor = node.monitor_port,
                cluster = node.cluster_port,
                store = node.store.display().to_string(),
                routes = routes.join(", "),
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("nats-server.log"))?;
        let binary = find_nats_server()?;
        let mut command = match &node.netns {
            // `ip netns exec` execs the server: the child's pid is the server's.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let child = command
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", binary.display()))?;
        node.child = Some(child);
        self.wait_listening(i)
    }

    fn wait_listening(&mut self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let node = &mut self.nodes[i];
        loop {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                anyhow::bail!(
                    "nats-server {} exited with {status}:\n{}",
                    node.name,
                    std::fs::read_to_string(node.dir.join("nats-server.log")).unwrap_or_default()
                );
            }
            if std::net::TcpStream::connect((node.host.as_str(), node.port)).is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nats-server {} did not listen within 20 s",
                node.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: the node's process ends at once, as in a crash or OOM kill.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a node's orderly shutdown, as in a rolling restart.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status()?;
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    anyhow::bail!("nats-server n{i} did not stop within 30 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Cuts node `i` off from the other nodes and from every client.
    pub fn partition(&self, i: usize) -> anyhow::Result<()> {
        self.set_link(i, "down")
    }

    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        self.set_link(i, "up")
    }

    fn set_link(&self, i: usize, state: &str) -> anyhow::Result<()> {
        let ns = self.nodes[i]
            .netns
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("a partition needs the cluster started isolated"))?;
        ip(&["-n", ns, "link", "set", "eth0", state])
    }

    /// GET `path` from node `i`'s monitoring port (connz, jsz, healthz).
    pub fn monitor(&self, i: usize, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let node = &self.nodes[i];
        let mut stream = std::net::TcpStream::connect_timeout(
            &format!("{}:{}", node.host, node.monitor_port).parse()?,
            Duration::from_secs(2),
        )?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", node.host)?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .unwrap_or_default())
    }

    /// Whether node `i` answers its health endpoint as a current JetStream
    /// member (`/healthz`: meta leader known, its streams caught up).
    pub fn is_healthy(&self, i: usize) -> bool {
        self.monitor(i, "/healthz")
            .is_ok_and(|body| body.contains("\"ok\""))
    }

    /// Waits until every running node reports healthy.
    pub async fn wait_healthy(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let unhealthy: Vec<&str> = (0..self.nodes.len())
                .filter(|i| self.is_running(*i) && !self.is_healthy(*i))
                .map(|i| self.name(i))
                .collect();
            if unhealthy.is_empty() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "nodes {unhealthy:?} not healthy within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The node whose client connections include one named `client_name`
    /// (services name their NATS connections after themselves).
    pub fn connected_node(&self, client_name: &str) -> Option<usize> {
        let needle = format!("\"name\": \"{client_name}\"");
        (0..self.nodes.len()).find(|i| {
            self.is_running(*i)
                && self
                    .monitor(*i, "/connz")
                    .is_ok_and(|body| body.contains(&needle))
        })
    }

    /// The node leading `stream`'s replica group, as the cluster reports it.
    pub async fn stream_leader(&self, stream: &str) -> anyhow::Result<usize> {
        let client = crate::connect_nats(&self.urls()).await?;
        let js = async_nats::jetstream::new(client);
        let info = js.get_stream(stream).await?.info().await?.clone();
        let leader = info
            .cluster
            .and_then(|c| c.leader)
            .ok_or_else(|| anyhow::anyhow!("stream {stream} has no leader"))?;
        self.index_of(&leader)
            .ok_or_else(|| anyhow::anyhow!("leader {leader} is not a node of this cluster"))
    }

    /// Whether JetStream runs on node `i`, as its `/jsz` says (None: no answer).
    pub fn jetstream_enabled(&self, i: usize) -> Option<bool> {
        let body = self.monitor(i, "/jsz").ok()?;
        let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(!jsz["disabled"].as_bool().unwrap_or(false) && jsz.get("config").is_some())
    }

    /// Asks `stream`'s leader to step down, preferring `node`, until `node`
    /// leads it (nats-server elects among the replicas; a preference it does
    /// not know is a plain step-down, repeated until the lot falls on `node`).
    pub async fn move_stream_leader(
        &self,
        stream: &str,
        node: usize,
        within: Duration,
    ) -> anyhow::Result<()> {
        let client = crate::connect_nats(&self.urls()).await?;
        let deadline = Instant::now() + within;
        loop {
            let leader = self.stream_leader(stream).await;
            if let Ok(leader) = leader {
                if leader == node {
                    return Ok(());
                }
                let request = serde_json::json!({"placement": {"preferred": self.name(node)}});
                let answer = client
                    .request(
                        format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                        request.to_string().into(),
                    )
                    .await?;
                let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
                if answer.get("error").is_some() {
                    // An older server refuses the preference: step down without one.
                    client
                        .request(
                            format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"),
                            bytes::Bytes::new(),
                        )
                        .await?;
                }
                // Until a new leader is elected, stream info names none (or the old one).
                let elected = Instant::now() + Duration::from_secs(10);
                while Instant::now() < elected {
                    match self.stream_leader(stream).await {
                        Ok(now) if now != leader => break,
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{stream} is not led by {} after stepping its leader down for {within:?} (leader: {:?})",
                self.name(node),
                self.stream_leader(stream)
                    .await
                    .map(|l| self.name(l).to_string())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.nodes[i].dir.join("nats-server.log")).unwrap_or_default()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        // Namespaces and the bridge go after the servers in them.
        self.net.take();
    }
}

/// A bridge in the host's namespace with one namespace per node behind a veth.
struct Bridge {
    tag: String,
    subnet: u8,
    nodes: usize,
}

impl Bridge {
    fn create(nodes: usize) -> anyhow::Result<Bridge> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names hold 15 bytes; the subnet keeps concurrent runs apart.
        let tag = format!("pl{}{n}", pid % 100_000);
        let subnet = (20 + (pid + n) % 200) as u8;
        let bridge = Bridge {
            tag,
            subnet,
            nodes: 0,
        };
        let mut bridge = bridge;
        ip(&["link", "add", &bridge.name(), "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.{}.0.1/24", bridge.subnet),
            "dev",
            &bridge.name(),
        ])?;
        ip(&["link", "set", &bridge.name(), "up"])?;
        for i in 0..nodes {
            let ns = bridge.netns(i);
            let host_side = format!("{}v{i}", bridge.tag);
            ip(&["netns", "add", &ns])?;
            bridge.nodes = i + 1;
            ip(&[
                "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &host_side, "master", &bridge.name(), "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", bridge.node_ip(i)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(bridge)
    }

    fn name(&self) -> String {
        format!("{}br", self.tag)
    }

    fn netns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    fn node_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.subnet, 11 + i)
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = ip(&["netns", "del", &self.netns(i)]);
        }
        let _ = ip(&["link", "del", &self.name()]);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip").args(args).output().map_err(|e| {
        anyhow::anyhow!("running `ip` (iproute2, needed for network namespaces): {e}")
    })?;
    anyhow::ensure!(
        output.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
