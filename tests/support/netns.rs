//! A client / gateway / upstream topology in network namespaces of our
//! own, torn down when dropped (also when a test panics).
//!
//! ```text
//!  client ns            gateway ns (portcullis, iptables)        upstream ns
//!  192.0.2.2     ---  192.0.2.1 | 198.51.100.1  ---  198.51.100.2
//!  2001:db8:1::2 ---  2001:db8:1::1 | 2001:db8:2::1 --- 2001:db8:2::2
//!                                                     servers on 203.0.113.10/.20,
//!                                                     2001:db8:3::10/::20
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const CLIENT_V4: &str = "192.0.2.2";
/// The "internet" hosts the client talks to, served in the upstream ns.
pub const RAW_V4: &str = "203.0.113.10";
pub const RAW_V6: &str = "2001:db8:3::10";
pub const WEB_V4: &str = "203.0.113.20";
pub const WEB_V6: &str = "2001:db8:3::20";
pub const ADMIN: &str = "127.0.0.1:9090";
/// Where tests run their DNS server for the gateway: the upstream host.
pub const NAMESERVER: &str = "198.51.100.2";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Fails the test when not root under CI; elsewhere says why it skips.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!("namespaced tests need root, and CI=true: refusing to skip");
    }
    eprintln!("skipping: namespaced tests need root");
    false
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One network namespace.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Netns {
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// A command inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn exec(&self, args: &[&str]) {
        let mut all = vec!["ip", "netns", "exec", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates stay in the namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("thread in netns")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The three hosts, wired and routed, with portcullis optionally running.
pub struct Topology {
    pub client: Netns,
    pub gateway: Netns,
    pub upstream: Netns,
    pub dir: PathBuf,
    portcullis: Option<Child>,
}

impl Topology {
    pub fn new() -> Topology {
        Topology::with_rules(&[])
    }

    /// Like [`Self::new`], with more settings for the iptables script
    /// (e.g. `ALLOW_FORWARD`).
    pub fn with_rules(settings: &[(&str, &str)]) -> Topology {
        let id = format!(
            "pc{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("portcullis-test-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let t = Topology {
            client: Netns::new(format!("{id}-c")),
            gateway: Netns::new(format!("{id}-g")),
            upstream: Netns::new(format!("{id}-u")),
            dir,
            portcullis: None,
        };
        t.wire(settings);
        t
    }

    fn wire(&self, settings: &[(&str, &str)]) {
        let (c, g, u) = (&self.client, &self.gateway, &self.upstream);
        c.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "cli", "netns", &g.name,
        ]);
        u.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "net", "netns", &g.name,
        ]);
        for (ns, dev, v4, v6) in [
            (c, "eth0", "192.0.2.2/24", "2001:db8:1::2/64"),
            (g, "cli", "192.0.2.1/24", "2001:db8:1::1/64"),
            (g, "net", "198.51.100.1/24", "2001:db8:2::1/64"),
            (u, "eth0", "198.51.100.2/24", "2001:db8:2::2/64"),
        ] {
            ns.ip(&["addr", "add", v4, "dev", dev]);
            ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.ip(&["link", "set", dev, "up"]);
        }
        for addr in ["203.0.113.10/32", "203.0.113.20/32"] {
            u.ip(&["addr", "add", addr, "dev", "lo"]);
        }
        for addr in ["2001:db8:3::10/128", "2001:db8:3::20/128"] {
            u.ip(&["-6", "addr", "add", addr, "dev", "lo", "nodad"]);
        }
        c.ip(&["route", "add", "default", "via", "192.0.2.1"]);
        c.ip(&["-6", "route", "add", "default", "via", "2001:db8:1::1"]);
        u.ip(&["route", "add", "default", "via", "198.51.100.1"]);
        u.ip(&["-6", "route", "add", "default", "via", "2001:db8:2::1"]);
        g.ip(&["route", "add", "203.0.113.0/24", "via", "198.51.100.2"]);
        g.ip(&[
            "-6",
            "route",
            "add",
            "2001:db8:3::/64",
            "via",
            "2001:db8:2::2",
        ]);
        g.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        g.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
        // The shipped rules, as a gateway runs them.
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("iptables/portcullis-iptables.sh");
        let status = g
            .command(script.to_str().unwrap())
            .arg("apply")
            .env("PRIVATE_CIDRS", "192.0.2.0/24")
            .env("PRIVATE_CIDRS6", "2001:db8:1::/64")
            .envs(settings.iter().copied())
            .status()
            .unwrap();
        assert!(status.success(), "iptables script failed");
    }

    /// Starts portcullis in the gateway ns on `allowlist` and waits until
    /// its health endpoint answers.
    pub fn start_portcullis(&mut self, allowlist: &str, extra: &[&str]) {
        self.start_portcullis_under(&[], allowlist, extra);
    }

    /// Like [`Self::start_portcullis`], run through `wrapper` (e.g.
    /// `prlimit --nofile=…`, which execs it, so signals still reach it).
    pub fn start_portcullis_under(&mut self, wrapper: &[&str], allowlist: &str, extra: &[&str]) {
        let list = self.write_list(allowlist);
        let mut args = vec!["--allowlist", list.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.launch(wrapper, &args, &[]);
    }

    /// Writes (or rewrites) the allowlist file portcullis is started on.
    pub fn write_list(&self, text: &str) -> PathBuf {
        let list = self.dir.join("allowlist.txt");
        let tmp = self.dir.join("allowlist.txt.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &list).unwrap();
        list
    }

    /// Like [`Self::start_portcullis`], with the gateway's DNS its own: it
    /// runs in a mount namespace whose `/etc/resolv.conf` names only
    /// `nameserver` (a test's [`DnsServer`](super::dns::DnsServer)) and
    /// whose `/etc/hosts` knows only localhost, so no query leaves the
    /// test's namespaces.
    pub fn start_portcullis_with_dns(&mut self, nameserver: &str, allowlist: &str, extra: &[&str]) {
        let hosts = self.dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n::1 localhost\n").unwrap();
        let resolv = self.dir.join("resolv.conf");
        std::fs::write(
            &resolv,
            format!("nameserver {nameserver}\noptions timeout:1 attempts:1\n"),
        )
        .unwrap();
        let (hosts, resolv) = (hosts.to_str().unwrap(), resolv.to_str().unwrap());
        let own_dns = "mount --bind \"$1\" /etc/hosts && mount --bind \"$2\" /etc/resolv.conf && shift 2 && exec \"$@\"";
        let wrapper = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            own_dns,
            "sh",
            hosts,
            resolv,
        ];
        let list = self.write_list(allowlist);
        let mut args = vec!["--allowlist", list.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.spawn(&wrapper, &args, &[]);
    }

    /// Starts `portcullis run ARGS` in the gateway ns with `env` added and
    /// waits until its health endpoint answers (ready or not).
    ///
    /// Unless ARGS say otherwise, with `--verify-dst off`: these tests name
    /// hosts no DNS server knows and dial them where the test says, to test
    /// the data path. The default, `pin`, is tested against a real DNS
    /// server ([`Self::start_portcullis_with_dns`], tests/pinning.rs).
    pub fn launch(&mut self, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) {
        let mut args = args.to_vec();
        if !args.contains(&"--verify-dst") {
            args.extend(["--verify-dst", "off"]);
        }
        self.spawn(wrapper, &args, env);
    }

    /// Starts `portcullis run ARGS`, nothing added, and waits until its
    /// health endpoint answers.
    fn spawn(&mut self, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) {
        let open = |path: PathBuf| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap()
        };
        let (log, audit) = (open(self.log_path()), open(self.audit_path()));
        let binary = env!("CARGO_BIN_EXE_portcullis");
        let (program, wrapper_args) = match wrapper.split_first() {
            Some((program, rest)) => (*program, [rest, &[binary]].concat()),
            None => (binary, Vec::new()),
        };
        let child = self
            .gateway
            .command(program)
            .args(wrapper_args)
            .args(["run", "--metrics-listen", ADMIN])
            .args(args)
            .envs(env.iter().copied())
            .stdout(audit)
            .stderr(log)
            .spawn()
            .unwrap();
        self.portcullis = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.admin_status("/healthz") == Some(200) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("portcullis did not become healthy:\n{}", self.log());
    }

    /// The status code of an admin endpoint, if it answered.
    pub fn admin_status(&self, path: &str) -> Option<u16> {
        let response = self.admin_get(path)?;
        response.get(9..12)?.parse().ok()
    }

    /// The gateway's resident memory, in KiB.
    pub fn portcullis_rss_kib(&self) -> u64 {
        let pid = self.portcullis.as_ref().expect("portcullis running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// Sends a signal without waiting.
    pub fn signal_portcullis(&self, signal: nix::sys::signal::Signal) {
        let child = self.portcullis.as_ref().expect("portcullis running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    /// How many log lines contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("portcullis.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Where portcullis's stdout, the audit log, goes.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// The audit records written so far, each parsed as JSON (a line that
    /// does not parse fails the test). A last line still being written is
    /// left for the next call.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// The audit records so far whose `field` is `value`.
    pub fn audit_where(&self, field: &str, value: &str) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|r| r[field] == value)
            .collect()
    }

    /// Sends `bytes` from the client ns to `to`, half-closes, and reads
    /// until the gateway closes (or resets): what came back.
    pub fn exchange(&self, to: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        use std::io::{Read, Write};
        let mut s = self.connect(to);
        s.write_all(bytes).unwrap();
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    /// `portcullis discover` on the audit log written so far.
    pub fn discover(&self) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .arg("discover")
            .arg(self.audit_path())
            .output()
            .unwrap()
    }

    /// GET on the admin endpoint from inside the gateway ns.
    pub fn admin_get(&self, path: &str) -> Option<String> {
        let path = path.to_string();
        self.gateway.enter(move || {
            use std::io::{Read, Write};
            let addr: SocketAddr = ADMIN.parse().unwrap();
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n").ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out)
        })
    }

    /// Whether portcullis is still running.
    pub fn portcullis_running(&mut self) -> bool {
        let child = self.portcullis.as_mut().expect("portcullis started");
        child.try_wait().unwrap().is_none()
    }

    /// Sends `signal` to portcullis and waits for it to exit.
    pub fn stop_portcullis(
        &mut self,
        signal: nix::sys::signal::Signal,
        within: Duration,
    ) -> std::process::ExitStatus {
        let mut child = self.portcullis.take().expect("portcullis running");
        // `ip netns exec` execs the program, so the pid is portcullis's own.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "portcullis did not exit after {signal:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects from the client ns (through the gateway).
    pub fn connect(&self, addr: SocketAddr) -> std::net::TcpStream {
        self.client.enter(move || {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
    }

    /// Connects from the client ns, from its address `src`.
    pub fn connect_from(&self, src: std::net::IpAddr, addr: SocketAddr) -> std::net::TcpStream {
        self.client.enter(move || {
            let domain = socket2::Domain::for_address(addr);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None).unwrap();
            socket.bind(&SocketAddr::new(src, 0).into()).expect("bind");
            socket
                .connect_timeout(&addr.into(), Duration::from_secs(5))
                .expect("connect");
            let s: std::net::TcpStream = socket.into();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Some(mut child) = self.portcullis.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- portcullis log ---\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
