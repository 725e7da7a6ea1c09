# The smallest complete deployment: gateways in two AZs of an existing VPC,
# enforcing the repository's example allowlist uploaded to S3.
#
#   terraform init
#   terraform apply -var-file=my.tfvars
#
# Build the AMI first (ami/portcullis.pkr.hcl) and create the bucket, or
# point allowlist_bucket at one you have.

terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.40"
    }
  }
}

provider "aws" {
  region = var.region
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "vpc_id" {
  type = string
}

variable "public_subnet_ids" {
  type        = map(string)
  description = "AZ => public subnet id, e.g. { us-east-1a = \"subnet-...\" }"
}

variable "private_route_table_ids" {
  type        = map(list(string))
  description = "AZ => the private route tables of that AZ"
}

variable "allowlist_bucket" {
  type = string
}

variable "ami_id" {
  type = string
}

variable "monitoring_cidrs" {
  type    = list(string)
  default = []
}

module "portcullis" {
  source = "../.."

  vpc_id                  = var.vpc_id
  public_subnet_ids       = var.public_subnet_ids
  private_route_table_ids = var.private_route_table_ids
  allowlist_bucket        = var.allowlist_bucket
  allowlist_file          = "${path.module}/../../../examples/allowlist.txt"
  ami_id                  = var.ami_id
  monitoring_cidrs        = var.monitoring_cidrs
  # Nothing forwarded around the proxy: instances keep time through Amazon
  # Time Sync (169.254.169.123), which is link-local.
}

output "autoscaling_group_names" {
  value = module.portcullis.autoscaling_group_names
}

output "security_group_id" {
  value = module.portcullis.security_group_id
}
