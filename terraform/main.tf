# portcullis gateways per availability zone: an auto-scaling group of
# gateways_per_az instances in each, which on boot (cloud-init,
# ami/cloud-init/) start portcullis and its HA agent (portcullis ha). The
# agents keep every AZ's private routes on a serving gateway: a dead one's
# AZ is taken by a sibling within seconds and given back when its own
# gateway is ready again; a rollout launches the new instance first, and
# the old one hands its routes over before it drains.

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

data "aws_vpc" "this" {
  id = var.vpc_id
}

data "aws_subnet" "public" {
  for_each = var.public_subnet_ids
  id       = each.value
}

# The route tables the gateways' own (public) subnets use: an explicit
# association, or else the VPC's main table. Pointing one of these at a
# gateway would loop its own egress through itself.
data "aws_route_tables" "public" {
  for_each = var.public_subnet_ids
  vpc_id   = var.vpc_id
  filter {
    name   = "association.subnet-id"
    values = [each.value]
  }
}

data "aws_route_tables" "main" {
  vpc_id = var.vpc_id
  filter {
    name   = "association.main"
    values = ["true"]
  }
}

# The private route tables as they are before this module touches them:
# an IPv6 default route there that is not the gateways' bypasses them.
data "aws_route_table" "private" {
  for_each       = toset(flatten(values(var.private_route_table_ids)))
  route_table_id = each.value
}

