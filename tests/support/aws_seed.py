"""Seeds a moto server with what the Terraform example deploys into: a VPC
with a secondary CIDR (as EKS pod ranges are added), a public and a
private subnet with its own route table in each of two AZs, and the list
bucket. Writes the example's inputs as terraform.tfvars.json to argv[1], and to
argv[2] what the tests need besides (the VPC's main route table, which
the public subnets use, and an egress-only internet gateway).

The addresses are documentation ranges: they exist only in moto's memory.
"""

import json
import sys

import boto3

ec2 = boto3.client("ec2")
vpc = ec2.create_vpc(CidrBlock="198.51.100.0/24")["Vpc"]["VpcId"]
ec2.associate_vpc_cidr_block(VpcId=vpc, CidrBlock="203.0.113.0/24")
inputs = {"vpc_id": vpc, "public_subnet_ids": {}, "private_route_table_ids": {}}
for i, az in enumerate(["us-east-1a", "us-east-1b"]):
    public = ec2.create_subnet(
        VpcId=vpc, CidrBlock=f"198.51.100.{i * 64}/26", AvailabilityZone=az
    )["Subnet"]["SubnetId"]
    private = ec2.create_subnet(
        VpcId=vpc, CidrBlock=f"198.51.100.{128 + i * 64}/26", AvailabilityZone=az
    )["Subnet"]["SubnetId"]
    table = ec2.create_route_table(VpcId=vpc)["RouteTable"]["RouteTableId"]
    ec2.associate_route_table(RouteTableId=table, SubnetId=private)
    inputs["public_subnet_ids"][az] = public
    inputs["private_route_table_ids"][az] = [table]
boto3.client("s3").create_bucket(Bucket="egress-config")
inputs["allowlist_bucket"] = "egress-config"
# Prometheus scrapes from the first AZ's private subnet.
inputs["monitoring_cidrs"] = ["198.51.100.128/26"]
inputs["ami_id"] = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
with open(sys.argv[1], "w") as out:
    json.dump(inputs, out, indent=2)
main = ec2.describe_route_tables(
    Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "association.main", "Values": ["true"]}]
)["RouteTables"][0]["RouteTableId"]
eigw = ec2.create_egress_only_internet_gateway(VpcId=vpc)["EgressOnlyInternetGateway"][
    "EgressOnlyInternetGatewayId"
]
with open(sys.argv[2], "w") as out:
    json.dump({"main_route_table": main, "egress_only_gateway": eigw}, out)
