//! Which GENEVE header and outer addresses each flow's packets go back
//! with. GWLB accepts a packet toward a client only behind the header of
//! the latest packet of its flow (the cookie changes when a 5-tuple is
//! reused for a new flow), so every packet from GWLB refreshes its flow's
//! entry, and a packet of a flow never seen is never sent anywhere.
//!
//! Bounded: at most `capacity` flows; a flow idle for [`IDLE`] (GWLB's own
//! idle timeout for TCP) is forgotten. Pure: time is passed in.

use crate::geneve::Header;
use crate::packet::FlowKey;
use std::collections::HashMap;
use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

/// GWLB forgets an idle TCP flow after 350 s; so does the table.
pub const IDLE: Duration = Duration::from_secs(350);
/// How often a full table looks for idle flows at most: a sweep is a pass
/// over every flow, so a flood of new flows into a full table of live ones
/// costs one pass a second, not one per packet.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where a flow's packets came from and go back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outer {
    /// The load balancer's address and UDP source port.
    pub gwlb: SocketAddrV4,
    /// This host's address and port it arrived at.
    pub local: SocketAddrV4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub header: Header,
    pub outer: Outer,
    seen: Instant,
}

/// The table is full of live flows: a new one is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug)]
pub struct FlowTable {
    flows: HashMap<FlowKey, Flow>,
    capacity: usize,
    swept: Option<Instant>,
}

impl FlowTable {
    pub fn new(capacity: usize) -> FlowTable {
        FlowTable {
            flows: HashMap::new(),
            capacity,
            swept: None,
        }
    }

    /// Notes a packet of `key` from GWLB: its flow goes back behind
    /// `header`, to `outer`, from now on.
    pub fn learn(
        &mut self,
        key: FlowKey,
        header: Header,
        outer: Outer,
        now: Instant,
    ) -> Result<(), Full> {
        let flow = Flow {
            header,
            outer,
            seen: now,
        };
        if let Some(known) = self.flows.get_mut(&key) {
            *known = flow;
            return Ok(());
        }
        if self.flows.len() >= self.capacity {
            if self
                .swept
                .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY)
            {
                self.sweep(now);
            }
            if self.flows.len() >= self.capacity {
                return Err(Full);
            }
        }
        self.flows.insert(key, flow);
        Ok(())
    }

    /// The flow a packet toward a client belongs to, if it is known and
    /// live; its idle time starts again.
    pub fn answer(&mut self, key: &FlowKey, now: Instant) -> Option<Flow> {
        let flow = self.flows.get_mut(key)?;
        if now.saturating_duration_since(flow.seen) >= IDLE {
            self.flows.remove(key);
            return None;
        }
        flow.seen = now;
        Some(*flow)
    }

    /// Forgets every flow idle for [`IDLE`].
    pub fn sweep(&mut self, now: Instant) {
        self.swept = Some(now);
        self.flows
            .retain(|_, f| now.saturating_duration_since(f.seen) < IDLE);
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geneve::{Family, Options};
    use std::net::IpAddr;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: crate::packet::TCP,
            client: IpAddr::from([192, 0, 2, 2]),
            server: IpAddr::from([203, 0, 113, 20]),
            client_port: port,
            server_port: 443,
        }
    }

    fn header(cookie: u32) -> Header {
        let options = Options {
            eni: 1,
            attachment: 2,
            cookie,
        };
        Header::gwlb(options, Family::V4)
    }

    fn outer(port: u16) -> Outer {
        Outer {
            gwlb: SocketAddrV4::new([198, 51, 100, 9].into(), port),
            local: SocketAddrV4::new([198, 51, 100, 1].into(), crate::geneve::PORT),
        }
    }

    #[test]
    fn a_reused_five_tuple_goes_back_with_its_new_cookie() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10);
        table.learn(key(1), header(7), outer(50000), t0).unwrap();
        assert_eq!(table.answer(&key(1), t0).unwrap().header, header(7));
        // The same 5-tuple, a new flow: GWLB's new cookie, and its port.
        table.learn(key(1), header(8), outer(50001), t0).unwrap();
        let flow = table.answer(&key(1), t0).unwrap();
        assert_eq!((flow.header, flow.outer), (header(8), outer(50001)));
        assert_eq!(table.len(), 1);
        // A flow never seen from GWLB has nowhere to go.
        assert_eq!(table.answer(&key(2), t0), None);
    }

    #[test]
    fn an_idle_flow_is_forgotten_after_gwlbs_idle_timeout() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(10);
        table.learn(key(1), header(7), outer(1), t0).unwrap();
        table.learn(key(2), header(7), outer(1), t0).unwrap();
        // Answers keep a flow alive.
        let t1 = t0 + IDLE - Duration::from_secs(1);
        assert!(table.answer(&key(1), t1).is_some());
        let t2 = t0 + IDLE;
        assert!(table.answer(&key(2), t2).is_none());
        assert!(table.answer(&key(1), t2).is_some());
        table.sweep(t2 + IDLE);
        assert!(table.is_empty());
    }

    #[test]
    fn a_full_table_takes_no_new_flow_until_one_idles_out_and_sweeps_at_most_each_second() {
        let t0 = Instant::now();
        let mut table = FlowTable::new(3);
        for p in 0..3 {
            table.learn(key(p), header(1), outer(1), t0).unwrap();
        }
        assert_eq!(table.learn(key(9), header(1), outer(1), t0), Err(Full));
        // A known flow is still refreshed.
        table.learn(key(0), header(2), outer(1), t0).unwrap();
        // Once the others idle out, the next sweep (a second after the
        // last) makes room.
        let later = t0 + IDLE;
        table.answer(&key(0), later - Duration::from_secs(1));
        table.learn(key(9), header(1), outer(1), later).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table.learn(key(10), header(1), outer(1), later), Ok(()));
        assert_eq!(table.learn(key(11), header(1), outer(1), later), Err(Full));
    }
}