locals {
  # Every CIDR of the VPC, secondary ones (EKS pod ranges) included, unless
  # the operator names the networks.
  vpc_cidrs = distinct(concat([data.aws_vpc.this.cidr_block], [
    for a in data.aws_vpc.this.cidr_block_associations : a.cidr_block if a.state == "associated"
  ]))
  private_cidrs = length(var.private_cidrs) > 0 ? var.private_cidrs : local.vpc_cidrs
  tags          = merge(var.tags, { "portcullis:gateway" = var.name })

  # ALLOW_FORWARD rules as security group rules: the gateway must accept
  # what it forwards.
  forwards = [for rule in var.allow_forward : {
    protocol    = split(":", split("@", rule)[0])[0]
    from_port   = tonumber(split(":", split("@", rule)[0])[1])
    to_port     = tonumber(reverse(split(":", split("@", rule)[0]))[0])
    destination = strcontains(rule, "@") ? split("@", rule)[1] : "0.0.0.0/0"
  }]

  # [policy.NAME] tables for the config file, indented into the user
  # data's YAML block; no blank lines, which would end the block.
  policy_tables = join("\n", flatten([for name, policy in var.policies : [
    "      [policy.${name}]",
    "      sources = ${jsonencode(policy.sources)}",
    "      allowlist = \"s3://${var.allowlist_bucket}/${policy.allowlist_key}\"",
  ]]))

  # [route-tables] of ha.toml: every AZ's, so any gateway can take any AZ.
  ha_route_tables = join("\n", [for az, ids in var.private_route_table_ids : "      \"${az}\" = ${jsonencode(ids)}"])

  # Each AZ's Elastic IP pool: one more than its gateways, so a rollout's
  # new instance holds its own while the old one drains on its.
  eips_per_az = var.gateways_per_az + 1
  eips = var.eip_allocation_ids != null ? var.eip_allocation_ids : {
    for az, _ in var.public_subnet_ids : az => [for i in range(local.eips_per_az) : aws_eip.egress["${az} ${i}"].allocation_id]
  }
  ha_eips = join("\n", [for az, ids in local.eips : "      \"${az}\" = ${jsonencode(ids)}"])

  # Each AZ's instances reach their lifetime a day apart, so the AZs never
  # all roll at once; an apply's rollout goes one AZ at a time through the
  # agents (local.release).
  az_index = { for i, az in sort(keys(var.public_subnet_ids)) : az => i }

  user_data = { for az, subnet in var.public_subnet_ids : az => templatefile(
    "${path.module}/../ami/cloud-init/user-data.yaml.tftpl",
    {
      allowlist_url     = "s3://${var.allowlist_bucket}/${var.allowlist_key}"
      refresh           = var.refresh
      policy_tables     = local.policy_tables
      max_connections   = var.max_connections
      per_source        = var.max_connections_per_source == null ? "" : "      max-connections-per-source = ${var.max_connections_per_source}"
      audit_interval    = var.audit_interval
      verify_dst        = var.verify_dst
      mode              = var.mode
      monitor_until     = var.monitor_until == null ? "" : "      monitor-until = \"${var.monitor_until}\""
      min_tls           = var.min_tls
      private_cidrs     = join(" ", local.private_cidrs)
      private_cidrs6    = join(" ", var.private_cidrs6)
      monitoring_cidrs  = join(" ", var.monitoring_cidrs)
      monitoring_cidrs6 = ""
      allow_forward     = join(" ", var.allow_forward)
      # Siblings probe the admin port; Prometheus also scrapes the HA agent.
      allow_input = join(" ", concat(
        [for s in data.aws_subnet.public : "tcp:9090@${s.cidr_block}"],
        [for c in var.monitoring_cidrs : "tcp:9091@${c}"],
        [for c in var.monitoring_cidrs : "tcp:9092@${c}"],
      ))
      fleet           = var.name
      internet_check  = "s3.${data.aws_region.current.name}.amazonaws.com:443"
      route_tables    = local.ha_route_tables
      eips            = local.ha_eips
      ipv6            = var.route_ipv6 ? "true" : "false"
      audit_log_group = aws_cloudwatch_log_group.audit.name
      region          = data.aws_region.current.name
    }
  ) }

  gateway_route_tables = distinct(flatten([
    for az, found in data.aws_route_tables.public : length(found.ids) > 0 ? found.ids : data.aws_route_tables.main.ids
  ]))
  private_route_tables = flatten(values(var.private_route_table_ids))
  ipv6_bypasses = [
    for id, table in data.aws_route_table.private : id
    if anytrue([for r in table.routes : r.ipv6_cidr_block == "::/0" && r.network_interface_id == ""])
  ]

  # What the gateways are launched to run, the same in every AZ: a new
  # instance whose AZ still runs another release is part of a rollout, and
  # says it is ready only once every AZ before its own (in name order) is
  # served by the new release (src/ha/rollout.rs).
  release = substr(sha256(jsonencode([var.ami_id, var.instance_types, [for az in sort(keys(local.user_data)) : local.user_data[az]]])), 0, 16)
}

resource "aws_s3_object" "allowlist" {
  count  = var.allowlist_file == null ? 0 : 1
  bucket = var.allowlist_bucket
  key    = var.allowlist_key
  source = var.allowlist_file
  # Not etag: with SSE-KMS the object's ETag is not its MD5, and every plan
  # would show a change.
  source_hash = filemd5(var.allowlist_file)
  tags        = local.tags
}

# The audit trail, shipped by each gateway's portcullis-ship.service (a
# stream per instance): it outlives the instances, whose disks go with them.
resource "aws_cloudwatch_log_group" "audit" {
  # checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs always; a customer-managed key is optional (audit_log_kms_key_arn), for teams whose policy requires one.
  name              = coalesce(var.audit_log_group_name, "/portcullis/${var.name}/audit")
  retention_in_days = var.audit_log_retention_days
  kms_key_id        = var.audit_log_kms_key_arn
  tags              = local.tags
}

resource "aws_eip" "egress" {
  # checkov:skip=CKV2_AWS_19:The gateways' HA agents associate these at boot, one each; each AZ keeps one spare for a rollout's new instance.
  for_each = var.eip_allocation_ids != null ? {} : {
    for pair in setproduct(keys(var.public_subnet_ids), range(local.eips_per_az)) : "${pair[0]} ${pair[1]}" => pair[0]
  }
  domain = "vpc"
  tags   = merge(local.tags, { Name = "${var.name}-${each.key}", "portcullis:az" = each.value })
}

