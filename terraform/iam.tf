# The gateways' instance roles, one per AZ: the least each needs to run and
# fail over. Per AZ so that a gateway can report health and end lifecycle
# waits in its own AZ's group only.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "gateway" {
  for_each           = var.public_subnet_ids
  name_prefix        = "${var.name}-${each.key}-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "gateway" {
  for_each    = var.public_subnet_ids
  name_prefix = "${var.name}-${each.key}-"
  role        = aws_iam_role.gateway[each.key].name
  tags        = local.tags
}

locals {
  arn_prefix = "arn:${data.aws_partition.current.partition}"
  route_table_arns = [for id in distinct(flatten(values(var.private_route_table_ids))) :
  "${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:route-table/${id}"]
}

data "aws_iam_policy_document" "gateway" {
  statement {
    sid       = "ReadTheAllowlist"
    actions   = ["s3:GetObject"]
    resources = [for key in concat([var.allowlist_key], [for p in values(var.policies) : p.allowlist_key]) : "${local.arn_prefix}:s3:::${var.allowlist_bucket}/${key}"]
  }

  # A bucket encrypted with a customer-managed key: decrypting through S3
  # only, not the key for anything else.
  dynamic "statement" {
    for_each = var.allowlist_kms_key_arn == null ? [] : [var.allowlist_kms_key_arn]
    content {
      sid       = "DecryptTheAllowlist"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["s3.${data.aws_region.current.name}.amazonaws.com"]
      }
    }
  }

  statement {
    sid       = "TakeOverTheDefaultRoutes"
    actions   = ["ec2:ReplaceRoute", "ec2:CreateRoute"]
    resources = local.route_table_arns
  }

  # The HA agent reads the fleet and the routes every 2 s; these actions
  # take no resource-level conditions.
  statement {
    sid       = "ReadTheFleet"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeRouteTables", "ec2:DescribeAddresses"]
    resources = ["*"]
  }

  # Its three HA tags, on the fleet's own instances only: its own state,
  # and a challenge to a sibling that stops answering probes.
  statement {
    sid       = "SayHowTheGatewaysAre"
    actions   = ["ec2:CreateTags"]
    resources = ["${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/portcullis:gateway"
      values   = [var.name]
    }
    condition {
      test     = "ForAllValues:StringEquals"
      variable = "aws:TagKeys"
      values   = ["portcullis:state", "portcullis:alive", "portcullis:challenge"]
    }
  }

  # Each gateway claims an address of its AZ's pool; the interface it goes
  # on is bounded in the AZ's own policy below.
  statement {
    sid     = "HoldAnEgressAddress"
    actions = ["ec2:AssociateAddress"]
    resources = [for id in distinct(flatten(values(local.eips))) :
    "${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:elastic-ip/${id}"]
  }

  # The audit shipper writes to its own streams of the audit group only.
  statement {
    sid       = "ShipTheAuditTrail"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = [aws_cloudwatch_log_group.audit.arn, "${aws_cloudwatch_log_group.audit.arn}:log-stream:*"]
  }

  # Session Manager's shell (no SSH port, no key pairs): the agent's
  # registration and its channels, and nothing else of SSM.
  dynamic "statement" {
    for_each = var.session_manager ? [1] : []
    content {
      sid = "SessionManagerShell"
      actions = [
        "ssm:UpdateInstanceInformation",
        "ssmmessages:CreateControlChannel",
        "ssmmessages:CreateDataChannel",
        "ssmmessages:OpenControlChannel",
        "ssmmessages:OpenDataChannel",
      ]
      resources = ["*"]
    }
  }
}

# Each AZ's gateways report health and end lifecycle waits in their own
# group only. By name prefix and tag rather than by ARN, so the group can
# depend on this policy and its first instance boots with every permission
# in place.
data "aws_iam_policy_document" "own_group" {
  for_each = var.public_subnet_ids
  statement {
    sid       = "ReportUnreadyGatewaysAndEndHookWaits"
    actions   = ["autoscaling:SetInstanceHealth", "autoscaling:CompleteLifecycleAction"]
    resources = ["${local.arn_prefix}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${var.name}-${each.key}-*"]
    condition {
      test     = "StringEquals"
      variable = "autoscaling:ResourceTag/portcullis:gateway"
      values   = [var.name]
    }
  }

  # Each agent turns off its own source/destination check and puts its
  # address on its own interface. IAM cannot say "the calling instance"
  # in a form the tests' API checks, and a wrong guess would leave every
  # gateway unable to forward; the bound is the AZ's own gateways (the
  # launch template tags their instances and interfaces, and CreateTags
  # above cannot write these keys).
  dynamic "statement" {
    for_each = {
      DisableSourceDestCheckOnTheAzsGateways = { action = "ec2:ModifyInstanceAttribute", type = "instance" }
      OnTheAzsGatewayInterfaces              = { action = "ec2:AssociateAddress", type = "network-interface" }
    }
    content {
      sid       = statement.key
      actions   = [statement.value.action]
      resources = ["${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:${statement.value.type}/*"]
      condition {
        test     = "StringEquals"
        variable = "aws:ResourceTag/portcullis:gateway"
        values   = [var.name]
      }
      condition {
        test     = "StringEquals"
        variable = "aws:ResourceTag/portcullis:az"
        values   = [each.key]
      }
    }
  }
}

resource "aws_iam_role_policy" "gateway" {
  for_each = var.public_subnet_ids
  name     = "portcullis-gateway"
  role     = aws_iam_role.gateway[each.key].id
  policy   = data.aws_iam_policy_document.gateway.json
}

resource "aws_iam_role_policy" "own_group" {
  for_each = var.public_subnet_ids
  name     = "portcullis-own-group"
  role     = aws_iam_role.gateway[each.key].id
  policy   = data.aws_iam_policy_document.own_group[each.key].json
}
