//! The Terraform module checked by Terraform itself: `fmt` and `validate`
//! for the module and every example, then the example applied and
//! destroyed against moto's AWS APIs (EC2, Auto Scaling, IAM, S3, STS,
//! CloudWatch Logs), with assertions on the state it leaves.
//!
//! Terraform and the AWS provider come from the machine (Terraform on PATH,
//! the provider in a local plugin mirror, `PORTCULLIS_TF_PLUGIN_DIR` or
//! found under /opt, /usr and /root); the apply runs in a network namespace
//! that has only a loopback, with moto on it, so nothing can reach AWS.
//! Where the tools are missing the tests say so and skip, except under
//! CI=true, where they fail.
#![forbid(unsafe_code)]

mod support;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use support::netns::{Netns, require_root};
use support::s3::Moto;
use support::{repo, under_ci, venv, written_file};

/// Terraform and the provider mirror, or why not (a skip, or a failure
/// under CI).
struct Tools {
    terraform: PathBuf,
    plugins: PathBuf,
}

fn tools() -> Option<Tools> {
    let found = find_terraform()
        .and_then(|terraform| find_plugins().map(|plugins| Tools { terraform, plugins }));
    if found.is_none() {
        let why = "terraform on PATH and the AWS provider in a plugin mirror \
                   (PORTCULLIS_TF_PLUGIN_DIR) are needed";
        assert!(!under_ci(), "{why}, and CI=true: refusing to skip");
        eprintln!("skipping: {why}");
    }
    found
}

fn find_terraform() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("terraform"))
        .find(|p| p.is_file())
}

