# Builds the portcullis AMI for Amazon Linux 2023, arm64 (Graviton: c7gn,
# m7g) and x86_64, from release binaries built beforehand:
#
#   cargo build --release --target aarch64-unknown-linux-gnu
#   cargo build --release --target x86_64-unknown-linux-gnu
#   packer init ami/
#   packer build -var version=0.1.0 ami/
#
# (from the repository root: the file paths below are relative to it).
# The plugin requirement is in plugins.pkr.hcl, apart, because the Packer
# that CI validates this file with (Debian's 1.6) predates that block.
#
# The AMI holds the binary, the packet filter script, the systemd units,
# the sysctl settings and the failover scripts. Everything specific to a
# deployment (allowlist URL, networks, route tables) comes from the
# cloud-init user data written by the Terraform module.

variable "version" {
  type        = string
  description = "portcullis version, used in the AMI name and tags."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "target_dir" {
  type        = string
  default     = "target"
  description = "Cargo's target directory, holding <triple>/release/portcullis for both architectures."
}

variable "kernel_line" {
  type        = string
  default     = "6.1"
  description = "The Amazon Linux 2023 kernel line the image is built on (its AMI names carry it); one line, so a new one is a decision, not a surprise."
}

variable "instance_types" {
  type = map(string)
  default = {
    arm64  = "c7g.large"
    x86_64 = "c7i.large"
  }
  description = "Build instance per architecture."
}

locals {
  rust_target = {
    arm64  = "aarch64-unknown-linux-gnu"
    x86_64 = "x86_64-unknown-linux-gnu"
  }
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
  tags = {
    Application = "portcullis"
    Version     = var.version
  }
}

# What both architectures share; the build block below fills in the rest
# per architecture.
source "amazon-ebs" "al2023" {
  region       = var.region
  ssh_username = "ec2-user"
  encrypt_boot = true
  imds_support = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
}

build {
  source "amazon-ebs.al2023" {
    name          = "arm64"
    instance_type = var.instance_types["arm64"]
    ami_name      = "portcullis-${var.version}-al2023-arm64-${local.timestamp}"
    source_ami_filter {
      filters = {
        name                = "al2023-ami-2023.*-kernel-${var.kernel_line}-arm64"
        architecture        = "arm64"
        virtualization-type = "hvm"
        root-device-type    = "ebs"
      }
      owners      = ["amazon"]
      most_recent = true
    }
    tags = merge(local.tags, { Name = "portcullis ${var.version} arm64", Architecture = "arm64" })
  }

  source "amazon-ebs.al2023" {
    name          = "x86_64"
    instance_type = var.instance_types["x86_64"]
    ami_name      = "portcullis-${var.version}-al2023-x86_64-${local.timestamp}"
    source_ami_filter {
      filters = {
        name                = "al2023-ami-2023.*-kernel-${var.kernel_line}-x86_64"
        architecture        = "x86_64"
        virtualization-type = "hvm"
        root-device-type    = "ebs"
      }
      owners      = ["amazon"]
      most_recent = true
    }
    tags = merge(local.tags, { Name = "portcullis ${var.version} x86_64", Architecture = "x86_64" })
  }

  provisioner "shell" {
    inline = ["mkdir -p /tmp/portcullis"]
  }

  provisioner "file" {
    source      = "${var.target_dir}/${local.rust_target[source.name]}/release/portcullis"
    destination = "/tmp/portcullis/portcullis"
  }

  # Paths are relative to the directory packer runs in: the repository.
  provisioner "file" {
    sources = [
      "iptables/portcullis-iptables.sh",
      "ami/scripts/imds.sh",
      "ami/scripts/health-check.sh",
      "ami/scripts/handoff.sh",
      "ami/sysctl/90-portcullis.conf",
      "ami/systemd/portcullis.service",
      "ami/systemd/portcullis-iptables.service",
      "ami/systemd/portcullis-ha.service",
      "ami/systemd/portcullis-ship.service",
      "ami/systemd/portcullis-gwlb.service",
      "ami/systemd/logrotate.timer.d-portcullis.conf",
      "ami/logrotate/portcullis-audit",
      "ami/systemd/portcullis-health.service",
      "ami/systemd/portcullis-health.timer",
    ]
    destination = "/tmp/portcullis/"
  }

  provisioner "shell" {
    execute_command = "sudo sh -eu -c '{{ .Vars }} {{ .Path }}'"
    inline = [
      # awscli: health-check.sh reports an unready gateway to its group.
      "dnf install -y iptables-nft conntrack-tools publicsuffix-list awscli-2 logrotate ethtool",
      "useradd --system --no-create-home --home-dir /var/lib/portcullis --shell /sbin/nologin portcullis",
      "cd /tmp/portcullis",
      "install -m 0755 portcullis /usr/bin/portcullis",
      "install -d -m 0755 /usr/libexec/portcullis /etc/portcullis",
      "install -m 0755 portcullis-iptables.sh imds.sh health-check.sh handoff.sh /usr/libexec/portcullis/",
      "install -m 0644 90-portcullis.conf /etc/sysctl.d/90-portcullis.conf",
      "install -m 0644 portcullis.service portcullis-iptables.service portcullis-ha.service portcullis-ship.service portcullis-gwlb.service portcullis-health.service portcullis-health.timer /etc/systemd/system/",
      "install -m 0644 portcullis-audit /etc/logrotate.d/portcullis-audit",
      "install -d -m 0755 /etc/systemd/system/logrotate.timer.d",
      "install -m 0644 logrotate.timer.d-portcullis.conf /etc/systemd/system/logrotate.timer.d/portcullis.conf",
      "echo nf_conntrack > /etc/modules-load.d/portcullis.conf",
      "systemctl daemon-reload",
      "systemctl enable portcullis-iptables.service portcullis.service portcullis-ha.service portcullis-ship.service portcullis-gwlb.service portcullis-health.timer logrotate.timer",
      "/usr/bin/portcullis --version",
      "rm -rf /tmp/portcullis",
    ]
  }
}
