//! A panic while a request is handled (DESIGN §2): what it says is kept for the one log
//! line that names the request (instead of the default hook's line on stderr, which
//! names none), and a debug build's way to cause one on purpose, for the tests that
//! show it costs nothing but its request.

use std::cell::{Cell, RefCell};
use std::sync::Once;

thread_local! {
    /// This thread is handling a request: a panic's message is kept, not printed.
    static IN_REQUEST: Cell<bool> = const { Cell::new(false) };
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs the hook, once per process. Panics outside a request (another thread, a
/// test's assertion) still reach the default hook.
pub fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if IN_REQUEST.get() {
                MESSAGE.set(Some(info.to_string()));
            } else {
                default(info);
            }
        }));
    });
}

/// Runs `handle` as a request's handler: a panic in it is caught, and its message
/// returned for the caller's log line.
pub fn catch<T>(handle: impl FnOnce() -> T) -> Result<T, String> {
    IN_REQUEST.set(true);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handle));
    IN_REQUEST.set(false);
    caught.map_err(|_| {
        MESSAGE
            .take()
            .unwrap_or_else(|| "a panic with no message".into())
    })
}

/// The header that makes a debug build panic inside a request once it holds an
/// admission, a reservation and a permit (`api`): only the tests send it. A release
/// build has no such switch (`cfg(debug_assertions)`).
#[cfg(debug_assertions)]
pub const TEST_PANIC_HEADER: &str = "x-proxy-test-panic";
