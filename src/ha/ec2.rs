//! The few EC2 calls the HA agent makes, over the API's query protocol
//! (form-encoded POST, signed by [`crate::aws`], XML back).
//!
//! Every call has a deadline; errors say whether retrying later can help.

use super::address::{Address, AllocationId};
use super::decide::Take;
use super::fleet::{
    Az, Challenge, EniId, Family, Fleet, Gateway, InstanceId, Layout, Millis, Route, RouteTableId,
    Stated, TAG_ALIVE, TAG_CHALLENGE, TAG_RELEASE, TAG_STATE, Target, alive_from_tag,
};
use super::xml::{self, Element};
use crate::aws::{CallError, Caller, Endpoint};
use std::net::IpAddr;
use std::time::Duration;

/// The two query APIs the agent calls: their signing names and versions.
const EC2: (&str, &str) = ("ec2", "2016-11-15");
const AUTOSCALING: (&str, &str) = ("autoscaling", "2011-01-01");
/// One call, from connect to the last byte of the answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pages of a listing read at most: a fleet is a handful of instances.
const MAX_PAGES: usize = 10;
/// The tag every gateway of a fleet carries; its value is the fleet's name.
pub const TAG_FLEET: &str = "portcullis:gateway";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ec2Error {
    /// RequestLimitExceeded, or the service asking us to slow down.
    #[error("EC2 API throttled the request ({0})")]
    Throttled(String),
    #[error("EC2 API refused {action}: {code}: {message}")]
    Api {
        action: &'static str,
        code: String,
        message: String,
    },
    #[error("EC2 API unreachable: {0}")]
    Transport(String),
    #[error("EC2 API did not answer within {CALL_TIMEOUT:?}")]
    Timeout,
    #[error("EC2 API answer unreadable: {0}")]
    Malformed(String),
    #[error("no AWS credentials: {0}")]
    Credentials(String),
}

impl Ec2Error {
    /// The error metric's label.
    pub fn kind(&self) -> &'static str {
        match self {
            Ec2Error::Throttled(_) => "throttled",
            Ec2Error::Api { .. } => "api",
            Ec2Error::Transport(_) | Ec2Error::Timeout => "unreachable",
            Ec2Error::Malformed(_) => "malformed",
            Ec2Error::Credentials(_) => "credentials",
        }
    }
}

/// What the agent needs from EC2; a fake stands in for it in tests.
pub(crate) trait Ec2 {
    /// The fleet's gateways and the layout's default routes.
    async fn fleet(&self, fleet_name: &str, layout: &Layout) -> Result<Fleet, Ec2Error>;
    /// Points one default route at `eni`.
    async fn take(&self, take: &Take, eni: &EniId) -> Result<(), Ec2Error>;
    async fn tag(&self, instance: &InstanceId, tags: &[(&str, String)]) -> Result<(), Ec2Error>;
    /// A gateway forwards packets not addressed to it.
    async fn disable_source_dest_check(&self, instance: &InstanceId) -> Result<(), Ec2Error>;
    async fn addresses(&self, pool: &[AllocationId]) -> Result<Vec<Address>, Ec2Error>;
    /// Ends this instance's wait in its auto-scaling group's lifecycle hook.
    async fn complete_lifecycle(
        &self,
        group: &str,
        hook: &str,
        instance: &InstanceId,
    ) -> Result<(), Ec2Error>;
    async fn associate(
        &self,
        address: &AllocationId,
        eni: &EniId,
        reassociate: bool,
    ) -> Result<(), Ec2Error>;
}

impl From<CallError> for Ec2Error {
    fn from(e: CallError) -> Ec2Error {
        match e {
            CallError::Transport(e) => Ec2Error::Transport(e),
            CallError::Timeout(_) => Ec2Error::Timeout,
            CallError::Credentials(e) => Ec2Error::Credentials(e),
        }
    }
}

