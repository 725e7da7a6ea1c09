variable "name" {
  type        = string
  default     = "portcullis"
  description = "Name prefix for every resource, and the value of the portcullis:gateway tag on the instances."

  # IAM name prefixes take 38 characters, and each AZ's role is named
  # NAME-AZ- (a local zone's AZ name is 16).
  validation {
    condition     = can(regex("^[A-Za-z0-9][A-Za-z0-9-]{0,19}$", var.name))
    error_message = "name is 1 to 20 letters, digits and hyphens (it prefixes each AZ's IAM role name, which IAM caps)."
  }
}

variable "vpc_id" {
  type        = string
  description = "The VPC whose private subnets egress through the gateways."
}

variable "public_subnet_ids" {
  type        = map(string)
  description = "One public subnet per availability zone, keyed by AZ name: where each AZ's gateway runs."
}

variable "private_route_table_ids" {
  type        = map(list(string))
  description = "The private route tables of each AZ, keyed by AZ name (the same keys as public_subnet_ids). Their default routes are pointed at that AZ's gateway."

  validation {
    condition     = alltrue([for ids in values(var.private_route_table_ids) : alltrue([for id in ids : can(regex("^rtb-[0-9a-f]+$", id))])])
    error_message = "Route table ids look like rtb-0123456789abcdef0."
  }
}

variable "private_cidrs" {
  type        = list(string)
  default     = []
  description = "IPv4 networks whose web traffic the gateways inspect. Empty: every CIDR of the VPC, secondary ones included."
}

variable "private_cidrs6" {
  type        = list(string)
  default     = []
  description = "IPv6 networks whose web traffic the gateways inspect. Empty: no IPv6."
}

variable "route_ipv6" {
  type        = bool
  default     = false
  description = "Also point ::/0 of the private route tables at the gateways (needs private_cidrs6)."
}

variable "monitoring_cidrs" {
  type        = list(string)
  description = "Networks Prometheus scrapes from: only they reach the metrics port (9090)."
}

variable "allowlist_bucket" {
  type        = string
  description = "S3 bucket holding the allowlist."
}

variable "allowlist_key" {
  type        = string
  default     = "portcullis/allowlist.txt"
  description = "Key of the allowlist object; the instances may read this one key only."
}

variable "allowlist_kms_key_arn" {
  type        = string
  default     = null
  description = "The KMS key the list bucket encrypts with (SSE-KMS with a customer-managed key): the gateways may decrypt with it through S3 only. Null: SSE-S3 or no encryption."

  validation {
    condition     = var.allowlist_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/.+$", var.allowlist_kms_key_arn))
    error_message = "allowlist_kms_key_arn is a key ARN, arn:aws:kms:REGION:ACCOUNT:key/ID."
  }
}

variable "session_manager" {
  type        = bool
  default     = true
  description = "Allow a shell through AWS Systems Manager Session Manager (the agent's registration and its channels, nothing else of SSM). The gateways have no SSH."
}

variable "allowlist_file" {
  type        = string
  default     = null
  description = "A local allowlist to upload to allowlist_bucket/allowlist_key. Null: the object is managed elsewhere."
}

variable "policies" {
  type = map(object({
    sources       = list(string)
    allowlist_key = string
  }))
  default     = {}
  description = "Per-source policies: name => { sources = client CIDRs, allowlist_key = its list's key in allowlist_bucket }. A client is decided by the policy with the most specific block holding its address, else by allowlist_key. Names: a-z, 0-9, - and _; at most 32."

  validation {
    condition     = length(var.policies) <= 32 && alltrue([for name, _ in var.policies : can(regex("^[a-z0-9][a-z0-9_-]{0,31}$", name)) && name != "default"])
    error_message = "At most 32 policies, each named with 1 to 32 of a-z, 0-9, - and _ (not \"default\")."
  }
}

variable "refresh" {
  type        = string
  default     = "60s"
  description = "How often each gateway checks the allowlist object for changes."
}

variable "ami_id" {
  type        = string
  description = "A portcullis AMI built by ami/portcullis.pkr.hcl, of the instance type's architecture."
}

variable "gateways_per_az" {
  type        = number
  default     = 1
  description = "Gateways in each AZ. 2 keeps a standby beside the one serving, so a single-AZ deployment fails over within the AZ."

  validation {
    condition     = contains([1, 2, 3], var.gateways_per_az)
    error_message = "gateways_per_az must be 1, 2 or 3."
  }
}

variable "eip_allocation_ids" {
  type        = map(list(string))
  default     = null
  description = "Your own Elastic IPs as AZ => allocation ids, at least gateways_per_az + 1 per AZ. Null: the module allocates that many per AZ. Each gateway holds one of its AZ's for life; partners allowlist them all."

  validation {
    condition     = var.eip_allocation_ids == null ? true : alltrue([for ids in values(var.eip_allocation_ids) : alltrue([for id in ids : can(regex("^eipalloc-[0-9a-f]+$", id))])])
    error_message = "Allocation ids look like eipalloc-0123456789abcdef0."
  }
}

