use super::*;

pub(super) fn config(strategy: &str, instances: &str) -> Config {
    serde_yaml::from_str(&format!(
        "routing: {{strategy: {strategy}, circuit_failures: 2, circuit_open_seconds: 5, circuit_max_open_seconds: 12}}\ninstances:\n{instances}"
    ))
    .unwrap()
}

pub(super) fn two(extra_a: &str, extra_b: &str) -> Config {
    config(
        "failover",
        &format!(
            "  - {{name: a, api_key: k, api_base: 'http://a', priority: 1, supported_models: [m] {extra_a}}}\n  - {{name: b, api_key: k, api_base: 'http://b', priority: 2, supported_models: [m] {extra_b}}}\n"
        ),
    )
}

pub(super) fn at(t0: Instant, s: f64) -> Instant {
    t0 + Duration::from_secs_f64(s)
}

pub(super) fn healthy() -> Outcome {
    Outcome::Answered {
        status: 200,
        remaining_tokens: None,
        remaining_requests: None,
    }
}

pub(super) fn failed() -> Outcome {
    Outcome::Failed { status: 500 }
}

#[test]
fn each_line_takes_its_own_turns() {
    let inst = |name, model| {
        format!("  - {{name: {name}, api_key: k, api_base: 'http://{name}', supported_models: [{model}]}}\n")
    };
    let all = ["a", "b", "c", "d"].map(|n| inst(n, if n < "c" { "m1" } else { "m2" }));
    let t0 = Instant::now();
    for strategy in ["round_robin", "failover"] {
        let c = config(strategy, &all.concat());
        let mut t = Table::new(&c);
        let picks: Vec<usize> = (0..8)
            .map(|k| {
                let (model, candidates) = if k % 2 == 0 {
                    ("m1", [0, 1])
                } else {
                    ("m2", [2, 3])
                };
                t.admit(&c, &candidates, &[], (model, 1), t0).unwrap().index
            })
            .collect();
        assert_eq!(picks, [0, 2, 1, 3, 0, 2, 1, 3], "{strategy}");
    }
}

#[test]
fn a_shared_refusal_gives_the_room_back_and_holds_the_instance_out_here_too() {
    let c = two(", max_tpm: 1000", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let all = [0, 1];
    // Two requests admitted here at once; Redis refuses both, with different times.
    let first = t.admit(&c, &all, &[], ("m", 600), t0).unwrap();
    let second = t.admit(&c, &[0], &[], ("m", 300), t0).unwrap();
    assert_eq!((first.index, second.index), (0, 0));
    let full = Blocked::RateLimited {
        until: at(t0, 30.0),
    };
    t.hold(&c, first, Held::Cooling(at(t0, 30.0)));
    t.hold(&c, second, Held::Cooling(at(t0, 10.0)));
    assert_eq!(t.view(&c, t0)[0].current_tpm, 0, "reservations given back");
    assert_eq!(t.admit(&c, &all, &[], ("m", 600), t0).unwrap().index, 1);
    assert_eq!(
        t.admit(&c, &[0], &[], ("m", 1), at(t0, 20.0)),
        Err(full),
        "held out as by a cooldown, which only ever extends"
    );
    assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 30.0)).is_ok());
    // Another proxy's open circuit: down here until then.
    let a = t.admit(&c, &[0], &[], ("m", 1), at(t0, 32.0)).unwrap();
    let down = Blocked::Down {
        until: at(t0, 40.0),
    };
    t.hold(&c, a, Held::Down(at(t0, 40.0)));
    assert_eq!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 33.0)), Err(down));
    assert_eq!(t.view(&c, at(t0, 33.0))[0].health, Health::CircuitOpen);
    let a = t.admit(&c, &[0], &[], ("m", 1), at(t0, 40.0)).unwrap();
    // No room in the shared window for 600 tokens: requests that large are held
    // here, a smaller one may still go (Redis will say).
    let big = t.admit(&c, &[0], &[], ("m", 600), at(t0, 41.0)).unwrap();
    t.cancel(&c, a);
    t.hold(&c, big, Held::NoRoom(at(t0, 50.0)));
    assert_eq!(
        t.admit(&c, &[0], &[], ("m", 600), at(t0, 42.0)),
        Err(Blocked::RateLimited {
            until: at(t0, 50.0)
        })
    );
    assert!(t.admit(&c, &[0], &[], ("m", 100), at(t0, 42.0)).is_ok());
}

