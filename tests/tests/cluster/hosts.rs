//! The cluster tests' world: a `nats-server` on a free port, "hosts" (network namespaces
//! joined to this one by veth links, or distinct loopback addresses where namespaces cannot
//! be made), and a relay per host running `cluster-worker`s.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use shmrelay::report::InstanceReport;
use shmrelay_tests::{eventually, workspace_bin, Client, Recv, Relay, Watchdog};

/// Generous bound for anything to happen on a loaded machine.
pub const LONG: Duration = Duration::from_secs(20);

/// Cluster tests start a NATS server and three relays each: one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// `program` on the PATH or in the sbin directories (Debian puts haproxy in /usr/sbin).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file());
    found
}

/// `program`, or None (printing why) when it is missing and `SHMRELAY_REQUIRE_<THING>=1` is
/// not set; with it set, a missing program fails the test.
pub fn required(program: &str, thing: &str) -> Option<PathBuf> {
    let found = find_program(program);
    let var = format!("SHMRELAY_REQUIRE_{thing}");
    if found.is_none() {
        assert!(
            std::env::var(&var).as_deref() != Ok("1"),
            "{program} is missing and {var}=1 (install it: bash tools/cluster/ci-setup.sh)"
        );
        eprintln!("SKIPPED: {program} is not installed (bash tools/cluster/ci-setup.sh); set {var}=1 to fail instead");
    }
    found
}

/// The `cluster-worker` binary (built if missing or stale).
pub fn cluster_worker() -> PathBuf {
    workspace_bin(
        "shmrelay-cluster",
        "cluster-worker",
        &["workers/cluster/src", "workers/cluster/Cargo.toml"],
    )
}

