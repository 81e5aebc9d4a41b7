//! Configuration: the schema and its secrets (`schema`), how the layered sources
//! become one validated `Config` (`load`), and the `--env-file` reader (`env_file`).

mod env_file;
mod load;
mod schema;

pub use load::{ConfigError, Env, Loaded, Source};
pub use schema::*;
