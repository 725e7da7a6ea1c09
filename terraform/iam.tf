# The gateway's instance role: the least it needs to run and fail over.

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
  name_prefix        = "${var.name}-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "gateway" {
  name_prefix = "${var.name}-"
  role        = aws_iam_role.gateway.name
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

  # Only instances this module launched (they carry its tag) can be
  # changed, and only their source/destination check is needed.
  statement {
    sid       = "DisableSourceDestCheckOnGateways"
    actions   = ["ec2:ModifyInstanceAttribute"]
    resources = ["${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:instance/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/portcullis:gateway"
      values   = [var.name]
    }
  }

  # Each gateway claims an address of its AZ's pool, on its own interface.
  statement {
    sid     = "HoldAnEgressAddress"
    actions = ["ec2:AssociateAddress"]
    resources = [for id in distinct(flatten(values(local.eips))) :
    "${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:elastic-ip/${id}"]
  }
  statement {
    sid       = "OnTheGatewaysOwnInterfaces"
    actions   = ["ec2:AssociateAddress"]
    resources = ["${local.arn_prefix}:ec2:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:network-interface/*"]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/portcullis:gateway"
      values   = [var.name]
    }
  }

  # By name and tag rather than by ARN, so the groups can depend on this
  # policy and their first instance boots with every permission in place.
  statement {
    sid       = "ReportUnreadyGatewaysAndEndHookWaits"
    actions   = ["autoscaling:SetInstanceHealth", "autoscaling:CompleteLifecycleAction"]
    resources = ["${local.arn_prefix}:autoscaling:${data.aws_region.current.name}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:*:autoScalingGroupName/${var.name}-*"]
    condition {
      test     = "StringEquals"
      variable = "autoscaling:ResourceTag/portcullis:gateway"
      values   = [var.name]
    }
  }
}

resource "aws_iam_role_policy" "gateway" {
  name   = "portcullis-gateway"
  role   = aws_iam_role.gateway.id
  policy = data.aws_iam_policy_document.gateway.json
}

# Shell access through Session Manager: no SSH port, no key pairs.
resource "aws_iam_role_policy_attachment" "ssm" {
  role       = aws_iam_role.gateway.name
  policy_arn = "${local.arn_prefix}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}