resource "aws_security_group" "gateway" {
  name_prefix = "${var.name}-"
  description = "portcullis egress gateways"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = var.name })

  lifecycle {
    create_before_destroy = true
  }
}

# Web traffic from the private networks, whatever its destination address:
# iptables redirects it to portcullis. udp/443 is let in so that the
# gateway can refuse QUIC with an ICMP error rather than a silent timeout.
resource "aws_vpc_security_group_ingress_rule" "web" {
  for_each = { for pair in setproduct(concat(local.private_cidrs, var.private_cidrs6), ["tcp:443", "tcp:80", "udp:443"]) : "${pair[0]} ${pair[1]}" => {
    cidr     = pair[0]
    protocol = split(":", pair[1])[0]
    port     = tonumber(split(":", pair[1])[1])
  } }

  security_group_id = aws_security_group.gateway.id
  description       = "web traffic from ${each.key}"
  cidr_ipv4         = strcontains(each.value.cidr, ":") ? null : each.value.cidr
  cidr_ipv6         = strcontains(each.value.cidr, ":") ? each.value.cidr : null
  ip_protocol       = each.value.protocol
  from_port         = each.value.port
  to_port           = each.value.port
}

resource "aws_vpc_security_group_ingress_rule" "forward" {
  for_each = { for pair in setproduct(local.private_cidrs, range(length(local.forwards))) : "${pair[0]} ${var.allow_forward[pair[1]]}" => {
    cidr = pair[0]
    rule = local.forwards[pair[1]]
  } }

  security_group_id = aws_security_group.gateway.id
  description       = "forwarded around the proxy: ${each.key}"
  cidr_ipv4         = each.value.cidr
  ip_protocol       = each.value.rule.protocol
  from_port         = each.value.rule.from_port
  to_port           = each.value.rule.to_port
}

# Siblings probe each other's readiness on the admin port.
resource "aws_vpc_security_group_ingress_rule" "siblings" {
  security_group_id            = aws_security_group.gateway.id
  description                  = "readiness probes between the gateways"
  referenced_security_group_id = aws_security_group.gateway.id
  ip_protocol                  = "tcp"
  from_port                    = 9090
  to_port                      = 9090
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  for_each = toset(var.monitoring_cidrs)

  security_group_id = aws_security_group.gateway.id
  description       = "Prometheus scrapes from ${each.value} (portcullis 9090, its HA agent 9091, its audit shipper 9092)"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 9090
  to_port           = 9092
}

# Out: the original destinations of web traffic (any address, ports 443
# and 80), the VPC's DNS resolver, and the forwarded exceptions.
resource "aws_vpc_security_group_egress_rule" "web" {
  for_each = { for pair in setproduct(["0.0.0.0/0", "::/0"], [443, 80]) : "${pair[0]} ${pair[1]}" => pair }

  security_group_id = aws_security_group.gateway.id
  description       = "allowed web destinations (${each.key})"
  cidr_ipv4         = strcontains(each.value[0], ":") ? null : each.value[0]
  cidr_ipv6         = strcontains(each.value[0], ":") ? each.value[0] : null
  ip_protocol       = "tcp"
  from_port         = each.value[1]
  to_port           = each.value[1]
}

resource "aws_vpc_security_group_egress_rule" "dns" {
  for_each = toset(["udp", "tcp"])

  security_group_id = aws_security_group.gateway.id
  description       = "DNS to the VPC resolver (${each.value})"
  cidr_ipv4         = data.aws_vpc.this.cidr_block
  ip_protocol       = each.value
  from_port         = 53
  to_port           = 53
}