#[test]
fn tpm_full_spills_to_the_next_and_then_blocks_until_room() {
    let c = two(", max_tpm: 1000", ", max_tpm: 500");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let all = [0, 1];
    assert_eq!(t.admit(&c, &all, &[], ("m", 600), t0).unwrap().index, 0);
    assert_eq!(
        t.admit(&c, &all, &[], ("m", 300), at(t0, 1.0))
            .unwrap()
            .index,
        0
    );
    assert_eq!(
        t.admit(&c, &all, &[], ("m", 300), at(t0, 2.0))
            .unwrap()
            .index,
        1,
        "a is full"
    );
    assert_eq!(
        t.admit(&c, &all, &[], ("m", 300), at(t0, 3.0)),
        Err(Blocked::RateLimited {
            until: at(t0, 60.0)
        }),
        "a has room again when its first 600 leave at 60 s; b not before 62 s"
    );
    assert_eq!(
        t.admit(&c, &all, &[], ("m", 300), at(t0, 60.0))
            .unwrap()
            .index,
        0
    );
}

#[test]
fn a_refused_request_gives_its_reservation_back() {
    let c = two(", max_tpm: 1000", ", max_tpm: 1000");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let adm = t.admit(&c, &[0], &[], ("m", 900), t0).unwrap();
    t.finish(&c, adm, "m", Outcome::Unreachable { arrived: false }, t0);
    assert_eq!(
        t.admit(&c, &[0], &[], ("m", 900), t0).unwrap().index,
        0,
        "room again"
    );
    let adm = t.admit(&c, &[1], &[], ("m", 900), t0).unwrap();
    t.finish(&c, adm, "m", failed(), t0);
    assert!(
        t.admit(&c, &[1], &[], ("m", 900), t0).is_err(),
        "a 5xx keeps its reservation"
    );
}

#[test]
fn cooldown_follows_retry_after_and_only_extends() {
    let c = two("", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let adm = t.admit(&c, &[0], &[], ("m", 1), t0).unwrap();
    t.finish(
        &c,
        adm,
        "m",
        Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        },
        t0,
    );
    assert_eq!(
        t.admit(&c, &[0, 1], &[], ("m", 1), at(t0, 1.0))
            .unwrap()
            .index,
        1
    );
    // A later 429 with a shorter wait does not shorten the cooldown.
    let mut t2 = Table::new(&c);
    let adm = t2.admit(&c, &[0], &[], ("m", 1), t0).unwrap();
    t2.finish(
        &c,
        adm,
        "m",
        Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(30)),
        },
        t0,
    );
    t2.runtimes.get_mut("a").unwrap().circuit = Circuit::Closed;
    let fake = Admission {
        index: 0,
        at: at(t0, 1.0),
        tokens: 1,
        epoch: t2.runtimes["a"].epoch,
        trial: false,
    };
    t2.finish(
        &c,
        fake,
        "m",
        Outcome::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
        },
        at(t0, 1.0),
    );
    assert_eq!(
        t2.admit(&c, &[0], &[], ("m", 1), at(t0, 5.0)),
        Err(Blocked::RateLimited {
            until: at(t0, 30.0)
        })
    );
    assert!(
        t2.admit(&c, &[0], &[], ("m", 1), at(t0, 30.0)).is_ok(),
        "back after 30 s"
    );
    let adm = Admission {
        index: 1,
        at: t0,
        tokens: 1,
        epoch: t2.runtimes["b"].epoch,
        trial: false,
    };
    t2.finish(&c, adm, "m", Outcome::RateLimited { retry_after: None }, t0);
    assert!(t2.admit(&c, &[1], &[], ("m", 1), at(t0, 9.9)).is_err());
    assert!(
        t2.admit(&c, &[1], &[], ("m", 1), at(t0, 10.0)).is_ok(),
        "default cooldown is 10 s"
    );
}

