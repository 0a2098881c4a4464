//! Endpoint choice, one for the node tunnel (per connection) and the waypoint (per
//! request). The endpoints are a Service's as the state lists them: ready ones only
//! (pods with an address, EndpointSlice addresses not marked unready), or a
//! waypoint's pods; they are taken in round robin per [`Turn`] (per Service VIP in
//! the waypoint), and the attempts of one connection or request try each endpoint
//! at most once, so a retry never goes back to the one that failed.

use std::{collections::HashMap, hash::Hash, net::Ipv4Addr, sync::Mutex};

/// What the node tunnel keeps a turn for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Turn {
    /// The endpoints of the Service at this VIP.
    Service(Ipv4Addr),
    /// The pods of the waypoint (namespace, name).
    Waypoint(String, String),
}

/// Round robin per key: a Service VIP, or a [`Turn`].
pub struct Balancer<K = Ipv4Addr> {
    /// The next position per key (a new key starts at a random one, so that
    /// proxies started together do not all begin with the same endpoint).
    next: Mutex<HashMap<K, usize>>,
}

impl<K> Default for Balancer<K> {
    fn default() -> Self {
        Self {
            next: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone> Balancer<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// The order in which to try the `endpoints` kept under `key`: from the next
    /// in turn, each once. Each call moves the turn on by one.
    pub fn attempts<'a, T>(&self, key: &K, endpoints: &'a [T]) -> Attempts<'a, T> {
        let start = match endpoints.len() {
            0 => 0,
            len => {
                let mut next = self.next.lock().expect("not poisoned");
                // Cloned only for a key seen the first time.
                let slot = match next.get_mut(key) {
                    Some(slot) => slot,
                    None => next.entry(key.clone()).or_insert(fastrand::usize(..len)),
                };
                let start = *slot % len;
                *slot = start + 1;
                start
            }
        };
        Attempts {
            endpoints,
            start,
            taken: 0,
        }
    }

    /// The endpoint in turn, for a connection made once.
    pub fn pick<'a, T>(&self, key: &K, endpoints: &'a [T]) -> Option<&'a T> {
        self.attempts(key, endpoints).next()
    }
}

/// The endpoints of one connection or request, in the order to try them.
pub struct Attempts<'a, T> {
    endpoints: &'a [T],
    start: usize,
    taken: usize,
}

impl<'a, T> Iterator for Attempts<'a, T> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        let len = self.endpoints.len();
        if self.taken == len {
            return None;
        }
        let endpoint = &self.endpoints[(self.start + self.taken) % len];
        self.taken += 1;
        Some(endpoint)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.endpoints.len() - self.taken;
        (left, Some(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
    const OTHER: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 2);

    #[test]
    fn endpoints_are_taken_in_turn_and_evenly() {
        let balancer = Balancer::<Ipv4Addr>::new();
        let endpoints = ["a", "b", "c"];
        let first = *balancer.pick(&VIP, &endpoints).unwrap();
        let start = endpoints.iter().position(|e| *e == first).unwrap();
        let mut counts = HashMap::new();
        for i in 1..300 {
            let picked = *balancer.pick(&VIP, &endpoints).unwrap();
            assert_eq!(picked, endpoints[(start + i) % 3], "round robin");
            *counts.entry(picked).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|&n| n >= 99), "{counts:?}");
    }

    #[test]
    fn a_retry_goes_to_another_endpoint_and_each_is_tried_once() {
        let balancer = Balancer::<Ipv4Addr>::new();
        let endpoints = [1, 2, 3, 4];
        for _ in 0..8 {
            let tried: Vec<i32> = balancer.attempts(&VIP, &endpoints).copied().collect();
            assert_eq!(tried.len(), 4);
            let mut sorted = tried.clone();
            sorted.sort();
            assert_eq!(sorted, endpoints, "each once: {tried:?}");
            let mut attempts = balancer.attempts(&VIP, &endpoints);
            let (failed, retry) = (attempts.next().unwrap(), attempts.next().unwrap());
            assert_ne!(failed, retry);
        }
    }

    #[test]
    fn no_endpoint_gives_no_attempt_and_services_keep_their_own_turn() {
        let balancer = Balancer::<Ipv4Addr>::new();
        assert!(balancer.pick::<u8>(&VIP, &[]).is_none());
        assert_eq!(balancer.attempts::<u8>(&VIP, &[]).count(), 0);
        let endpoints = ["a", "b"];
        let first = *balancer.pick(&VIP, &endpoints).unwrap();
        // Another Service's traffic does not move this one's turn.
        for _ in 0..3 {
            balancer.pick(&OTHER, &endpoints);
        }
        assert_ne!(*balancer.pick(&VIP, &endpoints).unwrap(), first);
        // When the endpoints shrink the turn stays within them.
        for _ in 0..5 {
            assert_eq!(*balancer.pick(&VIP, &endpoints[..1]).unwrap(), "a");
        }
    }

    #[test]
    fn a_waypoints_pods_take_turns_apart_from_its_services_endpoints() {
        let balancer = Balancer::<Turn>::new();
        let waypoint = Turn::Waypoint("demo".into(), "waypoint".into());
        let other = Turn::Waypoint("demo".into(), "other".into());
        let pods = ["w1", "w2"];
        let first = *balancer.pick(&waypoint, &pods).unwrap();
        // The Service's turn and another waypoint's do not move this one's.
        balancer.pick(&Turn::Service(VIP), &pods);
        balancer.pick(&other, &pods);
        let picked: Vec<&str> = (0..4)
            .map(|_| *balancer.pick(&waypoint, &pods).unwrap())
            .collect();
        assert_ne!(picked[0], first, "in turn: {picked:?}");
        assert_eq!(picked[0], picked[2]);
        assert_eq!(picked[1], picked[3]);
        assert_ne!(picked[0], picked[1], "both pods get connections");
    }
}