/// One query API: where it is, and its version.
struct Service {
    endpoint: Endpoint,
    version: &'static str,
}

impl Service {
    fn new((name, version): (&'static str, &'static str), env: &str, region: &str) -> Service {
        Service {
            endpoint: Endpoint::new(name, name, env, region),
            version,
        }
    }
}

/// The query-protocol client, for EC2 and Auto Scaling.
pub struct Client {
    ec2: Service,
    autoscaling: Service,
    caller: Caller,
}

impl Client {
    /// For `region`, with the standard credential chain (the instance role
    /// on EC2).
    pub async fn new(region: &str) -> Result<Client, Ec2Error> {
        Ok(Client {
            ec2: Service::new(EC2, "AWS_ENDPOINT_URL_EC2", region),
            autoscaling: Service::new(AUTOSCALING, "AWS_ENDPOINT_URL_AUTO_SCALING", region),
            caller: Caller::new(region, CALL_TIMEOUT).await?,
        })
    }

    /// One signed EC2 call; the parsed answer, or the API's error.
    async fn call(
        &self,
        action: &'static str,
        params: &[(String, String)],
    ) -> Result<Element, Ec2Error> {
        self.call_to(&self.ec2, action, params).await
    }

    async fn call_to(
        &self,
        service: &Service,
        action: &'static str,
        params: &[(String, String)],
    ) -> Result<Element, Ec2Error> {
        let mut body = format!("Action={action}&Version={}", service.version);
        for (k, v) in params {
            body.push('&');
            body.push_str(&form_encode(k));
            body.push('=');
            body.push_str(&form_encode(v));
        }
        let headers = [(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        let (status, bytes) = self
            .caller
            .post(&service.endpoint, &headers, body.into_bytes(), CALL_TIMEOUT)
            .await?;
        let text = std::str::from_utf8(&bytes).map_err(|e| Ec2Error::Malformed(e.to_string()))?;
        answer(action, status, text)
    }
}

/// The parsed body of a success, or the error it carries.
fn answer(action: &'static str, status: u16, text: &str) -> Result<Element, Ec2Error> {
    let root = xml::parse(text);
    if (200..300).contains(&status) {
        return root.map_err(|e| Ec2Error::Malformed(e.to_string()));
    }
    let (code, message) = match &root {
        Ok(root) => {
            let error = root
                .child("Errors")
                .and_then(|e| e.child("Error"))
                .or_else(|| root.child("Error"));
            (
                error
                    .and_then(|e| e.text_at(&["Code"]))
                    .unwrap_or("")
                    .to_owned(),
                error
                    .and_then(|e| e.text_at(&["Message"]))
                    .unwrap_or("")
                    .to_owned(),
            )
        }
        Err(_) => (String::new(), String::new()),
    };
    if code == "RequestLimitExceeded"
        || code.starts_with("Throttl")
        || status == 429
        || status == 503
    {
        return Err(Ec2Error::Throttled(if code.is_empty() {
            format!("HTTP {status}")
        } else {
            code
        }));
    }
    Err(Ec2Error::Api {
        action,
        code: if code.is_empty() {
            format!("HTTP {status}")
        } else {
            code
        },
        message,
    })
}

/// Percent-encoding as SigV4's canonical form wants it: only unreserved
/// characters are left as they are.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn param(k: impl Into<String>, v: impl Into<String>) -> (String, String) {
    (k.into(), v.into())
}

impl Ec2 for Client {
    async fn fleet(&self, fleet_name: &str, layout: &Layout) -> Result<Fleet, Ec2Error> {
        let mut gateways = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let mut params = vec![
                param("Filter.1.Name", format!("tag:{TAG_FLEET}")),
                param("Filter.1.Value.1", fleet_name),
                param("Filter.2.Name", "instance-state-name"),
            ];
            for (i, s) in ["pending", "running", "stopping", "stopped", "shutting-down"]
                .iter()
                .enumerate()
            {
                params.push(param(format!("Filter.2.Value.{}", i + 1), *s));
            }
            if let Some(t) = &token {
                params.push(param("NextToken", t.clone()));
            }
            let root = self.call("DescribeInstances", &params).await?;
            gateways.extend(parse_instances(&root));
            token = root
                .text_at(&["nextToken"])
                .filter(|t| !t.is_empty())
                .map(str::to_owned);
            if token.is_none() {
                break;
            }
        }
        let tables: Vec<&RouteTableId> = layout.all_tables().collect();
        let mut params = Vec::new();
        for (i, t) in tables.iter().enumerate() {
            params.push(param(format!("RouteTableId.{}", i + 1), t.0.clone()));
        }
        let routes = if tables.is_empty() {
            Vec::new()
        } else {
            parse_routes(&self.call("DescribeRouteTables", &params).await?, layout)
        };
        Ok(Fleet { gateways, routes })
    }

