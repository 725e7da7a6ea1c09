output "security_group_id" {
  description = "The gateways' security group."
  value       = aws_security_group.gateway.id
}

output "role_arns" {
  description = "The gateways' instance role of each AZ, keyed by AZ."
  value       = { for az, role in aws_iam_role.gateway : az => role.arn }
}

output "autoscaling_group_names" {
  description = "The auto-scaling group of each AZ's gateway, keyed by AZ."
  value       = { for az, asg in aws_autoscaling_group.gateway : az => asg.name }
}

output "launch_template_ids" {
  description = "The launch template of each AZ's gateway, keyed by AZ."
  value       = { for az, lt in aws_launch_template.gateway : az => lt.id }
}

output "allowlist_url" {
  description = "Where the gateways read the allowlist."
  value       = "s3://${var.allowlist_bucket}/${var.allowlist_key}"
}

output "metrics_port" {
  description = "Prometheus scrapes each gateway's private address on this port (/metrics)."
  value       = 9090
}

output "egress_allocation_ids" {
  description = "Each AZ's Elastic IP pool (allocation ids): every gateway egresses from one of its AZ's, so partners allowlist them all."
  value       = local.eips
}

output "egress_ips" {
  description = "The public addresses of the pools the module allocated, keyed by AZ (empty when eip_allocation_ids is given)."
  value       = { for az, _ in var.public_subnet_ids : az => [for k, e in aws_eip.egress : e.public_ip if e.tags["portcullis:az"] == az] }
}

output "audit_log_group" {
  description = "The CloudWatch Logs group holding the audit trail, a stream per gateway instance."
  value       = aws_cloudwatch_log_group.audit.name
}
