output "security_group_id" {
  description = "The gateways' security group."
  value       = aws_security_group.gateway.id
}

output "role_arn" {
  description = "The gateways' instance role."
  value       = aws_iam_role.gateway.arn
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