    async fn take(&self, take: &Take, eni: &EniId) -> Result<(), Ec2Error> {
        let destination = match take.family {
            Family::V4 => "DestinationCidrBlock",
            Family::V6 => "DestinationIpv6CidrBlock",
        };
        let params = [
            param("RouteTableId", take.table.0.clone()),
            param(destination, take.family.destination()),
            param("NetworkInterfaceId", eni.0.clone()),
        ];
        let action = if take.exists {
            "ReplaceRoute"
        } else {
            "CreateRoute"
        };
        match self.call(action, &params).await {
            // The reading was old: the route came or went since. The other
            // call is right now; the next reading would find it anyway.
            Err(Ec2Error::Api { code, .. })
                if code == "InvalidRoute.NotFound" || code == "RouteAlreadyExists" =>
            {
                let other = if take.exists {
                    "CreateRoute"
                } else {
                    "ReplaceRoute"
                };
                self.call(other, &params).await.map(drop)
            }
            other => other.map(drop),
        }
    }

    async fn tag(&self, instance: &InstanceId, tags: &[(&str, String)]) -> Result<(), Ec2Error> {
        let mut params = vec![param("ResourceId.1", instance.0.clone())];
        for (i, (k, v)) in tags.iter().enumerate() {
            params.push(param(format!("Tag.{}.Key", i + 1), *k));
            params.push(param(format!("Tag.{}.Value", i + 1), v.clone()));
        }
        self.call("CreateTags", &params).await.map(drop)
    }

    async fn disable_source_dest_check(&self, instance: &InstanceId) -> Result<(), Ec2Error> {
        let params = [
            param("InstanceId", instance.0.clone()),
            param("SourceDestCheck.Value", "false"),
        ];
        self.call("ModifyInstanceAttribute", &params)
            .await
            .map(drop)
    }

    async fn addresses(&self, pool: &[AllocationId]) -> Result<Vec<Address>, Ec2Error> {
        let params: Vec<_> = pool
            .iter()
            .enumerate()
            .map(|(i, a)| param(format!("AllocationId.{}", i + 1), a.0.clone()))
            .collect();
        Ok(parse_addresses(
            &self.call("DescribeAddresses", &params).await?,
        ))
    }

    async fn associate(
        &self,
        address: &AllocationId,
        eni: &EniId,
        reassociate: bool,
    ) -> Result<(), Ec2Error> {
        let params = [
            param("AllocationId", address.0.clone()),
            param("NetworkInterfaceId", eni.0.clone()),
            param(
                "AllowReassociation",
                if reassociate { "true" } else { "false" },
            ),
        ];
        self.call("AssociateAddress", &params).await.map(drop)
    }

    async fn complete_lifecycle(
        &self,
        group: &str,
        hook: &str,
        instance: &InstanceId,
    ) -> Result<(), Ec2Error> {
        let params = [
            param("AutoScalingGroupName", group),
            param("LifecycleHookName", hook),
            param("InstanceId", instance.0.clone()),
            param("LifecycleActionResult", "CONTINUE"),
        ];
        self.call_to(&self.autoscaling, "CompleteLifecycleAction", &params)
            .await
            .map(drop)
    }
}

