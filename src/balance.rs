//! Spreading connections over the connection workers.
//!
//! SO_REUSEPORT hashes each new connection to one worker's listener. Over
//! many connections that evens out; over a few long, heavy ones (the eight
//! parallel streams of one backup) it often does not, and one worker then
//! moves them all on one core while another idles. Measured on a 2-core
//! machine, eight streams in twelve runs: one run put all eight on one
//! worker and two more put five or six on one side, and those moved 6 to
//! 12% less than the even ones. So a worker that serves clearly more
//! connections than the least loaded one hands a newly accepted connection
//! over to it ([`Workers::place`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many connections each worker serves now.
#[derive(Debug)]
pub struct Workers {
    live: Box<[AtomicUsize]>,
}

/// A connection's place on the worker that serves it, given back on drop.
#[derive(Debug)]
pub struct Place {
    workers: Arc<Workers>,
    worker: usize,
}

impl Place {
    /// The worker that serves the connection.
    pub fn worker(&self) -> usize {
        self.worker
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.workers.live[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    pub fn new(count: usize) -> Arc<Workers> {
        Arc::new(Workers {
            live: (0..count.max(1)).map(|_| AtomicUsize::new(0)).collect(),
        })
    }

    /// Where a connection accepted by worker `accepted_by` is served: there,
    /// unless [`hand_over`] says the least loaded worker should take it.
    /// The counts are read without a lock; two workers placing at the same
    /// moment may both pick the same one, which the next placements even
    /// out.
    pub fn place(self: &Arc<Self>, accepted_by: usize) -> Place {
        let load = |i: usize| self.live[i].load(Ordering::Relaxed);
        let (least, least_load) = (0..self.live.len())
            .map(|i| (i, load(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((accepted_by, 0));
        let worker = if hand_over(load(accepted_by), least_load) {
            least
        } else {
            accepted_by
        };
        self.live[worker].fetch_add(1, Ordering::Relaxed);
        Place {
            workers: self.clone(),
            worker,
        }
    }

    /// Connections each worker serves now.
    pub fn live(&self) -> Vec<usize> {
        self.live
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

/// Whether a worker serving `mine` connections hands a new one to a worker
/// serving `least`: when it serves more than that, by more than a quarter
/// of it. A few heavy flows so end up spread one by one, while under many
/// short connections, whose counts wander by a few either way, a worker
/// hands over only when it has fallen well behind (each hand-over moves
/// the socket between two event loops and wakes the other worker).
pub fn hand_over(mine: usize, least: usize) -> bool {
    mine > least + least / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_flows_accepted_by_one_worker_are_spread_evenly() {
        for workers in [2, 3, 4, 8] {
            let pool = Workers::new(workers);
            let places: Vec<Place> = (0..2 * workers).map(|_| pool.place(0)).collect();
            assert_eq!(pool.live(), vec![2; workers], "{workers} workers");
            drop(places);
            assert_eq!(pool.live(), vec![0; workers], "places given back");
        }
    }

    #[test]
    fn many_connections_hand_over_only_past_a_quarter() {
        assert!(!hand_over(0, 0));
        assert!(hand_over(1, 0));
        assert!(!hand_over(40, 32));
        assert!(hand_over(41, 32));
        assert!(!hand_over(1000, 800));
        assert!(hand_over(1001, 800));
    }

    #[test]
    fn a_balanced_pool_keeps_its_connections_where_they_land() {
        let pool = Workers::new(2);
        let held: Vec<Place> = (0..60).map(|i| pool.place(i % 2)).collect();
        assert_eq!(pool.live(), vec![30, 30]);
        // A few more on one side stay there: within a quarter.
        let more: Vec<Place> = (0..8).map(|_| pool.place(1)).collect();
        assert!(more.iter().all(|p| p.worker() == 1));
        assert_eq!(pool.live(), vec![30, 38]);
        // Past it, the next goes over.
        assert_eq!(pool.place(1).worker(), 0);
        drop((held, more));
    }

    #[test]
    fn one_worker_serves_everything() {
        let pool = Workers::new(1);
        let p = pool.place(0);
        assert_eq!(p.worker(), 0);
        assert_eq!(pool.place(0).worker(), 0);
    }
}
