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
//! over to it ([`Workers::place`], [`hand_over`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many connections each worker serves now.
#[derive(Debug)]
pub struct Workers {
    live: Box<[Count]>,
}

/// One worker's count, on a cache line of its own: each worker changes
/// its own at every accept and close, and with the counts side by side
/// every such write would also take the line that holds all the others'.
/// (The reads at each placement still fetch the others' lines.)
#[derive(Debug, Default)]
#[repr(align(64))]
struct Count(AtomicUsize);

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
        self.workers.live[self.worker]
            .0
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    pub fn new(count: usize) -> Arc<Workers> {
        Arc::new(Workers {
            live: (0..count.max(1)).map(|_| Count::default()).collect(),
        })
    }

    /// Where a connection accepted by worker `accepted_by` is served: there,
    /// unless [`hand_over`] says the least loaded worker should take it.
    /// The counts are read without a lock; two workers placing at the same
    /// moment may both pick the same one, which the next placements even
    /// out.
    pub fn place(self: &Arc<Self>, accepted_by: usize) -> Place {
        let load = |i: usize| self.live[i].0.load(Ordering::Relaxed);
        let (least, least_load) = (0..self.live.len())
            .map(|i| (i, load(i)))
            .min_by_key(|&(_, n)| n)
            .unwrap_or((accepted_by, 0));
        let worker = if hand_over(load(accepted_by), least_load) {
            least
        } else {
            accepted_by
        };
        self.live[worker].0.fetch_add(1, Ordering::Relaxed);
        Place {
            workers: self.clone(),
            worker,
        }
    }

    /// Connections each worker serves now.
    pub fn live(&self) -> Vec<usize> {
        self.live
            .iter()
            .map(|n| n.0.load(Ordering::Relaxed))
            .collect()
    }
}

/// Whether a worker serving `mine` connections hands a new one to a worker
/// serving `least`: when it serves more than that by more than `least²/16`.
///
/// While the workers serve a few connections each, the slack is none or
/// one, so a few heavy flows end up spread one by one. It grows with the
/// square of the count because the kernel's hash needs no help with many:
/// the split of n connections wanders by about √n either way, a shrinking
/// share of n, and each hand-over costs system calls (the socket leaves
/// one event loop for another, and the other worker is woken). Measured at
/// 64 clients making short connections: 18% of them handed over with a
/// slack of a quarter of `least`, 3% with this one.
pub fn hand_over(mine: usize, least: usize) -> bool {
    mine > least + least * least / 16
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
    fn the_slack_grows_with_the_square_of_the_count() {
        assert!(!hand_over(0, 0));
        assert!(hand_over(1, 0));
        assert!(!hand_over(3, 3));
        assert!(hand_over(4, 3));
        assert!(!hand_over(5, 4));
        assert!(hand_over(6, 4));
        assert!(!hand_over(12, 8));
        assert!(hand_over(13, 8));
        assert!(!hand_over(96, 32));
        assert!(hand_over(97, 32));
    }

    #[test]
    fn a_pool_within_its_slack_keeps_its_connections_where_they_land() {
        let pool = Workers::new(2);
        let held: Vec<Place> = (0..16).map(|i| pool.place(i % 2)).collect();
        assert_eq!(pool.live(), vec![8, 8]);
        // A few more on one side stay there: within 8²/16.
        let more: Vec<Place> = (0..5).map(|_| pool.place(1)).collect();
        assert!(more.iter().all(|p| p.worker() == 1));
        assert_eq!(pool.live(), vec![8, 13]);
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