/// The pool's addresses from a DescribeAddresses answer.
fn parse_addresses(root: &Element) -> Vec<Address> {
    root.items("addressesSet")
        .filter_map(|item| {
            Some(Address {
                allocation: AllocationId(item.text_at(&["allocationId"])?.to_owned()),
                public_ip: item.text_at(&["publicIp"]).unwrap_or("").to_owned(),
                eni: item
                    .text_at(&["networkInterfaceId"])
                    .filter(|e| !e.is_empty())
                    .map(|e| EniId(e.to_owned())),
            })
        })
        .collect()
}

/// Gateways from a DescribeInstances answer. An instance that lacks what
/// the rule needs (an id, an AZ, a primary interface) is left out.
fn parse_instances(root: &Element) -> Vec<Gateway> {
    let mut out = Vec::new();
    for reservation in root.items("reservationSet") {
        for item in reservation.items("instancesSet") {
            let Some(id) = item.text_at(&["instanceId"]).filter(|s| !s.is_empty()) else {
                continue;
            };
            let Some(az) = item.text_at(&["placement", "availabilityZone"]) else {
                continue;
            };
            let primary = item.items("networkInterfaceSet").find(|n| {
                n.text_at(&["attachment", "deviceIndex"])
                    .is_none_or(|d| d == "0")
            });
            let Some(eni) = primary.and_then(|n| n.text_at(&["networkInterfaceId"])) else {
                continue;
            };
            let ip6 = primary
                .and_then(|n| n.items("ipv6AddressesSet").next())
                .and_then(|a| a.text_at(&["ipv6Address"]))
                .and_then(|ip| ip.parse::<std::net::Ipv6Addr>().ok());
            let tag = |key: &str| {
                item.items("tagSet")
                    .find(|t| t.text_at(&["key"]) == Some(key))
                    .and_then(|t| t.text_at(&["value"]))
            };
            let launched = item
                .text_at(&["launchTime"])
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(Millis(0), |d| {
                    Millis(u64::try_from(d.as_millis()).unwrap_or(0))
                });
            out.push(Gateway {
                id: InstanceId(id.to_owned()),
                az: Az(az.to_owned()),
                eni: EniId(eni.to_owned()),
                ip: item
                    .text_at(&["privateIpAddress"])
                    .and_then(|ip| ip.parse::<IpAddr>().ok()),
                ip6,
                launched,
                running: item.text_at(&["instanceState", "name"]) == Some("running"),
                booting: item.text_at(&["instanceState", "name"]) == Some("pending"),
                group: tag("aws:autoscaling:groupName").map(str::to_owned),
                release: tag(TAG_RELEASE).map(str::to_owned),
                state: tag(TAG_STATE).and_then(Stated::from_tag),
                alive: tag(TAG_ALIVE).and_then(alive_from_tag),
                challenge: tag(TAG_CHALLENGE).and_then(Challenge::from_tag),
            });
        }
    }
    out
}

