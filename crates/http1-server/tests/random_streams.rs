//! Random and mutated byte streams against a real server. Whatever a client sends: no
//! panic, no allocation sized by a number it declared, never two requests read out of
//! one, and every error answer in OpenAI's JSON shape.
//!
//! The generator is a hand-rolled xorshift rather than a property-testing crate: the
//! cases are cheap to make, a failing one is printed whole with its seed, and the test
//! adds no dependency to build on the proxy's busy CI machines.

mod common;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest single allocation the process made.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
static PANICS: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call goes to `System` unchanged; only the size is recorded.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// No allocation of the server's may reach this: its largest buffer is a 64 KiB head.
/// The numbers the cases declare go far beyond it.
const ALLOCATION_CAP: usize = 1 << 20;
const CASES: usize = 4000;
/// The run stops here, whatever is left of its cases (a busy machine is slow).
const TIME_LIMIT: Duration = Duration::from_secs(20);
const AT_LEAST: usize = 500;

/// xorshift64*: reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn pick<T: Clone>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())].clone()
    }
}

const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

/// Valid requests, alone or pipelined, that mutations start from.
fn valid(rng: &mut Rng) -> Vec<u8> {
    let body = "x".repeat(rng.below(300));
    let chunked = format!(
        "{:x};ext=1\r\n{body}\r\n3\r\nabc\r\n0\r\nTrailer: t\r\n\r\n",
        body.len()
    );
    let one = match rng.below(7) {
        0 => "GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
        1 => format!(
            "POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        2 => format!("POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}"),
        3 => format!(
            "PUT /p HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        4 => format!(
            "POST /e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        5 => format!("GET /status/{} HTTP/1.1\r\n\r\n", rng.pick(&[100, 204, 304, 404])),
        _ => format!(
            "GET /h HTTP/1.1\r\nX: {}\r\n\r\n",
            "v".repeat(rng.pick(&[10, 16 * 1024, 70 * 1024]))
        ),
    };
    if rng.below(4) == 0 {
        format!("{one}{}", "GET /second HTTP/1.1\r\n\r\n").into_bytes()
    } else {
        one.into_bytes()
    }
}

/// Numbers a careless server would size a buffer or a loop by.
const HUGE: &[&str] = &[
    "1152921504606846976",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "10000000",
    "2147483648",
    "fffffffffffffff",
    "ffffffffffffffffff",
];

/// One random edit of `bytes`.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let at = rng.below(bytes.len() + 1);
    match rng.below(8) {
        0 if !bytes.is_empty() => {
            let i = at.min(bytes.len() - 1);
            bytes[i] ^= 1 << rng.below(8);
        }
        1 => bytes.insert(at, rng.pick(b"\r\n\0 \t:;,\x7f\x80\xff0aZ")),
        2 if at < bytes.len() => {
            let end = (at + rng.below(16)).min(bytes.len());
            bytes.drain(at..end);
        }
        3 => bytes.truncate(at),
        4 => {
            // A run of digits (or hex digits) becomes a huge number.
            if let Some(start) = bytes[at..].iter().position(u8::is_ascii_hexdigit) {
                let start = at + start;
                let len = bytes[start..]
                    .iter()
                    .take_while(|b| b.is_ascii_hexdigit())
                    .count();
                let huge = rng.pick(HUGE).as_bytes();
                bytes.splice(start..start + len, huge.iter().copied());
            }
        }
        5 if at < bytes.len() => {
            let end = (at + rng.below(64)).min(bytes.len());
            let copy = bytes[at..end].to_vec();
            bytes.splice(at..at, copy);
        }
        6 => {
            let header = rng.pick(&[
                "Content-Length: 5\r\n",
                "Transfer-Encoding: chunked\r\n",
                "Transfer-Encoding: gzip\r\n",
                "Expect: 100-continue\r\n",
                "Expect: nothing\r\n",
                "Connection: close\r\n",
                " folded\r\n",
            ]);
            let line = bytes
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(0, |p| p + 2);
            bytes.splice(line..line, header.bytes());
        }
        _ => {
            let n = rng.below(64);
            let noise: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            bytes.splice(at..at, noise);
        }
    }
}

