//! The deployment files are checked, not just shipped: the systemd units
//! pass `systemd-analyze verify` in a root laid out as the AMI lays it
//! out, the Packer template parses, the cloud-init user data renders to
//! valid cloud-config carrying a config portcullis accepts, and every
//! sysctl names a real kernel setting. Tools come from scripts/setup.sh;
//! under CI=true a missing one fails instead of skipping.
#![forbid(unsafe_code)]

mod support;

use portcullis::config::Settings;
use std::path::Path;
use std::process::{Command, Output};
use support::netns::{Netns, require_root};
use support::{repo, venv_python, written_file};

const UNITS: [&str; 7] = [
    "portcullis.service",
    "portcullis-iptables.service",
    "portcullis-ha.service",
    "portcullis-ship.service",
    "portcullis-gwlb.service",
    "portcullis-health.service",
    "portcullis-health.timer",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Runs a checker with its arguments; see [`support::checker`].
fn run(program: &str, args: &[&str]) -> Option<Output> {
    support::checker(Command::new(program).args(args), b"")
}

fn assert_clean(what: &str, out: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    assert!(out.stderr.is_empty(), "{what} warned:\n{text}");
}

/// Quoted strings of the `sources = [ ... ]` list in the template.
fn packer_sources(template: &str) -> Vec<String> {
    let start = template.find("sources = [\n").expect("a sources list") + 12;
    let end = start + template[start..].find(']').unwrap();
    template[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn packer_template_parses() {
    let path = repo("ami/portcullis.pkr.hcl");
    let Some(out) = run(
        "packer",
        &["validate", "-syntax-only", path.to_str().unwrap()],
    ) else {
        return;
    };
    assert!(out.status.success(), "packer validate: {out:?}");
}

/// Debian's Packer predates the `required_plugins` block, so the plugins
/// file is checked by the HCL2 parser instead.
#[test]
fn packer_plugin_requirement_parses() {
    let script = "import hcl2, json, sys; print(json.dumps(hcl2.load(open(sys.argv[1]))))";
    let path = repo("ami/plugins.pkr.hcl");
    let Some(out) = run(&venv_python(), &["-c", script, path.to_str().unwrap()]) else {
        return;
    };
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let amazon = &parsed["packer"][0]["required_plugins"][0]["amazon"];
    let source = amazon["source"]
        .as_str()
        .unwrap_or_default()
        .trim_matches('"');
    assert_eq!(source, "github.com/hashicorp/amazon", "{parsed}");
}

#[test]
fn the_ami_installs_every_file_its_units_run() {
    let template = read("ami/portcullis.pkr.hcl");
    let sources = packer_sources(&template);
    // The provisioner line that installs into `dir`.
    let installing = |dir: &str| {
        template
            .lines()
            .find(|l| l.contains("install -m") && l.contains(dir))
            .unwrap_or_else(|| panic!("nothing is installed into {dir}"))
            .to_string()
    };
    let units_line = installing("/etc/systemd/system/");
    let scripts_line = installing("/usr/libexec/portcullis/");
    assert!(sources.len() >= 9, "{sources:?}");
    for source in &sources {
        assert!(
            repo(source).is_file(),
            "the template uploads {source}, which is missing"
        );
    }
    let basename = |p: &str| p.rsplit('/').next().unwrap().to_string();
    let uploaded: Vec<String> = sources.iter().map(|s| basename(s)).collect();
    for unit in UNITS {
        assert!(
            uploaded.contains(&unit.to_string()),
            "{unit} is not installed"
        );
        assert!(units_line.contains(unit), "{unit} not installed");
        for line in read(&format!("ami/systemd/{unit}")).lines() {
            let Some(command) = line.strip_prefix("ExecStart=") else {
                continue;
            };
            let program = command.split_whitespace().next().unwrap();
            match program.strip_prefix("/usr/libexec/portcullis/") {
                Some(script) => {
                    assert!(
                        uploaded.contains(&script.to_string()),
                        "{unit} runs {script}, not uploaded"
                    );
                    assert!(
                        scripts_line.contains(&format!(" {script}")),
                        "{script} not installed"
                    );
                }
                None => assert_eq!(program, "/usr/bin/portcullis", "{unit}"),
            }
        }
    }
    // Every unit that should start at boot is enabled.
    for unit in [
        "portcullis-iptables.service",
        "portcullis.service",
        "portcullis-ha.service",
        "portcullis-ship.service",
        "portcullis-gwlb.service",
        "portcullis-health.timer",
        "logrotate.timer",
    ] {
        let enable = template
            .lines()
            .find(|l| l.contains("systemctl enable"))
            .unwrap();
        assert!(enable.contains(unit), "{unit} not enabled");
    }
}

/// A root laid out as the AMI build lays it out (from the template's own
/// file list), with the host's own systemd units so dependencies resolve.
fn image_root() -> tempdir::Dir {
    let root = tempdir::Dir::new("portcullis-root");
    let r = |p: &str| root.path().join(p.trim_start_matches('/'));
    for dir in [
        "usr/bin",
        "bin",
        "usr/libexec/portcullis",
        "etc/systemd/system",
        "usr/lib/systemd",
    ] {
        std::fs::create_dir_all(r(dir)).unwrap();
    }
    std::fs::copy(env!("CARGO_BIN_EXE_portcullis"), r("/usr/bin/portcullis")).unwrap();
    std::fs::copy("/bin/kill", r("/bin/kill")).unwrap();
    // What the Packer template uploads, where its install step puts it.
    for source in packer_sources(&read("ami/portcullis.pkr.hcl")) {
        let name = source.rsplit('/').next().unwrap();
        let dir = match name.rsplit('.').next() {
            Some("sh") => "/usr/libexec/portcullis",
            Some("service" | "timer") => "/etc/systemd/system",
            _ => continue,
        };
        std::fs::copy(repo(&source), r(&format!("{dir}/{name}"))).unwrap();
    }
    let status = Command::new("cp")
        .args(["-a", "/usr/lib/systemd/system"])
        .arg(r("/usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success());
    root
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(std::path::PathBuf);

    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let path = std::env::temp_dir().join(format!(
                "{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn systemd_units_verify_cleanly() {
    let root = image_root();
    let root_arg = format!("--root={}", root.path().display());
    let mut args = vec!["verify", root_arg.as_str()];
    args.extend(UNITS);
    let Some(out) = run("systemd-analyze", &args) else {
        return;
    };
    assert_clean("systemd-analyze verify", &out);
}

#[test]
fn the_service_is_hardened_and_drains_on_stop() {
    let unit = read("ami/systemd/portcullis.service");
    let has = |line: &str| unit.lines().any(|l| l == line);
    for line in [
        "User=portcullis",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=portcullis",
        "Restart=always",
        "KillSignal=SIGTERM",
        "LimitNOFILE=1048576",
        "LogsDirectory=portcullis",
        // journald must never drop a line of ours.
        "LogRateLimitIntervalSec=0",
    ] {
        assert!(has(line), "portcullis.service lacks {line}");
    }
    // The stop timeout leaves room for the default 30 s drain.
    assert!(has("TimeoutStopSec=45s"));
    let filter = read("ami/systemd/portcullis-iptables.service");
    assert!(
        !filter.contains("ExecStop="),
        "stopping the filter must not open FORWARD"
    );
}

/// The audit file's rotation parses, and tells portcullis to reopen the
/// file its config names.
#[test]
fn the_audit_file_rotates_and_portcullis_reopens_it() {
    let config = repo("ami/logrotate/portcullis-audit");
    let Some(out) = run(
        "logrotate",
        &["--debug", "--state", "/dev/null", config.to_str().unwrap()],
    ) else {
        return;
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "logrotate: {text}");
    assert!(!text.contains("error"), "logrotate: {text}");
    let rules = read("ami/logrotate/portcullis-audit");
    let user_data = render_user_data(&USER_DATA_VALUES);
    let toml = written_file(&user_data, "/etc/portcullis/portcullis.toml");
    let file = toml
        .lines()
        .find_map(|l| l.strip_prefix("audit-file = "))
        .expect("the gateway writes an audit file")
        .trim_matches('"');
    assert!(rules.contains(&format!("{file} {{")), "{rules}");
    assert!(rules.contains("--signal=USR1 portcullis.service"));
    let ship = written_file(&user_data, "/etc/portcullis/ship.toml");
    let ship = portcullis::ship::Config::parse(&ship).expect("portcullis ship accepts its config");
    assert_eq!(
        ship.file,
        std::path::Path::new(file),
        "the shipper follows that file"
    );
    assert_eq!(ship.log_group, "/portcullis/portcullis/audit");
    // The timer drop-in is installed where systemd reads it.
    let template = read("ami/portcullis.pkr.hcl");
    assert!(template.contains("/etc/systemd/system/logrotate.timer.d/portcullis.conf"));
    assert!(template.contains("/etc/logrotate.d/portcullis-audit"));
}

/// The user data rendered the way the Terraform module renders it.
fn render_user_data(values: &[(&str, &str)]) -> String {
    let mut text = read("ami/cloud-init/user-data.yaml.tftpl");
    for (name, value) in values {
        let placeholder = format!("${{{name}}}");
        assert!(
            text.contains(&placeholder),
            "the template has no {placeholder}"
        );
        text = text.replace(&placeholder, value);
    }
    let text = text.replace("$${", "${");
    assert!(
        !text
            .lines()
            .any(|l| !l.trim_start().starts_with('#') && l.contains("${")),
        "unrendered placeholders:\n{text}"
    );
    text
}

pub const USER_DATA_VALUES: [(&str, &str); 23] = [
    (
        "allowlist_url",
        "s3://egress-config/portcullis/allowlist.txt",
    ),
    ("refresh", "60s"),
    // As terraform/main.tf renders var.policies.
    (
        "policy_tables",
        "      [policy.build-7]\n      sources = [\"10.20.7.7\"]\n      allowlist = \"s3://egress-config/k/b.txt\"\n      [policy.ci]\n      sources = [\"10.20.128.0/17\",\"2001:db8:20:80::/57\"]\n      allowlist = \"s3://egress-config/portcullis/ci.txt\"",
    ),
    ("max_connections", "50000"),
    // As terraform/main.tf renders var.max_connections_per_source when set.
    ("per_source", "      max-connections-per-source = 8000"),
    ("audit_interval", "10m"),
    ("verify_dst", "pin"),
    ("mode", "monitor"),
    // As terraform/main.tf renders var.monitor_until when set.
    ("monitor_until", "      monitor-until = \"2026-12-31\""),
    ("min_tls", "1.3"),
    ("private_cidrs", "10.20.0.0/16"),
    ("private_cidrs6", "2001:db8:20::/56"),
    ("monitoring_cidrs", "10.30.0.0/24"),
    ("monitoring_cidrs6", ""),
    ("allow_forward", "udp:123"),
    // As terraform/main.tf renders the siblings' and Prometheus's ports.
    (
        "allow_input",
        "tcp:9090@10.20.240.0/24 tcp:9091@10.30.0.0/24",
    ),
    ("fleet", "portcullis"),
    ("internet_check", "s3.us-east-1.amazonaws.com:443"),
    // As terraform/main.tf renders local.ha_route_tables.
    (
        "route_tables",
        "      \"us-east-1a\" = [\"rtb-0a1b2c3d4e5f60718\",\"rtb-0a1b2c3d4e5f60719\"]\n      \"us-east-1b\" = [\"rtb-0a1b2c3d4e5f60720\"]",
    ),
    ("ipv6", "true"),
    // As terraform/main.tf passes aws_cloudwatch_log_group.audit.name.
    ("audit_log_group", "/portcullis/portcullis/audit"),
    ("region", "us-east-1"),
    // As terraform/main.tf renders local.ha_eips.
    (
        "eips",
        "      \"us-east-1a\" = [\"eipalloc-0a1\",\"eipalloc-0a2\"]\n      \"us-east-1b\" = [\"eipalloc-0b1\",\"eipalloc-0b2\"]",
    ),
];

#[test]
fn user_data_is_valid_cloud_config_carrying_a_valid_portcullis_config() {
    let user_data = render_user_data(&USER_DATA_VALUES);
    let dir = tempdir::Dir::new("portcullis-user-data");
    let file = dir.path().join("user-data.yaml");
    std::fs::write(&file, &user_data).unwrap();

    let config = dir.path().join("portcullis.toml");
    std::fs::write(
        &config,
        written_file(&user_data, "/etc/portcullis/portcullis.toml"),
    )
    .unwrap();
    let settings = Settings::from_file(&config).expect("portcullis accepts the rendered config");
    let source = settings.source().unwrap().to_string();
    assert_eq!(source, "s3://egress-config/portcullis/allowlist.txt");
    let config = settings.into_config().expect("a complete config");
    assert_eq!(config.max_connections, 50_000);
    assert_eq!(config.max_connections_per_source, 8_000);
    assert_eq!(
        config.limits.audit_interval,
        Some(std::time::Duration::from_secs(600))
    );
    assert_eq!(config.verify_dst, portcullis::config::VerifyDst::Pin);
    assert_eq!(
        config.mode,
        portcullis::config::Mode::Monitor {
            until: Some(portcullis::config::parse_time("2026-12-31").unwrap())
        }
    );
    assert_eq!(
        config.limits.min_tls,
        "1.3"
            .parse::<portcullis::detect::tls::TlsVersion>()
            .unwrap()
    );
    let policies: Vec<String> = config
        .policies
        .iter()
        .map(|p| format!("{} {}", p.name, p.reload.source))
        .collect();
    assert_eq!(
        policies,
        [
            "default s3://egress-config/portcullis/allowlist.txt",
            "build-7 s3://egress-config/k/b.txt",
            "ci s3://egress-config/portcullis/ci.txt",
        ]
    );

    let filter = written_file(&user_data, "/etc/portcullis/iptables.env");
    assert!(
        filter.contains("PRIVATE_CIDRS=\"10.20.0.0/16\"\n"),
        "{filter}"
    );
    let ha = portcullis::ha::Config::parse(&written_file(&user_data, "/etc/portcullis/ha.toml"))
        .expect("portcullis ha accepts the rendered config");
    assert_eq!(ha.fleet, "portcullis");
    assert!(ha.layout.ipv6);
    let tables: Vec<String> = ha.layout.all_tables().map(|t| t.0.clone()).collect();
    assert_eq!(
        tables,
        [
            "rtb-0a1b2c3d4e5f60718",
            "rtb-0a1b2c3d4e5f60719",
            "rtb-0a1b2c3d4e5f60720"
        ]
    );
    // The hand-off script is one the AMI installs.
    let handoff = ha.handoff_command.first().expect("a hand-off command");
    let script = handoff
        .strip_prefix("/usr/libexec/portcullis/")
        .expect("an installed script");
    let template = read("ami/portcullis.pkr.hcl");
    assert!(template.contains(&format!("\"ami/scripts/{script}\"")));
    assert!(template.contains(&format!(" {script} ")));
    assert_eq!(ha.hooks.launch.as_deref(), Some("portcullis-ready"));
    assert_eq!(ha.hooks.terminate.as_deref(), Some("portcullis-drain"));
    let main = read("terraform/main.tf");
    for hook in ["portcullis-ready", "portcullis-drain"] {
        assert!(
            main.contains(&format!("name                 = \"{hook}\"")),
            "the module has no {hook} hook"
        );
    }
    let pools: Vec<usize> = ha.eips.values().map(Vec::len).collect();
    assert_eq!(pools, [2, 2]);
    assert_eq!(
        ha.drain_command,
        ["systemctl", "stop", "portcullis.service"]
    );

    if let Some(out) = run(
        "cloud-init",
        &["schema", "--config-file", file.to_str().unwrap()],
    ) {
        assert!(
            out.status.success(),
            "cloud-init schema: {out:?}\n{user_data}"
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("Valid cloud-config"));
    }
}

#[test]
fn every_sysctl_names_a_real_kernel_setting() {
    if !require_root() {
        return;
    }
    // Connection tracking's settings appear once it is in use: apply the
    // packet filter in a namespace of our own, then look from inside it.
    let ns = Netns::new(format!("pc{}-sysctl-g", std::process::id()));
    let script = repo("iptables/portcullis-iptables.sh");
    let out = ns
        .command(script.to_str().unwrap())
        .arg("apply")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for line in read("ami/sysctl/90-portcullis.conf").lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once(" = ")
            .unwrap_or_else(|| panic!("KEY = VALUE: {line}"));
        assert!(
            value.split([' ', ',']).all(|v| v.parse::<u64>().is_ok()),
            "{key}: {value}"
        );
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        // Some settings exist per namespace, others only in the host's.
        let in_ns = ns.command("test").args(["-e", &path]).status().unwrap();
        assert!(
            in_ns.success() || Path::new(&path).exists(),
            "{key}: no {path} on this kernel"
        );
    }
}

/// Terraform itself checks the module's references, inputs and template
/// values (tests/terraform.rs); this keeps the render test above complete.
#[test]
fn the_render_test_gives_every_placeholder_of_the_user_data_template() {
    let template = read("ami/cloud-init/user-data.yaml.tftpl");
    let mut placeholders: Vec<&str> = template
        .match_indices("${")
        .filter(|(at, _)| *at == 0 || &template[at - 1..*at] != "$")
        .map(|(at, _)| &template[at + 2..at + 2 + template[at + 2..].find('}').unwrap()])
        .collect();
    placeholders.sort();
    placeholders.dedup();
    let mut rendered: Vec<&str> = USER_DATA_VALUES.iter().map(|(k, _)| *k).collect();
    rendered.sort();
    assert_eq!(placeholders, rendered, "USER_DATA_VALUES vs the template");
}

#[test]
fn checkov_passes_with_only_reasoned_skips() {
    if !require_root() {
        return;
    }
    let dir = repo("terraform");
    for path in ["terraform/main.tf", "terraform/iam.tf"] {
        for line in read(path).lines().filter(|l| l.contains("checkov:skip=")) {
            let reason = line
                .split_once("checkov:skip=")
                .unwrap()
                .1
                .split_once(':')
                .map(|(_, r)| r);
            assert!(
                reason.is_some_and(|r| r.trim().len() >= 20),
                "{path}: a skip needs a reason: {line}"
            );
        }
    }
    let checkov = std::env::var("PORTCULLIS_CHECKOV_VENV")
        .unwrap_or_else(|_| "/opt/portcullis-checkov-venv".into());
    let checkov = format!("{checkov}/bin/checkov");
    if !Path::new(&checkov).exists() {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v != "true"),
            "{checkov} missing and CI=true"
        );
        return eprintln!("skipping: checkov not installed (scripts/setup.sh installs it)");
    }
    // In a namespace with no network: checkov must not phone home.
    let ns = Netns::new(format!("pc{}-checkov-g", std::process::id()));
    let out = ns
        .command(&checkov)
        .args([
            "-d",
            dir.to_str().unwrap(),
            "--framework",
            "terraform",
            "--compact",
            "--quiet",
            "--skip-download",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "checkov failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Failed checks: 0,"), "{text}");
    let passed: u32 = text
        .split("Passed checks: ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse().ok())
        .expect("a summary");
    assert!(passed > 50, "checkov ran its checks: {text}");
}