#[test]
fn rate_limited_is_reported_over_down_and_tried_instances_are_skipped() {
    let c = two(", max_tpm: 100", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    t.admit(&c, &[0], &[], ("m", 100), t0).unwrap();
    t.runtimes.get_mut("b").unwrap().circuit = Circuit::Open {
        until: at(t0, 5.0),
        backoff: Duration::from_secs(5),
    };
    assert_eq!(
        t.admit(&c, &[0, 1], &[], ("m", 10), at(t0, 1.0)),
        Err(Blocked::RateLimited {
            until: at(t0, 60.0)
        })
    );
    assert_eq!(
        t.admit(&c, &[0, 1], &[0], ("m", 10), at(t0, 1.0)),
        Err(Blocked::Down { until: at(t0, 5.0) })
    );
    assert_eq!(
        t.admit(&c, &[0, 1], &[0, 1], ("m", 10), at(t0, 1.0)),
        Err(Blocked::Down { until: at(t0, 1.0) })
    );
}

#[test]
fn upstream_remaining_headers_fill_the_local_window() {
    let c = two(", max_tpm: 1000, max_rpm: 10", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let adm = t.admit(&c, &[0], &[], ("m", 10), t0).unwrap();
    t.finish(
        &c,
        adm,
        "m",
        Outcome::Answered {
            status: 200,
            remaining_tokens: Some(5),
            remaining_requests: Some(3),
        },
        t0,
    );
    assert_eq!(
        t.admit(&c, &[0], &[], ("m", 10), t0),
        Err(Blocked::RateLimited {
            until: at(t0, 60.0)
        })
    );
    assert!(
        t.admit(&c, &[0], &[], ("m", 5), t0).is_ok(),
        "exactly the remaining 5 fit"
    );
}

#[test]
fn state_follows_the_name_across_a_new_config() {
    let c = two(", max_tpm: 1000", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    let before = t.admit(&c, &[0], &[], ("m", 1000), t0).unwrap();
    // The reloaded config lists b first and a second, and drops nothing.
    let swapped = config(
        "failover",
        "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n  - {name: a, api_key: k, api_base: 'http://a', max_tpm: 1000, supported_models: [m]}\n",
    );
    t.update(&swapped);
    assert_eq!(
        t.admit(&swapped, &[1], &[], ("m", 1), t0),
        Err(Blocked::RateLimited {
            until: at(t0, 60.0)
        }),
        "a's window came along"
    );
    let only_b = config(
        "failover",
        "  - {name: b, api_key: k, api_base: 'http://b', supported_models: [m]}\n",
    );
    t.update(&only_b);
    assert_eq!(
        t.admit(&swapped, &[1], &[], ("m", 1), t0),
        Err(Blocked::Down { until: t0 }),
        "a request on the old configuration cannot reach a removed instance"
    );
    t.update(&swapped);
    // The request admitted before a was removed fails late: it must not touch the
    // new a.
    let late = t.finish(&c, before, "m", Outcome::Unreachable { arrived: false }, t0);
    assert_eq!(late, Finished::default());
    assert_eq!(t.runtimes["a"].last_error, None);
    assert!(
        t.admit(&swapped, &[1], &[], ("m", 1000), t0).is_ok(),
        "a removed and re-added starts afresh"
    );
}

#[test]
fn rpm_limits_requests() {
    let c = two(", max_rpm: 2", "");
    let mut t = Table::new(&c);
    let t0 = Instant::now();
    assert!(t.admit(&c, &[0], &[], ("m", 1), t0).is_ok());
    assert!(t.admit(&c, &[0], &[], ("m", 1), at(t0, 1.0)).is_ok());
    assert_eq!(
        t.admit(&c, &[0], &[], ("m", 1), at(t0, 2.0)),
        Err(Blocked::RateLimited {
            until: at(t0, 60.0)
        })
    );
}