/// A request whose body is another request, framed so that one reading of its head
/// ends the body early and sees the other: a server must refuse it or read it as one.
fn smuggling(rng: &mut Rng) -> Vec<u8> {
    let early_end = format!("0\r\n\r\n{SMUGGLED}");
    let te = rng.pick(&[
        "Transfer-Encoding: chunked",
        "transfer-encoding: CHUNKED",
        "Transfer-Encoding:  chunked ",
        "Transfer-Encoding: identity, chunked",
        "Transfer-Encoding: chunked, identity",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding : chunked",
        "Transfer-Encoding:\tchunked",
        "Transfer-Encoding: \x0bchunked",
        " Transfer-Encoding: chunked",
        "X: y\nTransfer-Encoding: chunked",
        "X: y\rTransfer-Encoding: chunked",
        "Transfer-Encoding: x\r\n chunked",
    ]);
    let version = rng.pick(&["1.1", "1.0"]);
    let method = rng.pick(&["POST", "PUT", "GET"]);
    let (headers, body) = match rng.below(4) {
        // The length covers the smuggled request; chunked would end before it.
        0 => (
            format!("Content-Length: {}\r\n{te}", early_end.len()),
            early_end,
        ),
        1 => (
            format!("{te}\r\nContent-Length: {}", early_end.len()),
            early_end,
        ),
        // Two lengths: the whole body, and none of it.
        2 => {
            let len = SMUGGLED.len();
            let (a, b) = if rng.below(2) == 0 {
                (len, 0)
            } else {
                (0, len)
            };
            let form = rng.pick(&[
                format!("Content-Length: {a}\r\nContent-Length: {b}"),
                format!("Content-Length: {a}, {b}"),
                format!("Content-Length: {a}\r\ncontent-length: {b}"),
                format!("Content-Length: {a}\r\nX: y\nContent-Length: {b}"),
                format!("Content-Length: {a}\r\n {b}"),
            ]);
            (form, SMUGGLED.to_string())
        }
        // Chunked alone, the smuggled request inside a chunk whose size line a
        // lenient reader could take as 0.
        _ => {
            let size = rng.pick(&[
                format!("{:x}", SMUGGLED.len()),
                format!("{:X} ;x", SMUGGLED.len()),
                format!("00{:x}", SMUGGLED.len()),
                format!("0x{:x}", SMUGGLED.len()),
                format!("+{:x}", SMUGGLED.len()),
                format!("{:x}\x00", SMUGGLED.len()),
                format!("10000000000000000{:x}", SMUGGLED.len()),
            ]);
            (te.to_string(), format!("{size}\r\n{SMUGGLED}\r\n0\r\n\r\n"))
        }
    };
    format!("{method} / HTTP/{version}\r\nHost: x\r\n{headers}\r\n\r\n{body}").into_bytes()
}

/// The case's answers, checked: each one parses, and each error is OpenAI-shaped.
fn check_answers(case: usize, sent: &[u8], got: &[u8]) -> Vec<Answer> {
    let show = || String::from_utf8_lossy(sent).into_owned();
    let answers = answers(got).unwrap_or_else(|e| panic!("case {case}: {e}; sent {:?}", show()));
    for a in &answers {
        if a.status >= 400 {
            assert!(
                is_openai_error(&a.body),
                "case {case}: {} answer not OpenAI-shaped: {:?}; sent {:?}",
                a.status,
                String::from_utf8_lossy(&a.body),
                show()
            );
        }
    }
    answers
}

#[test]
fn random_and_mutated_streams_break_no_framing_rule() {
    std::panic::set_hook(Box::new(|info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        eprintln!("panic: {info}");
    }));
    let seen = Arc::new(Seen::default());
    let server = start(seen.clone());
    let seed = std::env::var("RANDOM_STREAMS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    eprintln!("seed {seed} (RANDOM_STREAMS_SEED reruns it)");
    let mut rng = Rng(seed);
    let started = Instant::now();
    let mut ran = 0;
    while ran < CASES && started.elapsed() < TIME_LIMIT {
        let case = ran;
        ran += 1;
        let kind = rng.below(10);
        let sent = match kind {
            // Bytes from nowhere.
            0 => (0..rng.below(2048)).map(|_| rng.next() as u8).collect(),
            1..=3 => smuggling(&mut rng),
            _ => {
                let mut bytes = valid(&mut rng);
                for _ in 0..=rng.below(4) {
                    mutate(&mut rng, &mut bytes);
                }
                bytes
            }
        };
        let smuggled_before = seen.smuggled.load(Ordering::SeqCst);
        let got = exchange(&server, &sent);
        let answers = check_answers(case, &sent, &got);
        if (1..=3).contains(&kind) {
            let finals = answers.iter().filter(|a| a.status >= 200).count();
            assert!(
                finals <= 1 && seen.smuggled.load(Ordering::SeqCst) == smuggled_before,
                "case {case}: one request read as two ({finals} answers); sent {:?}",
                String::from_utf8_lossy(&sent)
            );
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "the server panicked");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < ALLOCATION_CAP,
        "an allocation of {largest} bytes: sized by a client's number"
    );
    assert!(ran >= AT_LEAST, "only {ran} cases in {TIME_LIMIT:?}");
    assert!(
        seen.requests.load(Ordering::SeqCst) > ran / 4,
        "the cases reached the handler"
    );
    eprintln!(
        "{ran} cases in {:?}; largest allocation {largest} bytes",
        started.elapsed()
    );
}