/// The folder above `registry.terraform.io` that holds
/// `hashicorp/aws/VERSION/linux_amd64/terraform-provider-aws_*`.
fn find_plugins() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PORTCULLIS_TF_PLUGIN_DIR") {
        return Some(PathBuf::from(dir));
    }
    for root in ["/opt", "/usr/local", "/usr/share", "/root"] {
        let out = Command::new("find")
            .args([
                root,
                "-maxdepth",
                "8",
                "-name",
                "terraform-provider-aws_*",
                "-path",
                "*registry.terraform.io*",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some(binary) = text.lines().next() {
            let at = binary.find("/registry.terraform.io/")?;
            return Some(PathBuf::from(&binary[..at]));
        }
    }
    None
}

/// A copy of the module, its example and what they read (the AMI's
/// cloud-init template, the example allowlist), removed when dropped:
/// Terraform writes its working files next to the configuration.
struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    fn new(tag: &str) -> Workspace {
        let dir = std::env::temp_dir().join(format!("portcullis-tf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for part in ["terraform", "ami", "examples"] {
            let status = Command::new("cp")
                .arg("-r")
                .arg(repo(part))
                .arg(&dir)
                .status()
                .unwrap();
            assert!(status.success(), "copy {part}");
        }
        // No ~/.terraformrc: an empty CLI configuration, so nothing warns.
        std::fs::write(dir.join("terraformrc"), "").unwrap();
        Workspace { dir }
    }

    fn path(&self, part: &str) -> PathBuf {
        self.dir.join(part)
    }

    /// `terraform ARGS` in `part`, optionally inside a namespace.
    fn terraform(&self, tools: &Tools, ns: Option<&Netns>, part: &str, args: &[&str]) -> Output {
        let mut command = match ns {
            Some(ns) => ns.command(tools.terraform.to_str().unwrap()),
            None => Command::new(&tools.terraform),
        };
        command
            .args(args)
            .current_dir(self.path(part))
            .env("TF_CLI_CONFIG_FILE", self.dir.join("terraformrc"))
            .env("CHECKPOINT_DISABLE", "1")
            .env("TF_IN_AUTOMATION", "1")
            .env(
                "TF_DATA_DIR",
                self.dir
                    .join(format!(".terraform-{}", part.replace('/', "-"))),
            );
        for (key, value) in AWS_ENV {
            command.env(key, value);
        }
        command.output().expect("run terraform")
    }

    fn init(&self, tools: &Tools, ns: Option<&Netns>, part: &str) {
        let plugins = format!("-plugin-dir={}", tools.plugins.display());
        let out = self.terraform(
            tools,
            ns,
            part,
            &[
                "init",
                "-backend=false",
                "-input=false",
                "-no-color",
                &plugins,
            ],
        );
        assert_ok(&format!("terraform init in {part}"), &out);
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Moto's endpoint on the namespace's loopback, fake credentials, and no
/// instance metadata, for Terraform and the seeding script alike.
const AWS_ENV: [(&str, &str); 6] = [
    ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn module_and_examples_are_formatted_and_valid() {
    let Some(tools) = tools() else { return };
    let ws = Workspace::new("validate");
    let fmt = Command::new(&tools.terraform)
        .args(["fmt", "-check", "-recursive", "-no-color"])
        .current_dir(&ws.dir)
        .output()
        .unwrap();
    assert_ok("terraform fmt -check (run terraform fmt -recursive)", &fmt);
    let mut parts = vec!["terraform".to_string()];
    for example in std::fs::read_dir(repo("terraform/examples")).unwrap() {
        let name = example.unwrap().file_name().into_string().unwrap();
        parts.push(format!("terraform/examples/{name}"));
    }
    for part in &parts {
        ws.init(&tools, None, part);
        let out = ws.terraform(&tools, None, part, &["validate", "-no-color"]);
        assert_ok(&format!("terraform validate in {part}"), &out);
    }
}

/// Every resource of a `terraform show -json` state, modules included.
fn resources(state: &serde_json::Value) -> Vec<serde_json::Value> {
    fn walk(module: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
        for r in module["resources"].as_array().into_iter().flatten() {
            out.push(r.clone());
        }
        for child in module["child_modules"].as_array().into_iter().flatten() {
            walk(child, out);
        }
    }
    let mut out = Vec::new();
    walk(&state["values"]["root_module"], &mut out);
    out
}

fn of_type<'s>(all: &'s [serde_json::Value], kind: &str) -> Vec<&'s serde_json::Value> {
    all.iter()
        .filter(|r| r["type"] == kind && r["mode"] == "managed")
        .collect()
}

/// The launch template's user data, decoded (by coreutils' base64).
fn user_data(template: &serde_json::Value) -> String {
    let encoded = template["values"]["user_data"].as_str().expect("user_data");
    let out = support::checker(Command::new("base64").arg("-d"), encoded.as_bytes())
        .expect("base64 from coreutils");
    assert_ok("base64 -d of the user data", &out);
    String::from_utf8(out.stdout).expect("UTF-8 user data")
}

#[test]
fn example_applies_and_destroys_against_a_real_aws_api() {
    if !require_root() || !support::s3::require_moto() {
        return;
    }
    let Some(tools) = tools() else { return };
    let ws = Workspace::new("apply");
    let ns = Netns::new(format!("pt-tf-{}", std::process::id()));
    let moto = Moto::start_in(&ns, ws.path("moto.log"));
    let example = "terraform/examples/basic";

    let mut seed = ns.command(venv().join("bin/python").to_str().unwrap());
    seed.arg(repo("tests/support/aws_seed.py"))
        .arg(ws.path(&format!("{example}/terraform.tfvars.json")))
        .arg(ws.path("seeded.json"));
    for (key, value) in AWS_ENV {
        seed.env(key, value);
    }
    assert_ok("seeding moto", &seed.output().unwrap());
    let inputs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(ws.path(&format!("{example}/terraform.tfvars.json"))).unwrap(),
    )
    .unwrap();

    ws.init(&tools, Some(&ns), example);
    let apply = ws.terraform(
        &tools,
        Some(&ns),
        example,
        &["apply", "-auto-approve", "-input=false", "-no-color"],
    );
    if !apply.status.success() {
        panic!(
            "terraform apply failed:\n{}\n{}\n--- moto:\n{}",
            String::from_utf8_lossy(&apply.stdout),
            String::from_utf8_lossy(&apply.stderr),
            moto.log()
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let show = ws.terraform(&tools, Some(&ns), example, &["show", "-json", "-no-color"]);
    assert_ok("terraform show", &show);
    let state: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let all = resources(&state);
    check_state(&ws, &all, &inputs);
    let seeded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ws.path("seeded.json")).unwrap()).unwrap();
    check_refusals(&tools, &ws, &ns, &inputs, &seeded);

    let destroy = ws.terraform(
        &tools,
        Some(&ns),
        example,
        &["destroy", "-auto-approve", "-input=false", "-no-color"],
    );
    assert_ok("terraform destroy", &destroy);
    let show = ws.terraform(&tools, Some(&ns), example, &["show", "-json", "-no-color"]);
    let state: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    let left: Vec<_> = resources(&state)
        .into_iter()
        .filter(|r| r["mode"] == "managed")
        .map(|r| r["address"].clone())
        .collect();
    assert!(left.is_empty(), "left after destroy: {left:?}");
}

/// Plans the module, called with `inputs` changed by `change`, from a
/// root module of the test's own (the example does not expose every
/// input); the error text, which the plan must end with.
fn refused_plan(
    tools: &Tools,
    ws: &Workspace,
    ns: &Netns,
    inputs: &serde_json::Value,
    change: impl FnOnce(&mut serde_json::Value),
) -> String {
    let mut vars = inputs.clone();
    change(&mut vars);
    // JSON values are HCL expressions too (objects take `:`).
    let args: String = vars
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| format!("  {k} = {v}\n"))
        .collect();
    let root = format!(
        "terraform {{\n  required_providers {{\n    aws = {{ source = \"hashicorp/aws\" }}\n  }}\n}}\n\
         provider \"aws\" {{\n  region = \"us-east-1\"\n}}\n\
         module \"portcullis\" {{\n  source = \"../terraform\"\n{args}}}\n"
    );
    let dir = ws.path(REFUSALS);
    let first = !dir.exists();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("main.tf"), root).unwrap();
    if first {
        ws.init(tools, Some(ns), REFUSALS);
    }
    let out = ws.terraform(
        tools,
        Some(ns),
        REFUSALS,
        &["plan", "-input=false", "-no-color", "-lock=false"],
    );
    assert!(
        !out.status.success(),
        "the plan took {vars}:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Terraform wraps its messages; compare them unwrapped.
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(|l| l.trim_start_matches(['│', ' ']).trim_end())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where [`refused_plan`]'s root module lives, in the workspace.
const REFUSALS: &str = "refusals";

/// An edit of the example's inputs.
type Change = Box<dyn FnOnce(&mut serde_json::Value)>;

/// The module's input checks refuse, at plan, what would break egress.
fn check_refusals(
    tools: &Tools,
    ws: &Workspace,
    ns: &Netns,
    inputs: &serde_json::Value,
    seeded: &serde_json::Value,
) {
    let a_table = inputs["private_route_table_ids"]["us-east-1a"][0].clone();
    let cases: Vec<(&str, Change)> = vec![
        (
            "must name the same AZs",
            Box::new(|v| {
                if let Some(t) = v["private_route_table_ids"].as_object_mut() {
                    t.remove("us-east-1b");
                }
            }),
        ),
        (
            "listed for two AZs",
            Box::new({
                let a_table = a_table.clone();
                move |v| v["private_route_table_ids"]["us-east-1b"] = serde_json::json!([a_table])
            }),
        ),
        (
            "the route table of the gateways' own public subnets",
            Box::new({
                let main = seeded["main_route_table"].clone();
                move |v| v["private_route_table_ids"]["us-east-1b"] = serde_json::json!([main])
            }),
        ),
        (
            "route_ipv6 needs an IPv6 CIDR on every public subnet",
            Box::new(|v| v["route_ipv6"] = true.into()),
        ),
        (
            "max_instance_lifetime must be 0",
            Box::new(|v| v["max_instance_lifetime"] = 3600.into()),
        ),
    ];
    for (why, change) in cases {
        let text = refused_plan(tools, ws, ns, inputs, change);
        assert!(text.contains(why), "expected {why:?}:\n{text}");
    }
    // An IPv6 default route around the gateways, with route_ipv6 off.
    let route = |action: &str| {
        let script = format!(
            "import boto3; boto3.client('ec2').{action}_route(RouteTableId='{}', DestinationIpv6CidrBlock='::/0'{})",
            a_table.as_str().unwrap(),
            if action == "create" {
                format!(
                    ", EgressOnlyInternetGatewayId='{}'",
                    seeded["egress_only_gateway"].as_str().unwrap()
                )
            } else {
                String::new()
            }
        );
        let mut python = ns.command(venv().join("bin/python").to_str().unwrap());
        python.args(["-c", &script]);
        for (key, value) in AWS_ENV {
            python.env(key, value);
        }
        assert_ok(
            &format!("{action} the IPv6 route"),
            &python.output().unwrap(),
        );
    };
    route("create");
    let text = refused_plan(tools, ws, ns, inputs, |_| {});
    assert!(
        text.contains("send IPv6 (::/0) around the gateways"),
        "{text}"
    );
    route("delete");
}

/// What the applied example must have created.
fn check_state(ws: &Workspace, all: &[serde_json::Value], inputs: &serde_json::Value) {
    let azs: Vec<String> = inputs["public_subnet_ids"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();

    // The audit trail's group, kept as long as the module's default says.
    let groups = of_type(all, "aws_cloudwatch_log_group");
    assert_eq!(groups.len(), 1, "one audit group");
    let audit_group = groups[0]["values"]["name"].as_str().unwrap().to_string();
    assert_eq!(audit_group, "/portcullis/portcullis/audit");
    assert_eq!(groups[0]["values"]["retention_in_days"], 400);
    let policies: Vec<String> = of_type(all, "aws_iam_role_policy")
        .iter()
        .map(|p| p["values"]["policy"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(policies.len(), 2 * azs.len(), "two policies per AZ's role");
    let shipping = policies
        .iter()
        .find(|p| p.contains("logs:PutLogEvents"))
        .expect("the shipper may put events");
    assert!(
        shipping.contains(&format!("log-group:{audit_group}:log-stream:*")),
        "{shipping}"
    );
    for az in &azs {
        let own: Vec<serde_json::Value> = policies
            .iter()
            .filter(|p| p.contains(&format!("autoScalingGroupName/portcullis-{az}-*")))
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        assert_eq!(own.len(), 1, "{az}'s role reaches its own group");
        // Instance and interface changes only on the AZ's own gateways.
        for sid in [
            "DisableSourceDestCheckOnTheAzsGateways",
            "OnTheAzsGatewayInterfaces",
        ] {
            let statement = own[0]["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["Sid"] == sid)
                .unwrap_or_else(|| panic!("{az}: no {sid}"));
            assert_eq!(
                statement["Condition"]["StringEquals"]["aws:ResourceTag/portcullis:az"],
                az.as_str(),
                "{az}: {statement}"
            );
        }
    }
    assert_eq!(
        policies
            .iter()
            .filter(|p| p.contains("ec2:ModifyInstanceAttribute"))
            .count(),
        azs.len(),
        "ModifyInstanceAttribute is in the AZs' own policies only"
    );
    for kind in ["instance", "network-interface"] {
        let mut tagged: Vec<String> = of_type(all, "aws_launch_template")
            .iter()
            .map(|t| {
                let specs = t["values"]["tag_specifications"].as_array().unwrap();
                let spec = specs
                    .iter()
                    .find(|s| s["resource_type"] == kind)
                    .unwrap_or_else(|| panic!("no {kind} tags"));
                spec["tags"]["portcullis:az"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        tagged.sort();
        assert_eq!(tagged, azs, "each AZ's {kind}s carry its key");
    }

    // Two Elastic IPs per AZ: the gateway's and a rollout's spare.
    assert_eq!(of_type(all, "aws_eip").len(), 2 * azs.len(), "Elastic IPs");

    // Every CIDR of the VPC, the secondary one included, reaches the
    // gateways on the proxied ports.
    let ingress: Vec<(String, String)> = of_type(all, "aws_vpc_security_group_ingress_rule")
        .iter()
        .map(|r| {
            let v = &r["values"];
            (
                v["cidr_ipv4"].as_str().unwrap_or_default().to_string(),
                format!(
                    "{}:{}",
                    v["ip_protocol"].as_str().unwrap_or_default(),
                    v["from_port"]
                ),
            )
        })
        .collect();
    for cidr in ["198.51.100.0/24", "203.0.113.0/24"] {
        for port in ["tcp:443", "tcp:80"] {
            assert!(
                ingress.contains(&(cidr.to_string(), port.to_string())),
                "no ingress for {cidr} {port}: {ingress:?}"
            );
        }
    }

    let metrics = of_type(all, "aws_vpc_security_group_ingress_rule")
        .into_iter()
        .find(|r| r["values"]["cidr_ipv4"] == "198.51.100.128/26")
        .expect("Prometheus let in");
    assert_eq!(
        (
            &metrics["values"]["from_port"],
            &metrics["values"]["to_port"]
        ),
        (&serde_json::json!(9090), &serde_json::json!(9092)),
        "the proxy's, the HA agent's and the shipper's metrics"
    );

    let groups = of_type(all, "aws_autoscaling_group");
    assert_eq!(groups.len(), azs.len(), "a group per AZ");
    let mut hook_timeouts = Vec::new();
    for group in &groups {
        let v = &group["values"];
        let refresh = &v["instance_refresh"][0];
        assert_eq!(refresh["strategy"], "Rolling");
        let p = &refresh["preferences"][0];
        assert_eq!(p["min_healthy_percentage"], 100, "new instance first");
        assert_eq!(p["max_healthy_percentage"], 200);
        assert_eq!(p["auto_rollback"], true);
        assert_eq!(p["instance_warmup"], "120");
        for hook in v["initial_lifecycle_hook"].as_array().unwrap() {
            if hook["name"] == "portcullis-ready" {
                assert_eq!(hook["default_result"], "ABANDON");
                hook_timeouts.push(hook["heartbeat_timeout"].as_i64().unwrap());
            }
        }
    }
    hook_timeouts.sort();
    assert_eq!(
        hook_timeouts,
        vec![600, 900],
        "the launch wait grows per AZ"
    );

    let templates = of_type(all, "aws_launch_template");
    assert_eq!(templates.len(), azs.len());
    let mut releases = Vec::new();
    for template in &templates {
        let instance_tags = template["values"]["tag_specifications"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["resource_type"] == "instance")
            .expect("instance tags")["tags"]
            .clone();
        releases.push(
            instance_tags["portcullis:release"]
                .as_str()
                .expect("release tag")
                .to_string(),
        );

        let data = user_data(template);
        let ha = portcullis::ha::Config::parse(&written_file(&data, "/etc/portcullis/ha.toml"))
            .expect("the rendered ha.toml is valid");
        assert_eq!(ha.layout.tables.len(), azs.len(), "every AZ's route tables");
        for az in &azs {
            let pool = &ha.eips[&portcullis::ha::fleet::Az(az.clone())];
            assert_eq!(pool.len(), 2, "{az}'s pool");
        }
        let config = ws.path("portcullis.toml");
        std::fs::write(
            &config,
            written_file(&data, "/etc/portcullis/portcullis.toml"),
        )
        .unwrap();
        portcullis::config::Settings::from_file(&config)
            .expect("the rendered portcullis.toml is valid")
            .into_config()
            .expect("a complete config");
        let ship =
            portcullis::ship::Config::parse(&written_file(&data, "/etc/portcullis/ship.toml"))
                .expect("the rendered ship.toml is valid");
        assert_eq!(ship.log_group, audit_group);
        let rules = written_file(&data, "/etc/portcullis/iptables.env");
        assert!(
            rules.contains("PRIVATE_CIDRS=\"198.51.100.0/24 203.0.113.0/24\""),
            "both VPC CIDRs are redirected:\n{rules}"
        );
        assert!(
            rules.contains("tcp:9092@"),
            "the shipper's metrics let in:\n{rules}"
        );
    }
    releases.dedup();
    assert_eq!(releases.len(), 1, "one release in every AZ");
}
