//! Configuration: the schema and its secrets (`schema`), and how the layered sources
//! become one validated `Config` (`load`).

mod load;
mod schema;

pub use load::{load, ConfigError, Env, Loaded, Source};
pub use schema::*;