resource "aws_vpc_security_group_egress_rule" "forward" {
  for_each = { for i, rule in local.forwards : var.allow_forward[i] => rule }

  security_group_id = aws_security_group.gateway.id
  description       = "forwarded around the proxy: ${each.key}"
  cidr_ipv4         = strcontains(each.value.destination, ":") ? null : each.value.destination
  cidr_ipv6         = strcontains(each.value.destination, ":") ? each.value.destination : null
  ip_protocol       = each.value.protocol
  from_port         = each.value.from_port
  to_port           = each.value.to_port
}

resource "aws_launch_template" "gateway" {
  # checkov:skip=CKV_AWS_88:A gateway replacing a NAT gateway needs a public address to reach the internet from its public subnet.
  for_each = var.public_subnet_ids

  name_prefix   = "${var.name}-${each.key}-"
  description   = "portcullis gateway for ${each.key}"
  image_id      = var.ami_id
  instance_type = var.instance_types[0]
  user_data     = base64encode(local.user_data[each.key])
  ebs_optimized = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.gateway[each.key].arn
  }

  lifecycle {
    precondition {
      condition     = var.monitor_until == null || var.mode == "monitor"
      error_message = "monitor_until needs mode = \"monitor\"."
    }
    precondition {
      condition     = var.eip_allocation_ids == null || try(alltrue([for az, _ in var.public_subnet_ids : length(var.eip_allocation_ids[az]) >= var.gateways_per_az + 1]), false)
      error_message = "eip_allocation_ids needs, for every AZ of public_subnet_ids, at least gateways_per_az + 1 addresses (a rollout's new gateway needs its own)."
    }
    precondition {
      condition     = var.max_connections_per_source == null || try(var.max_connections_per_source <= var.max_connections, false)
      error_message = "max_connections_per_source must be at most max_connections."
    }
    precondition {
      condition     = toset(keys(var.public_subnet_ids)) == toset(keys(var.private_route_table_ids))
      error_message = "public_subnet_ids and private_route_table_ids must name the same AZs (public: ${join(", ", sort(keys(var.public_subnet_ids)))}; private: ${join(", ", sort(keys(var.private_route_table_ids)))})."
    }
    precondition {
      condition     = length(local.private_route_tables) == length(distinct(local.private_route_tables))
      error_message = "A route table is listed for two AZs in private_route_table_ids: each AZ's gateways would take it from the other's."
    }
    precondition {
      condition     = length(setintersection(local.private_route_tables, local.gateway_route_tables)) == 0
      error_message = "private_route_table_ids lists ${join(", ", setintersection(local.private_route_tables, local.gateway_route_tables))}, the route table of the gateways' own public subnets: its default route must stay on the internet gateway."
    }
    precondition {
      condition     = !var.route_ipv6 || alltrue([for s in data.aws_subnet.public : s.ipv6_cidr_block != ""])
      error_message = "route_ipv6 needs an IPv6 CIDR on every public subnet: each gateway takes an IPv6 address there."
    }
    precondition {
      condition     = !var.route_ipv6 || length(var.private_cidrs6) > 0
      error_message = "route_ipv6 needs private_cidrs6: the IPv6 networks whose web traffic the gateways inspect."
    }
    precondition {
      condition     = var.route_ipv6 || length(local.ipv6_bypasses) == 0
      error_message = "Route tables ${join(", ", local.ipv6_bypasses)} send IPv6 (::/0) around the gateways: set route_ipv6 = true with private_cidrs6, or remove those routes."
    }
  }

  network_interfaces {
    associate_public_ip_address = true
    delete_on_termination       = true
    security_groups             = [aws_security_group.gateway.id]
    # Its own IPv6 address: the gateway forwards the AZ's IPv6 egress.
    ipv6_address_count = var.route_ipv6 ? 1 : 0
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  block_device_mappings {
    device_name = "/dev/xvda"
    ebs {
      volume_size           = 16
      volume_type           = "gp3"
      encrypted             = true
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = true
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = "${var.name}-${each.key}", "portcullis:az" = each.key, "portcullis:release" = local.release })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = local.tags
  }

  # The fleet's and the AZ's tags on the interface scope AssociateAddress
  # to the AZ's own gateways.
  tag_specifications {
    resource_type = "network-interface"
    tags          = merge(local.tags, { "portcullis:az" = each.key })
  }

  tags = local.tags
}

