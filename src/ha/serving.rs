//! Which gateways can serve: the facts of one EC2 reading that both the
//! ownership rule ([`super::decide`]) and the rollout gate
//! ([`super::rollout`]) stand on.

use super::fleet::{Az, Fleet, Gateway, Layout, Millis, Phase};
use std::time::Duration;

/// How long a challenged gateway has to answer through the EC2 API.
/// Three polls of [`POLL_EVERY`](super::decide::POLL_EVERY), so one slow or throttled read is not fatal.
pub const ANSWER_WINDOW: Duration = Duration::from_secs(6);
/// Challenged, and the answer window has not yet run out.
pub fn pending(g: &Gateway) -> bool {
    g.challenge
        .as_ref()
        .is_some_and(|c| g.alive.is_none_or(|a| a < c.at))
}

/// Challenged and silent for the whole window.
pub fn dead(g: &Gateway, now: Millis) -> bool {
    pending(g)
        && g.challenge
            .as_ref()
            .is_some_and(|c| now >= c.at.plus(ANSWER_WINDOW))
}

pub fn candidate(g: &Gateway, now: Millis) -> bool {
    g.running && g.state.is_some_and(|s| s.phase == Phase::Ready) && !dead(g, now)
}

/// Every AZ of the layout and the fleet, in name order: the order AZs
/// fail over in and roll out in.
pub fn azs<'f>(layout: &'f Layout, fleet: &'f Fleet) -> Vec<&'f Az> {
    let mut azs: Vec<&Az> = layout.tables.keys().collect();
    azs.extend(fleet.gateways.iter().map(|g| &g.az));
    azs.sort();
    azs.dedup();
    azs
}
