//! The strategies that pick one instance among those eligible right now (DESIGN §6).
//! Pure functions over indexes into `config.instances`; the state they read is passed
//! in by `table::Table`.

use crate::config::Instance;

/// The first of `group` (in config order) after `last`, wrapping around: a rotation
/// that stays exact when the group changes between calls.
pub fn rotate(group: &[usize], last: Option<usize>) -> usize {
    last.and_then(|l| group.iter().copied().find(|&i| i > l))
        .unwrap_or(group[0])
}

/// Lowest `priority` value; equals take turns (as `rotate` does).
pub fn failover(instances: &[Instance], eligible: &[usize], last: Option<usize>) -> usize {
    let best = eligible
        .iter()
        .map(|&i| instances[i].priority)
        .min()
        .unwrap_or(0);
    let tied = || {
        eligible
            .iter()
            .copied()
            .filter(move |&i| instances[i].priority == best)
    };
    last.and_then(|l| tied().find(|&i| i > l))
        .or_else(|| tied().next())
        .unwrap_or(eligible[0])
}

/// Random by `weight`; `r` is a uniformly random number.
pub fn weighted(instances: &[Instance], eligible: &[usize], r: u64) -> usize {
    let total: u64 = eligible
        .iter()
        .map(|&i| u64::from(instances[i].weight))
        .sum();
    let mut pick = r % total.max(1);
    for &i in eligible {
        let w = u64::from(instances[i].weight);
        if pick < w {
            return i;
        }
        pick -= w;
    }
    eligible[0]
}

/// Lowest TPM utilisation (`load[k]` belongs to `eligible[k]`); equals go by failover.
pub fn least_loaded(
    instances: &[Instance],
    eligible: &[usize],
    load: &[f64],
    last: Option<usize>,
) -> usize {
    let min = load.iter().copied().fold(f64::INFINITY, f64::min);
    let least: Vec<usize> = eligible
        .iter()
        .zip(load)
        .filter(|(_, l)| **l <= min)
        .map(|(i, _)| *i)
        .collect();
    failover(instances, &least, last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config() -> Config {
        serde_yaml::from_str(
            "instances:
  - {name: a, api_key: k, api_base: 'http://a', priority: 5, weight: 3, supported_models: [m]}
  - {name: b, api_key: k, api_base: 'http://b', priority: 1, weight: 1, supported_models: [m]}
  - {name: c, api_key: k, api_base: 'http://c', priority: 5, weight: 1, supported_models: [m]}
  - {name: d, api_key: k, api_base: 'http://d', priority: 0, supported_models: [other]}
",
        )
        .unwrap()
    }

    #[test]
    fn rotation_is_exact_and_wraps() {
        let order: Vec<usize> = (0..6)
            .scan(None, |last, _| {
                let next = rotate(&[0, 2, 5], *last);
                *last = Some(next);
                Some(next)
            })
            .collect();
        assert_eq!(order, [0, 2, 5, 0, 2, 5]);
        assert_eq!(
            rotate(&[0, 5], Some(2)),
            5,
            "continues after the last pick even if it left the group"
        );
    }

    #[test]
    fn failover_prefers_low_priority_and_rotates_ties() {
        let c = config();
        assert_eq!(failover(&c.instances, &[0, 1, 2], None), 1);
        assert_eq!(failover(&c.instances, &[0, 2], None), 0);
        assert_eq!(failover(&c.instances, &[0, 2], Some(0)), 2);
        assert_eq!(failover(&c.instances, &[0, 2], Some(2)), 0);
    }

    #[test]
    fn weighted_maps_random_numbers_by_weight() {
        let c = config();
        let picks: Vec<usize> = (0..5)
            .map(|r| weighted(&c.instances, &[0, 1, 2], r))
            .collect();
        assert_eq!(picks, [0, 0, 0, 1, 2], "weights 3, 1, 1");
    }

    #[test]
    fn least_loaded_picks_the_emptiest() {
        let c = config();
        assert_eq!(
            least_loaded(&c.instances, &[0, 1, 2], &[0.5, 0.7, 0.1], None),
            2
        );
        assert_eq!(
            least_loaded(&c.instances, &[0, 1, 2], &[0.2, 0.2, 0.9], None),
            1,
            "tie: priority"
        );
    }
}
