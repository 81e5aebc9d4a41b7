//! A non-streamed answer relayed to the client as it arrives, through one bounded
//! buffer, never held whole: its top-level `usage` and `id` read on the way
//! (`scan`), the instance's key masked in a body that could echo it even when the key
//! straddles two reads, and the whole body within a total deadline.

use super::scan::Scan;
use super::stream::{End, Send};
use super::{transport, Usage};
use crate::config::MASK;
use std::io::{self, Read};
use std::time::Instant;

/// The relay's buffer: what one read from the upstream may bring.
const BUFFER: usize = 64 * 1024;

/// An answer whose body is still to be read, and how it is to be relayed.
pub struct Relay {
    pub rest: ureq::BodyReader<'static>,
    /// The upstream's Content-Length, passed on unless the body is masked.
    pub length: Option<u64>,
    /// The whole body must have arrived by then (`routing.timeout` after its head).
    pub by: Instant,
    /// The body could echo the instance's key (an error answer): mask it.
    pub mask: bool,
    /// The body is plain JSON (no content coding): its usage and id can be read.
    pub scan: bool,
}

impl Relay {
    /// The length the client is told: none when masking may change it.
    pub fn client_length(&self) -> Option<u64> {
        self.length.filter(|_| !self.mask)
    }
}

/// How a relay ended, and what it read on the way.
#[derive(Debug)]
pub struct Relayed {
    pub usage: Option<Usage>,
    pub id: Option<String>,
    pub end: End,
}

/// Relays `relay`'s body to `send`, masking `key` when asked.
pub fn relay(relay: Relay, key: &str, send: &mut Send<'_>) -> Relayed {
    let Relay {
        mut rest,
        by,
        mask,
        scan,
        ..
    } = relay;
    let _deadline = transport::reads_until(by);
    let key = Some(key.as_bytes()).filter(|k| mask && !k.is_empty());
    let mut scanner = scan.then(Scan::default);
    let end = pass(&mut rest, key, &mut scanner, send);
    let (usage, id) = scanner.map(|s| s.found()).unwrap_or_default();
    Relayed { usage, id, end }
}

fn pass(
    upstream: &mut dyn Read,
    key: Option<&[u8]>,
    scanner: &mut Option<Scan>,
    send: &mut Send<'_>,
) -> End {
    // The last `key.len() - 1` bytes of a read wait for the next one: they may be the
    // start of the key.
    let tail = key.map_or(0, |k| k.len() - 1);
    let mut buf = vec![0u8; BUFFER.max(2 * tail + 1)];
    let mut masked = Vec::new();
    let mut held = 0;
    loop {
        let n = match upstream.read(&mut buf[held..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return End::UpstreamFailed(format!("reading the answer failed: {e}")),
        };
        if let Some(s) = scanner.as_mut() {
            s.feed(&buf[held..held + n]);
        }
        let filled = held + n;
        let last = n == 0;
        let out = match key {
            None => {
                held = 0;
                &buf[..filled]
            }
            Some(key) => {
                let safe = if last {
                    filled
                } else {
                    filled - tail.min(filled)
                };
                let used = mask_into(&mut masked, &buf[..filled], safe, key);
                buf.copy_within(used..filled, 0);
                held = filled - used;
                &masked[..]
            }
        };
        if send(out).is_err() {
            return End::ClientGone;
        }
        if last {
            return End::Completed;
        }
    }
}

/// `bytes` up to at least `safe` into `out` (cleared first), with every whole `key`
/// masked; returns how many bytes of `bytes` it took (past `safe` when a key began
/// before it).
fn mask_into(out: &mut Vec<u8>, bytes: &[u8], safe: usize, key: &[u8]) -> usize {
    out.clear();
    let mut i = 0;
    while i < safe {
        match bytes[i..safe]
            .iter()
            .position(|&b| b == key[0])
            .map(|p| i + p)
        {
            Some(at) => {
                out.extend_from_slice(&bytes[i..at]);
                if bytes[at..].starts_with(key) {
                    out.extend_from_slice(MASK.as_bytes());
                    i = at + key.len();
                } else {
                    out.push(bytes[at]);
                    i = at + 1;
                }
            }
            None => {
                out.extend_from_slice(&bytes[i..safe]);
                i = safe;
            }
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `input` `step` bytes at a time.
    struct Pieces<'a>(&'a [u8], usize);
    impl Read for Pieces<'_> {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(b.len());
            b[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn run(input: &[u8], step: usize, key: Option<&[u8]>) -> (Vec<u8>, Option<Scan>, End) {
        let mut sent = Vec::new();
        let mut scanner = Some(Scan::default());
        let end = pass(&mut Pieces(input, step), key, &mut scanner, &mut |piece| {
            sent.extend_from_slice(piece);
            Ok(())
        });
        (sent, scanner, end)
    }

    #[test]
    fn a_key_is_masked_wherever_the_reads_cut_it() {
        let input = b"{\"error\":\"bad key sk-123456 and sk-123456\",\"k\":\"sk-12sk-123456\"}";
        let expected = String::from_utf8_lossy(input).replace("sk-123456", MASK);
        for step in 1..input.len() + 1 {
            let (sent, _, end) = run(input, step, Some(b"sk-123456"));
            assert_eq!(String::from_utf8(sent).unwrap(), expected, "step {step}");
            assert_eq!(end, End::Completed);
        }
    }

    #[test]
    fn an_unmasked_body_passes_unchanged_and_its_usage_is_read() {
        let input = format!(
            "{{\"data\":[{}],\"usage\":{{\"prompt_tokens\":3,\"total_tokens\":3}}}}",
            "0.5,".repeat(40_000) + "1"
        );
        let (sent, scanner, end) = run(input.as_bytes(), 10_000, None);
        assert_eq!((sent, end), (input.into_bytes(), End::Completed));
        let usage = scanner.unwrap().found().0.unwrap();
        assert_eq!(usage.total_tokens, 3);
    }

    #[test]
    fn a_read_error_or_a_client_that_left_ends_the_relay() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        let end = pass(&mut Failing, None, &mut None, &mut |_| Ok(()));
        assert!(matches!(end, End::UpstreamFailed(_)), "{end:?}");
        let end = pass(&mut Pieces(b"{}", 1), None, &mut None, &mut |_| {
            Err(io::ErrorKind::BrokenPipe.into())
        });
        assert_eq!(end, End::ClientGone);
    }
}