variable "instance_types" {
  type        = list(string)
  default     = ["c7gn.large", "c6gn.large", "c7g.large"]
  description = "Gateway instance types, most preferred first, all of the AMI's architecture: when EC2 has none of the first in an AZ, the group launches the next, so one type's shortage does not leave an AZ without a gateway. Network-optimised Graviton (c7gn) gives the most Gbit/s per dollar."

  validation {
    condition     = length(var.instance_types) > 0 && length(var.instance_types) == length(distinct(var.instance_types))
    error_message = "instance_types needs at least one type, each once."
  }
}

variable "max_connections" {
  type        = number
  default     = 50000
  description = "Connections each gateway serves at once; more are refused."
}

variable "max_connections_per_source" {
  type        = number
  default     = null
  description = "Connections one client (an IPv4 address, an IPv6 /64) may hold at each gateway at once; null: a tenth of max_connections. Raise it for clients that are NATs of many hosts (nodes that SNAT their pods)."

  validation {
    condition     = var.max_connections_per_source == null || try(var.max_connections_per_source >= 1 && floor(var.max_connections_per_source) == var.max_connections_per_source, false)
    error_message = "max_connections_per_source must be a whole number, at least 1."
  }
}

variable "audit_interval" {
  type        = string
  default     = "5m"
  description = "How often a connection still open writes an interim audit record (\"0s\": never), so long tunnels are visible while they run."

  validation {
    condition     = can(regex("^[0-9]+(ms|s|m|h)$", var.audit_interval))
    error_message = "audit_interval must be a duration such as 5m, 300s or 0s."
  }
}

variable "verify_dst" {
  type        = string
  default     = "pin"
  description = "What an allowed name's DNS says about where its bytes may go: pin (to the dialled address when it is one of the name's, else to one of the name's own; a spoofed destination is never contacted), dns (refuse a mismatch), or off (trust the client's address: any host can reach any address by naming an allowed host)."

  validation {
    condition     = contains(["pin", "dns", "off"], var.verify_dst)
    error_message = "verify_dst must be pin, dns or off."
  }
}

variable "mode" {
  type        = string
  default     = "enforce"
  description = "enforce refuses what the policy denies; monitor forwards it and logs and counts it as would_deny (to roll out a list without breaking anything)."

  validation {
    condition     = contains(["enforce", "monitor"], var.mode)
    error_message = "mode must be enforce or monitor."
  }
}

variable "monitor_until" {
  type        = string
  default     = null
  description = "With mode = \"monitor\": enforce from this date (midnight UTC, 2026-12-31) or RFC 3339 time on, so monitor mode cannot stay on by accident."

  validation {
    condition     = var.monitor_until == null || can(regex("^[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))?$", var.monitor_until))
    error_message = "monitor_until must be a date such as 2026-12-31 or a time such as 2026-12-31T18:00:00Z."
  }
}

variable "min_tls" {
  type        = string
  default     = "1.2"
  description = "Refuse TLS whose highest offered version is below this."

  validation {
    condition     = contains(["1.0", "1.1", "1.2", "1.3"], var.min_tls)
    error_message = "min_tls must be 1.0, 1.1, 1.2 or 1.3."
  }
}

variable "allow_forward" {
  type        = list(string)
  default     = []
  description = "Traffic routed around the proxy, as PROTO:PORT[@DESTINATION-CIDR] (e.g. \"tcp:5432@203.0.113.7/32\"). Everything else that is not web traffic is dropped. Each rule is a path out that no allowlist sees: keep them narrow (an open UDP port is a tunnel). Time needs none: Amazon Time Sync (169.254.169.123) is link-local."

  validation {
    condition     = alltrue([for rule in var.allow_forward : can(regex("^(tcp|udp):[0-9]+(:[0-9]+)?(@[0-9a-fA-F:.]+(/[0-9]+)?)?$", rule))])
    error_message = "Each rule is PROTO:PORT[@CIDR] with PROTO tcp or udp."
  }
}

variable "max_instance_lifetime" {
  type        = number
  default     = 1209600
  description = "Seconds before an instance is replaced (default 14 days), so patches and new AMIs roll through. Each AZ after the first (by name) gets a day less, so the AZs roll on different days."

  validation {
    condition     = var.max_instance_lifetime == 0 || (var.max_instance_lifetime >= 86400 && var.max_instance_lifetime <= 31536000)
    error_message = "max_instance_lifetime must be 0 (never) or between 86400 (1 day) and 31536000 (365 days)."
  }
}

variable "audit_log_group_name" {
  type        = string
  default     = null
  description = "The CloudWatch Logs group the audit trail is shipped to (a stream per instance). Null: /portcullis/NAME/audit."
}

variable "audit_log_retention_days" {
  type        = number
  default     = 400
  description = "Days CloudWatch keeps the audit trail (HITRUST and PCI ask for at least a year). 0 keeps it forever."

  validation {
    condition     = contains([0, 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.audit_log_retention_days)
    error_message = "audit_log_retention_days must be one CloudWatch Logs allows: 0 (forever), 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288 or 3653."
  }
}

variable "audit_log_kms_key_arn" {
  type        = string
  default     = null
  description = "A customer-managed KMS key for the audit group (its key policy must let CloudWatch Logs use it). Null: CloudWatch's own encryption."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Tags for every resource."
}