/// A free TCP port on every address of this namespace.
pub fn free_port() -> u16 {
    TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A `nats-server` of this test, listening on every address of this namespace.
pub struct Nats {
    bin: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Nats {
    pub fn start(bin: PathBuf) -> Nats {
        let mut n = Nats {
            bin,
            port: free_port(),
            child: None,
        };
        n.restart();
        n
    }

    /// Starts the server (again, on the same port) and waits until it accepts.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "nats-server already running");
        let child = Command::new(&self.bin)
            .args(["-a", "0.0.0.0", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        assert!(
            eventually(LONG, || TcpStream::connect(addr).is_ok()),
            "nats-server does not accept on {addr}"
        );
    }

    /// SIGKILL: the server is gone at once, as on a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the hosts are.
enum Net {
    /// Namespaces `ns[i]`, each with a veth link whose outer end is in this namespace, on
    /// subnet 10.BASE.(NET + i).0/24.
    Namespaces { ns: Vec<String>, base: u8, net: u8 },
    /// Loopback addresses 127.0.0.2, 127.0.0.3, ...
    Loopback,
}

/// `n` simulated hosts.
pub struct Hosts {
    net: Net,
}

fn ip(args: &[&str]) -> bool {
    Command::new(find_program("ip").unwrap_or_else(|| "ip".into()))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Hosts {
    /// Network namespaces joined by veth links if this process may make them (root), else
    /// loopback addresses.
    pub fn new(n: usize) -> Hosts {
        // Fresh names and subnets per set of hosts: the namespaces of an earlier set may
        // outlive it for a moment (its relays' workers die after their supervisor).
        static SETS: AtomicU32 = AtomicU32::new(0);
        let k = SETS.fetch_add(1, Ordering::Relaxed) % 32;
        let pid = std::process::id();
        // One /24 per host under 10.BASE.0.0/16; BASE apart per test process.
        let base = 64 + (pid % 128) as u8;
        let mut ns = Vec::new();
        for i in 0..n {
            let name = format!("shmr{pid}x{k}h{i}");
            let (outer, inner) = (format!("sv{pid}x{k}h{i}"), format!("sp{pid}x{k}h{i}"));
            let net = k as usize * 8 + i;
            let (o, inn) = (
                format!("10.{base}.{net}.1/24"),
                format!("10.{base}.{net}.2/24"),
            );
            let ok = ip(&["netns", "add", &name])
                && {
                    ns.push(name.clone());
                    ip(&[
                        "link", "add", &outer, "type", "veth", "peer", "name", &inner,
                    ])
                }
                && ip(&["link", "set", &inner, "netns", &name])
                && ip(&["addr", "add", &o, "dev", &outer])
                && ip(&["link", "set", &outer, "up"])
                && ip(&["-n", &name, "addr", "add", &inn, "dev", &inner])
                && ip(&["-n", &name, "link", "set", &inner, "up"])
                && ip(&["-n", &name, "link", "set", "lo", "up"]);
            if !ok {
                eprintln!(
                    "network namespaces unavailable (not root?): hosts on loopback addresses"
                );
                for name in &ns {
                    ip(&["netns", "del", name]);
                }
                let _ = ip(&["link", "del", &outer]);
                return Hosts { net: Net::Loopback };
            }
        }
        Hosts {
            net: Net::Namespaces {
                ns,
                base,
                net: k as u8 * 8,
            },
        }
    }

    /// Whether the hosts are real network namespaces.
    pub fn namespaced(&self) -> bool {
        matches!(self.net, Net::Namespaces { .. })
    }

    /// The address host `i`'s relay listens on.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        match &self.net {
            Net::Namespaces { base, net, .. } => Ipv4Addr::new(10, *base, net + i as u8, 2),
            Net::Loopback => Ipv4Addr::new(127, 0, 0, 2 + i as u8),
        }
    }

    /// The address host `i` reaches this namespace's NATS server on.
    pub fn nats_addr(&self, i: usize) -> Ipv4Addr {
        match &self.net {
            Net::Namespaces { base, net, .. } => Ipv4Addr::new(10, *base, net + i as u8, 1),
            Net::Loopback => Ipv4Addr::LOCALHOST,
        }
    }

    /// The command that runs a program in host `i`.
    pub fn wrapper(&self, i: usize) -> Vec<String> {
        match &self.net {
            Net::Namespaces { ns, .. } => {
                let ip = find_program("ip").expect("ip");
                vec![
                    ip.display().to_string(),
                    "netns".into(),
                    "exec".into(),
                    ns[i].clone(),
                ]
            }
            Net::Loopback => Vec::new(),
        }
    }

    /// Starts node `name` on host `i`: one listener with `workers` cluster workers, in the
    /// cluster of the NATS server on `nats_port`, and waits until every worker serves and is
    /// connected to NATS.
    pub fn relay(&self, i: usize, name: &str, workers: usize, nats_port: u16) -> Relay {
        let worker = cluster_worker();
        let toml = format!(
            "fronts = 1\n\
             [[listener]]\n\
             listen = \"{addr}:0\"\n\
             workers = {workers}\n\
             worker_cmd = [\"{worker}\"]\n\
             [cluster]\n\
             urls = [\"nats://{nats}:{nats_port}\"]\n\
             node = \"{name}\"\n",
            addr = self.addr(i),
            worker = worker.display(),
            nats = self.nats_addr(i),
        );
        let wrapper = self.wrapper(i);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let (relay, _) =
            Relay::start_config_wrapped(&format!("cluster-{name}"), &wrapper, &toml, 1);
        wait_connected(&relay, workers);
        relay
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if let Net::Namespaces { ns, .. } = &self.net {
            // Deleting a namespace destroys its veth end, and with it the outer one.
            for name in ns {
                ip(&["netns", "del", name]);
            }
        }
    }
}

/// The relay's report (its view, as `relayctl` reads it).
pub fn report(relay: &Relay) -> InstanceReport {
    InstanceReport::read(&relay.instance).expect("read the relay's report")
}

/// Waits until `workers` cluster workers of `relay` say they are connected to NATS.
pub fn wait_connected(relay: &Relay, workers: usize) {
    let ok = eventually(LONG, || {
        let r = report(relay);
        r.workers.len() == workers
            && r.workers
                .iter()
                .all(|w| w.cluster.as_ref().is_some_and(|c| c.connected))
    });
    assert!(
        ok,
        "{}: cluster workers not connected: {:?}",
        relay.instance,
        report(relay).workers
    );
}

/// Sends `cmd` and expects the reply to start with `want`; returns the reply.
pub fn ask(c: &mut Client, cmd: &str, want: &str) -> String {
    match c.roundtrip_within(cmd.as_bytes(), LONG) {
        Recv::Frame(p) => {
            let s = String::from_utf8(p).expect("utf-8 reply");
            assert!(
                s.starts_with(want),
                "{cmd:?} answered {s:?}, wanted {want:?}..."
            );
            s
        }
        other => panic!("{cmd:?}: {other:?}"),
    }
}

/// The next frame within `limit`, as text, or None.
pub fn next(c: &mut Client, limit: Duration) -> Option<String> {
    match c.recv_data(limit) {
        Recv::Frame(p) => Some(String::from_utf8(p).expect("utf-8 push")),
        _ => None,
    }
}

/// A client of `relay` subscribed to `topic`.
pub fn subscriber(relay: &Relay, topic: &str) -> Client {
    let mut c = relay.connect();
    ask(&mut c, &format!("sub {topic}"), "ok");
    c
}

/// One test's cluster: a NATS server and a relay per node name, each on its own host, with
/// `workers` cluster workers each, all connected. Taken one at a time (`serial`), under a
/// watchdog. Dropped in field order: relays, hosts, NATS, watchdog, the serial lock.
pub struct Cluster {
    pub relays: Vec<Relay>,
    pub hosts: Hosts,
    pub nats: Nats,
    _dog: Watchdog,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// None (the test skips) when `nats-server` is missing and not required.
    pub fn start(label: &str, nodes: &[&str], workers: usize) -> Option<Cluster> {
        let serial = serial();
        let nats_bin = required("nats-server", "NATS")?;
        cluster_worker(); // a first build is not the test hanging
        let dog = Watchdog::new(label, Duration::from_secs(240));
        let nats = Nats::start(nats_bin);
        let hosts = Hosts::new(nodes.len());
        let relays = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| hosts.relay(i, n, workers, nats.port))
            .collect();
        Some(Cluster {
            relays,
            hosts,
            nats,
            _dog: dog,
            _serial: serial,
        })
    }
}
