//! azure-openai-proxy: OpenAI-style calls in, Azure OpenAI (or OpenAI-compatible)
//! deployments out. See ARCHITECTURE.md for the map of modules and a request's path.
//! From the top down: `proxy` (the running server and its route table), the handlers
//! (`api`, `admin`), the HTTP layer (`http`), shared state (`state`), then `routing`,
//! `upstream`, the state several proxies share in Redis (`shared`), Entra ID tokens (`credential`), `observe`, `config` and the small types they share (`outcome`, `error`,
//! `capacity`, `key_failures`, `json`). No module imports one above it.

pub mod admin;
pub mod api;
pub mod capacity;
pub mod config;
pub mod credential;
pub mod error;
pub mod http;
pub mod json;
pub mod key_failures;
pub mod observe;
pub mod outcome;
pub mod proxy;
pub mod routing;
#[cfg(feature = "redis")]
pub mod shared;
/// Without Redis support: the same names, none of them ever made.
#[cfg(not(feature = "redis"))]
#[path = "shared_off.rs"]
pub mod shared;
pub mod shared_terms;
pub mod state;
#[cfg(test)]
mod testutil;
pub mod upstream;

pub use proxy::Proxy;