/// The layout's default routes from a DescribeRouteTables answer; a
/// configured table EC2 did not return, or without the route, reads as
/// missing.
fn parse_routes(root: &Element, layout: &Layout) -> Vec<Route> {
    let mut out = Vec::new();
    for table in layout.all_tables() {
        let found = root
            .items("routeTableSet")
            .find(|t| t.text_at(&["routeTableId"]) == Some(table.0.as_str()));
        for &family in layout.families() {
            let key = match family {
                Family::V4 => "destinationCidrBlock",
                Family::V6 => "destinationIpv6CidrBlock",
            };
            let route = found.and_then(|t| {
                t.items("routeSet")
                    .find(|r| r.text_at(&[key]) == Some(family.destination()))
            });
            let target = match route {
                None => Target::Missing,
                Some(r) if r.text_at(&["state"]) == Some("blackhole") => {
                    Target::Other("blackhole".into())
                }
                Some(r) => match r.text_at(&["networkInterfaceId"]).filter(|s| !s.is_empty()) {
                    Some(eni) => Target::Eni(EniId(eni.to_owned())),
                    None => Target::Other(
                        [
                            "natGatewayId",
                            "gatewayId",
                            "instanceId",
                            "transitGatewayId",
                        ]
                        .iter()
                        .find_map(|k| r.text_at(&[k]).filter(|s| !s.is_empty()))
                        .unwrap_or("unknown")
                        .to_owned(),
                    ),
                },
            };
            out.push(Route {
                table: table.clone(),
                family,
                target,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const INSTANCES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
 <reservationSet><item><instancesSet>
  <item>
   <instanceId>i-0a</instanceId>
   <instanceState><code>16</code><name>running</name></instanceState>
   <privateIpAddress>198.51.100.140</privateIpAddress>
   <launchTime>2026-12-01T15:28:38.000Z</launchTime>
   <placement><availabilityZone>us-east-1a</availabilityZone></placement>
   <networkInterfaceSet>
    <item><networkInterfaceId>eni-second</networkInterfaceId><attachment><deviceIndex>1</deviceIndex></attachment></item>
    <item><networkInterfaceId>eni-0a</networkInterfaceId><attachment><deviceIndex>0</deviceIndex></attachment>
     <ipv6AddressesSet><item><ipv6Address>2001:db8:a::140</ipv6Address></item></ipv6AddressesSet></item>
   </networkInterfaceSet>
   <tagSet>
    <item><key>portcullis:gateway</key><value>prod</value></item>
    <item><key>aws:autoscaling:groupName</key><value>prod-us-east-1a-1</value></item>
    <item><key>portcullis:release</key><value>5f2c0e1a9b</value></item>
    <item><key>portcullis:state</key><value>ready@1764602918000</value></item>
    <item><key>portcullis:challenge</key><value>1764602920000 i-0b</value></item>
    <item><key>portcullis:alive</key><value>garbage</value></item>
   </tagSet>
  </item>
  <item><instanceId>i-noaz</instanceId></item>
 </instancesSet></item></reservationSet>
</DescribeInstancesResponse>"#;

    #[test]
    fn reads_gateways_from_describe_instances() {
        let root = xml::parse(INSTANCES).expect("xml");
        let gateways = parse_instances(&root);
        assert_eq!(gateways.len(), 1, "the instance without an AZ is skipped");
        let g = &gateways[0];
        assert_eq!(g.id, InstanceId("i-0a".into()));
        assert_eq!(g.eni, EniId("eni-0a".into()), "the primary interface");
        assert_eq!(g.ip, Some("198.51.100.140".parse().expect("ip")));
        assert_eq!(g.ip6, Some("2001:db8:a::140".parse().expect("ip6")));
        assert_eq!(g.launched, Millis(1_796_138_918_000));
        assert!(g.running);
        assert_eq!(g.state.map(|s| s.since), Some(Millis(1_764_602_918_000)));
        assert_eq!(g.challenge.as_ref().map(|c| c.by.0.as_str()), Some("i-0b"));
        assert_eq!(g.release.as_deref(), Some("5f2c0e1a9b"));
        assert_eq!(g.alive, None, "an unparsable tag is absent");
        assert_eq!(g.group.as_deref(), Some("prod-us-east-1a-1"));
    }

    #[test]
    fn reads_default_routes_and_what_they_point_at() {
        let doc = r#"<DescribeRouteTablesResponse><routeTableSet>
          <item><routeTableId>rtb-a</routeTableId><routeSet>
            <item><destinationCidrBlock>10.0.0.0/16</destinationCidrBlock><gatewayId>local</gatewayId><state>active</state></item>
            <item><destinationCidrBlock>0.0.0.0/0</destinationCidrBlock><networkInterfaceId>eni-0a</networkInterfaceId><state>active</state></item>
            <item><destinationIpv6CidrBlock>::/0</destinationIpv6CidrBlock><natGatewayId>nat-1</natGatewayId><state>active</state></item>
          </routeSet></item>
          <item><routeTableId>rtb-b</routeTableId><routeSet>
            <item><destinationCidrBlock>0.0.0.0/0</destinationCidrBlock><networkInterfaceId>eni-dead</networkInterfaceId><state>blackhole</state></item>
          </routeSet></item>
        </routeTableSet></DescribeRouteTablesResponse>"#;
        let mut layout = Layout {
            ipv6: true,
            ..Layout::default()
        };
        layout
            .tables
            .insert(Az("a".into()), vec![RouteTableId("rtb-a".into())]);
        layout.tables.insert(
            Az("b".into()),
            vec![
                RouteTableId("rtb-b".into()),
                RouteTableId("rtb-gone".into()),
            ],
        );
        let routes = parse_routes(&xml::parse(doc).expect("xml"), &layout);
        let targets: Vec<_> = routes
            .iter()
            .map(|r| (r.table.0.as_str(), r.family, r.target.clone()))
            .collect();
        assert_eq!(
            targets,
            vec![
                ("rtb-a", Family::V4, Target::Eni(EniId("eni-0a".into()))),
                ("rtb-a", Family::V6, Target::Other("nat-1".into())),
                ("rtb-b", Family::V4, Target::Other("blackhole".into())),
                ("rtb-b", Family::V6, Target::Missing),
                ("rtb-gone", Family::V4, Target::Missing),
                ("rtb-gone", Family::V6, Target::Missing),
            ]
        );
    }

    #[test]
    fn reads_the_pool_from_describe_addresses() {
        let doc = r#"<DescribeAddressesResponse><addressesSet>
          <item><allocationId>eipalloc-1</allocationId><networkInterfaceId>eni-0a</networkInterfaceId><publicIp>203.0.113.7</publicIp></item>
          <item><allocationId>eipalloc-2</allocationId><networkInterfaceId/><publicIp>203.0.113.8</publicIp></item>
          <item><publicIp>203.0.113.9</publicIp></item>
        </addressesSet></DescribeAddressesResponse>"#;
        let pool = parse_addresses(&xml::parse(doc).expect("xml"));
        assert_eq!(
            pool,
            vec![
                Address {
                    allocation: AllocationId("eipalloc-1".into()),
                    public_ip: "203.0.113.7".into(),
                    eni: Some(EniId("eni-0a".into())),
                },
                Address {
                    allocation: AllocationId("eipalloc-2".into()),
                    public_ip: "203.0.113.8".into(),
                    eni: None,
                },
            ]
        );
    }

    #[test]
    fn tells_throttling_from_refusals() {
        let error = |code: &str| {
            format!(
                "<Response><Errors><Error><Code>{code}</Code><Message>m</Message></Error></Errors></Response>"
            )
        };
        assert_eq!(
            answer("CreateTags", 503, &error("RequestLimitExceeded")).map(drop),
            Err(Ec2Error::Throttled("RequestLimitExceeded".into()))
        );
        assert_eq!(
            answer("ReplaceRoute", 400, &error("UnauthorizedOperation")).map(drop),
            Err(Ec2Error::Api {
                action: "ReplaceRoute",
                code: "UnauthorizedOperation".into(),
                message: "m".into()
            })
        );
        assert!(matches!(
            answer("CreateTags", 500, "<html>"),
            Err(Ec2Error::Api { .. })
        ));
        assert!(matches!(
            answer("CreateTags", 200, "not xml"),
            Err(Ec2Error::Malformed(_))
        ));
    }

    #[test]
    fn encodes_tag_values_for_the_signature() {
        assert_eq!(
            form_encode("ready@17 i-0a:b/c~"),
            "ready%4017%20i-0a%3Ab%2Fc~"
        );
    }
}
