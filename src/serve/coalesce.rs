//! One upstream question per key at a time: while a request (the leader) asks
//! upstream about a tag or a repository, concurrent requests for the same key
//! wait for its outcome instead of each asking again, then decide from what
//! the leader learnt. 500 clients resolving `alpine:3.20` at once make one
//! upstream `HEAD`, not 500.
//!
//! A leader that is dropped before it finishes (its client went away) lets
//! its followers go on with no outcome; they then ask for themselves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

type Flights<T> = Arc<Mutex<HashMap<String, watch::Receiver<Option<T>>>>>;

/// The questions in flight, by key, each ending with an outcome `T`.
pub struct Coalescer<T> {
    flights: Flights<T>,
}

impl<T> Default for Coalescer<T> {
    fn default() -> Self {
        Self {
            flights: Arc::default(),
        }
    }
}

/// A request's part in a flight.
pub enum Turn<T> {
    /// Nobody is asking: this request asks, then calls [`Lead::finish`].
    Lead(Lead<T>),
    /// Someone is asking: wait with [`Follow::outcome`].
    Follow(Follow<T>),
}

/// The duty to ask upstream and report the outcome.
pub struct Lead<T> {
    flights: Flights<T>,
    key: String,
    tx: watch::Sender<Option<T>>,
}

/// A wait for the leader's outcome.
pub struct Follow<T> {
    rx: watch::Receiver<Option<T>>,
}

fn lock<T>(flights: &Flights<T>) -> MutexGuard<'_, HashMap<String, watch::Receiver<Option<T>>>> {
    flights.lock().unwrap_or_else(|p| p.into_inner())
}

impl<T: Clone> Coalescer<T> {
    /// Joins the flight for `key`, or starts it.
    pub fn join(&self, key: String) -> Turn<T> {
        let mut flights = lock(&self.flights);
        if let Some(rx) = flights.get(&key) {
            return Turn::Follow(Follow { rx: rx.clone() });
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), rx);
        Turn::Lead(Lead {
            flights: self.flights.clone(),
            key,
            tx,
        })
    }

    /// Number of flights under way.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

impl<T> Lead<T> {
    /// Hands `outcome` to every follower and ends the flight.
    pub fn finish(self, outcome: T) {
        self.tx.send_replace(Some(outcome));
    }
}

impl<T> Drop for Lead<T> {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        let ours = flights
            .get(&self.key)
            .is_some_and(|rx| rx.same_channel(&self.tx.subscribe()));
        if ours {
            flights.remove(&self.key);
        }
    }
}

impl<T: Clone> Follow<T> {
    /// The leader's outcome; None if the leader gave up without one.
    pub async fn outcome(mut self) -> Option<T> {
        match self.rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_requests_share_one_leader_and_its_outcome() {
        let coalescer = Arc::new(Coalescer::<u32>::default());
        let asked = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (coalescer, asked) = (coalescer.clone(), asked.clone());
            tasks.push(tokio::spawn(async move {
                match coalescer.join("docker.io/library/alpine:3.20".into()) {
                    Turn::Lead(lead) => {
                        asked.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        lead.finish(7);
                        Some(7)
                    }
                    Turn::Follow(follow) => follow.outcome().await,
                }
            }));
        }
        for task in tasks {
            assert_eq!(task.await.expect("task"), Some(7));
        }
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        assert_eq!(coalescer.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_followers_without_an_outcome() {
        let coalescer = Coalescer::<u32>::default();
        let Turn::Lead(lead) = coalescer.join("k".into()) else {
            panic!("first join must lead");
        };
        let Turn::Follow(follow) = coalescer.join("k".into()) else {
            panic!("second join must follow");
        };
        drop(lead);
        assert_eq!(follow.outcome().await, None);
        assert!(matches!(coalescer.join("k".into()), Turn::Lead(_)));
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let coalescer = Coalescer::<u32>::default();
        let a = coalescer.join("a".into());
        let b = coalescer.join("b".into());
        assert!(matches!(a, Turn::Lead(_)));
        assert!(matches!(b, Turn::Lead(_)));
        assert_eq!(coalescer.in_flight(), 2);
        drop((a, b));
        assert_eq!(coalescer.in_flight(), 0);
    }
}
