//! Randomised exploration of a ranked list, the intervention that lets
//! position bias be estimated from the traffic itself.
//!
//! For a share of requests (`rate`), one adjacent pair `(k, k+1)`, `k`
//! drawn uniformly from `1..min(depth, n)`, is swapped before the person sees
//! the list; the impression records the model's rank of the two moved
//! results in [`ResultItem::model_rank`]. The same (query, image) is then
//! seen at two neighbouring ranks, which is what intervention harvesting
//! (Joachims et al., WSDM 2017; Agarwal et al., WSDM 2019) needs, at the cost
//! of one swap of neighbours for the explored requests. The estimator is
//! `kalon_align::propensity`.
//!
//! The decision is a pure function of the request id (FNV-1a + SplitMix64),
//! so it is reproducible and the simulator and tests run the very code
//! search runs.

use crate::ResultItem;

/// How much of the traffic is explored, and how deep in the list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exploration {
    /// Share of requests whose list gets one adjacent swap, in [0, 1].
    pub rate: f64,
    /// Only ranks `1..=depth` take part (`k + 1 <= depth`); at least 2.
    pub depth: u32,
}

impl Default for Exploration {
    /// Off: no request is explored.
    fn default() -> Self {
        Exploration {
            rate: 0.0,
            depth: 10,
        }
    }
}

impl Exploration {
    /// Checked settings: `rate` in [0, 1], `depth` at least 2.
    pub fn new(rate: f64, depth: u32) -> Result<Exploration, String> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(format!("explore rate {rate} is not in [0, 1]"));
        }
        if depth < 2 {
            return Err(format!("explore depth {depth} is less than 2"));
        }
        Ok(Exploration { rate, depth })
    }

    /// The 1-based rank `k` whose result swaps places with rank `k + 1` for
    /// the request `request_id` answered with `results` items, or `None`
    /// when this request is not explored (or the list is too short).
    pub fn swap_for(&self, request_id: &str, results: usize) -> Option<u32> {
        let reach = results.min(self.depth as usize);
        if reach < 2 || self.rate <= 0.0 {
            return None;
        }
        let h = mix(fnv1a(request_id.as_bytes()));
        // 53 bits give a uniform draw in [0, 1)
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        if u >= self.rate {
            return None;
        }
        let k = mix(h ^ 0x9e37_79b9_7f4a_7c15) % (reach as u64 - 1);
        Some(k as u32 + 1)
    }
}

/// Swaps the items at ranks `k` and `k + 1` (1-based) of `items`, if a swap
/// is given and both exist.
pub fn apply_swap<T>(items: &mut [T], swap: Option<u32>) {
    if let Some(k) = swap {
        let k = k as usize;
        if k >= 1 && k < items.len() {
            items.swap(k - 1, k);
        }
    }
}

/// The impression's items for results in the model's order with `swap`
/// applied: `(image_id, score)` per model rank, returned in the order shown,
/// with `rank` the shown rank and `model_rank` set on the two moved items.
pub fn shown_items(ranked: Vec<(String, f64)>, swap: Option<u32>) -> Vec<ResultItem> {
    let mut items: Vec<(u32, String, f64)> = ranked
        .into_iter()
        .enumerate()
        .map(|(i, (image_id, score))| (i as u32 + 1, image_id, score))
        .collect();
    apply_swap(&mut items, swap);
    items
        .into_iter()
        .enumerate()
        .map(|(i, (model_rank, image_id, score))| {
            let rank = i as u32 + 1;
            ResultItem {
                image_id,
                rank,
                score,
                model_rank: (model_rank != rank).then_some(model_rank),
                team: None,
            }
        })
        .collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("req-{i}")).collect()
    }

    #[test]
    fn settings_are_checked() {
        assert!(Exploration::new(0.0, 10).is_ok());
        assert!(Exploration::new(1.0, 2).is_ok());
        assert!(Exploration::new(1.01, 10).is_err());
        assert!(Exploration::new(-0.1, 10).is_err());
        assert!(Exploration::new(f64::NAN, 10).is_err());
        assert!(Exploration::new(0.5, 1).is_err());
    }

    #[test]
    fn rate_zero_never_and_rate_one_always_swaps_within_the_depth() {
        let off = Exploration::default();
        let all = Exploration::new(1.0, 4).unwrap();
        let mut seen = [0u32; 3];
        for id in ids(3_000) {
            assert_eq!(off.swap_for(&id, 10), None);
            let k = all.swap_for(&id, 10).expect("every request explored");
            assert!((1..=3).contains(&k), "{k}");
            seen[k as usize - 1] += 1;
            // a list shorter than the depth bounds k too
            assert_eq!(all.swap_for(&id, 2), Some(1));
            assert_eq!(all.swap_for(&id, 1), None);
        }
        // uniform over 1..=3: each about 1,000 of 3,000
        assert!(seen.iter().all(|&n| (900..1_100).contains(&n)), "{seen:?}");
    }

    #[test]
    fn the_share_explored_follows_the_rate_and_is_the_same_every_time() {
        let some = Exploration::new(0.1, 10).unwrap();
        let explored = ids(20_000)
            .iter()
            .filter(|id| some.swap_for(id, 10).is_some())
            .count();
        assert!((1_800..2_200).contains(&explored), "{explored}");
        for id in ids(100) {
            assert_eq!(some.swap_for(&id, 10), some.swap_for(&id, 10));
        }
    }

    #[test]
    fn shown_items_swap_one_pair_and_name_the_model_ranks() {
        let ranked: Vec<(String, f64)> = ["a", "b", "c", "d"]
            .iter()
            .zip([0.9, 0.8, 0.7, 0.6])
            .map(|(id, s)| ((*id).to_owned(), s))
            .collect();
        let shown = shown_items(ranked.clone(), Some(2));
        let view: Vec<(&str, u32, Option<u32>, f64)> = shown
            .iter()
            .map(|r| (r.image_id.as_str(), r.rank, r.model_rank, r.score))
            .collect();
        assert_eq!(
            view,
            [
                ("a", 1, None, 0.9),
                ("c", 2, Some(3), 0.7),
                ("b", 3, Some(2), 0.8),
                ("d", 4, None, 0.6)
            ]
        );
        let plain = shown_items(ranked, None);
        assert!(plain.iter().all(|r| r.model_rank.is_none()));
        assert_eq!(plain[1].image_id, "b");
        let mut list = vec![1, 2, 3];
        apply_swap(&mut list, Some(3));
        assert_eq!(list, [1, 2, 3], "no rank 4 to swap with");
    }
}
