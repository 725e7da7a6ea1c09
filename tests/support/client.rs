//! Real clients (curl) in the client namespace.

use super::netns::Topology;
use std::process::Output;

fn bracketed(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    }
}

/// Runs curl in the client namespace.
pub fn curl(t: &Topology, args: &[&str]) -> Output {
    t.client
        .command("curl")
        .args(["-sS", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .current_dir(&t.dir)
        .output()
        .unwrap()
}

pub fn https(t: &Topology, name: &str, ip: &str) -> Output {
    let resolve = format!("{name}:443:{}", bracketed(ip));
    curl(
        t,
        &[
            "--cacert",
            "ca.pem",
            "--resolve",
            &resolve,
            &format!("https://{name}/"),
        ],
    )
}

pub fn http(t: &Topology, name: &str, ip: &str, path: &str) -> Output {
    let resolve = format!("{name}:80:{}", bracketed(ip));
    curl(
        t,
        &["-i", "--resolve", &resolve, &format!("http://{name}{path}")],
    )
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The HTTP status a plain-HTTP request for `name` gets through the gateway.
pub fn http_status(t: &Topology, name: &str, ip: &str) -> u16 {
    http_status_with(t, &[], name, ip)
}

/// Like [`http_status`], sent from the client's address `src`.
pub fn http_status_from(t: &Topology, src: &str, name: &str, ip: &str) -> u16 {
    http_status_with(t, &["--interface", src], name, ip)
}

fn http_status_with(t: &Topology, extra: &[&str], name: &str, ip: &str) -> u16 {
    let resolve = format!("{name}:80:{}", bracketed(ip));
    let url = format!("http://{name}/");
    let args = [
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--resolve",
        &resolve,
        &url,
    ];
    let out = curl(t, &[extra, &args].concat());
    text(&out.stdout).trim().parse().unwrap_or(0)
}
