//! A real S3 API (moto_server) on the gateway namespace's loopback, and
//! uploads to it through the AWS SDK from a thread in that namespace.

use super::netns::{Netns, Topology};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub const ENDPOINT: &str = "http://127.0.0.1:5000";
pub const BUCKET: &str = "egress-config";
pub const KEY: &str = "portcullis/allowlist.txt";
pub const URL: &str = "s3://egress-config/portcullis/allowlist.txt";

/// What portcullis needs to use the local S3: fake credentials, the
/// endpoint override, and no instance-metadata lookups.
pub const ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_ENDPOINT_URL", ENDPOINT),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

fn moto_server() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("MOTO_SERVER").map(PathBuf::from),
        Some(PathBuf::from("/opt/portcullis-test-venv/bin/moto_server")),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Fails under CI=true when moto_server is missing; elsewhere skips.
pub fn require_moto() -> bool {
    if moto_server().is_some() {
        return true;
    }
    if std::env::var_os("CI").is_some_and(|v| v == "true") {
        panic!(
            "moto_server not found (scripts/setup.sh installs it) and CI=true: refusing to skip"
        );
    }
    eprintln!("skipping: moto_server not found; run scripts/setup.sh");
    false
}

pub struct Moto {
    ns: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Moto {
    pub fn start(t: &Topology) -> Moto {
        Moto::start_in(&t.gateway, t.dir.join("moto.log"))
    }

    /// In namespace `ns`, on its loopback, logging to `log`.
    pub fn start_in(ns: &Netns, log: PathBuf) -> Moto {
        let mut moto = Moto {
            ns: ns.name.clone(),
            log,
            child: None,
        };
        moto.resume(ns);
        moto
    }

    /// (Re)starts the server. Its state is in memory: a restarted server
    /// has no buckets.
    pub fn resume(&mut self, gateway: &Netns) {
        assert_eq!(gateway.name, self.ns);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = gateway
            .command(moto_server().expect("moto_server").to_str().unwrap())
            .args(["-H", "127.0.0.1", "-p", "5000"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = "127.0.0.1:5000".parse().unwrap();
        while !gateway.enter(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }) {
            assert!(
                Instant::now() < deadline,
                "moto_server did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GETs of the list object answered with this status.
    pub fn gets_with_status(&self, status: u16) -> usize {
        let needle = format!("/{BUCKET}/{KEY}");
        self.log()
            .lines()
            .filter(|l| {
                l.contains("GET ") && l.contains(&needle) && l.contains(&format!("\" {status} "))
            })
            .count()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts portcullis on the S3 list, caching under the test's directory.
pub fn start_portcullis(t: &mut Topology, refresh: &str) {
    let cache = t.dir.join("cache");
    let cache = cache.to_str().unwrap();
    t.launch(
        &[],
        &[
            "--allowlist",
            URL,
            "--refresh",
            refresh,
            "--cache-dir",
            cache,
        ],
        &ENV,
    );
}

/// Creates the bucket if needed and writes the list object.
pub fn put_list(gateway: &Netns, body: &str) {
    let body = body.to_string();
    gateway.enter(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let config = aws_sdk_s3::Config::builder()
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .region(aws_sdk_s3::config::Region::new("us-east-1"))
                .endpoint_url(ENDPOINT)
                .credentials_provider(aws_sdk_s3::config::Credentials::new(
                    "testing", "testing", None, None, "test",
                ))
                .force_path_style(true)
                .http_client(aws_smithy_http_client::Builder::new().build_http())
                .build();
            let client = aws_sdk_s3::Client::from_conf(config);
            let _ = client.create_bucket().bucket(BUCKET).send().await;
            client
                .put_object()
                .bucket(BUCKET)
                .key(KEY)
                .body(body.into_bytes().into())
                .send()
                .await
                .expect("put the list");
        });
    });
}
