//! Reading a request body: up to `server.max_body_bytes`, within the body deadline the
//! connection enforces, and within the memory all bodies share
//! (`server.max_body_memory`).

use crate::capacity::{BodyHold, BodyMemory};
use crate::error::Error;
use std::io::{ErrorKind, Read};

/// The request body, up to `limit` bytes. The buffer grows with what arrives (never by
/// a declared length): from 4 KiB (a typical body fits, and needs no `mmap`), by half
/// again each time, and each growth is reserved from `memory` first: when the process
/// holds as much body data as it allows, the request gets 503 instead.
#[inline(never)]
pub fn read<'m>(
    req: &mut http1_server::Request<'_>,
    limit: u64,
    memory: &'m BodyMemory,
) -> Result<(Vec<u8>, BodyHold<'m>), Error> {
    const FIRST: usize = 4 * 1024;
    if req.body_length().is_some_and(|n| n > limit) {
        return Err(Error::BodyTooLarge { limit });
    }
    let mut hold = memory.hold();
    let mut body = Vec::new();
    loop {
        let room = (limit + 1).saturating_sub(body.len() as u64);
        let step = FIRST
            .max(body.len() / 2)
            .min(usize::try_from(room).unwrap_or(usize::MAX));
        if !hold.grow_to((body.len() + step) as u64) {
            return Err(Error::BodyMemoryFull {
                limit: memory.limit(),
            });
        }
        body.reserve_exact(step);
        match req.take(step as u64).read_to_end(&mut body) {
            Ok(n) if n < step => break,
            Ok(_) if body.len() as u64 > limit => return Err(Error::BodyTooLarge { limit }),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::TimedOut => return Err(Error::BodyTimeout),
            Err(e) => return Err(Error::BodyUnreadable(e.to_string())),
        }
    }
    // A short read ended it: less than `room`, so within the limit.
    Ok((body, hold))
}