resource "aws_autoscaling_group" "gateway" {
  for_each = var.public_subnet_ids

  name_prefix         = "${var.name}-${each.key}-"
  vpc_zone_identifier = [each.value]
  min_size            = var.gateways_per_az
  desired_capacity    = var.gateways_per_az
  # Room for a rollout's new instances beside the old.
  max_size = 2 * var.gateways_per_az
  # EC2 status checks replace a dead instance; portcullis-health.timer on
  # the instance reports one whose portcullis stays unready. Until then a
  # sibling's HA agent has long taken the AZ's routes (seconds).
  health_check_type         = "EC2"
  health_check_grace_period = 300
  max_instance_lifetime     = var.max_instance_lifetime == 0 ? 0 : max(86400, var.max_instance_lifetime - 86400 * local.az_index[each.key])
  capacity_rebalance        = false
  # The group's own view in CloudWatch: in service, pending, terminating.
  metrics_granularity = "1Minute"
  enabled_metrics = [
    "GroupDesiredCapacity",
    "GroupInServiceInstances",
    "GroupPendingInstances",
    "GroupTerminatingInstances",
    "GroupTotalInstances",
  ]

  depends_on = [aws_iam_role_policy.gateway, aws_iam_role_policy.own_group]

  # On-demand only, in the order of instance_types: a shortage of the
  # first type in this AZ launches the next rather than nothing.
  mixed_instances_policy {
    instances_distribution {
      on_demand_allocation_strategy            = "prioritized"
      on_demand_base_capacity                  = 0
      on_demand_percentage_above_base_capacity = 100
    }
    launch_template {
      launch_template_specification {
        launch_template_id = aws_launch_template.gateway[each.key].id
        version            = aws_launch_template.gateway[each.key].latest_version
      }
      dynamic "override" {
        for_each = var.instance_types
        content {
          instance_type = override.value
        }
      }
    }
  }

  # A new instance is in service only once its HA agent says it is ready
  # (portcullis serving, an egress address held); one that never is is
  # abandoned, so a rollout of a broken AMI or config stops and rolls back.
  # In a rollout each AZ's new instance also waits for the AZs before its
  # own to roll (about 4 minutes each: boot, warm-up, hand-over, soak), so
  # later AZs wait longer; a release that never gets ready in the first AZ
  # is abandoned in every AZ.
  initial_lifecycle_hook {
    name                 = "portcullis-ready"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_LAUNCHING"
    heartbeat_timeout    = min(7200, 600 + 300 * local.az_index[each.key])
    default_result       = "ABANDON"
  }

  # The old instance's HA agent sees its target lifecycle state go to
  # Terminated, hands its routes over, drains portcullis and ends this
  # wait; the timeout bounds it.
  initial_lifecycle_hook {
    name                 = "portcullis-drain"
    lifecycle_transition = "autoscaling:EC2_INSTANCE_TERMINATING"
    heartbeat_timeout    = 180
    default_result       = "CONTINUE"
  }

  # A new launch template version (new AMI, new settings) launches the new
  # instance first (max 200%), keeps the old one serving until the new one
  # has been healthy for the warm-up, and rolls back if it never is.
  instance_refresh {
    strategy = "Rolling"
    preferences {
      min_healthy_percentage = 100
      max_healthy_percentage = 200
      instance_warmup        = 120
      auto_rollback          = true
      skip_matching          = true
    }
  }

  dynamic "tag" {
    for_each = merge(local.tags, { Name = "${var.name}-${each.key}" })
    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }
}
