//! The command line: parse flags, load and validate the configuration, set up logging,
//! and run the proxy.

use azure_openai_proxy::config::{self, Env, Source};
use azure_openai_proxy::observe::logging;
use azure_openai_proxy::Proxy;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
azure-openai-proxy: an OpenAI-compatible proxy in front of Azure OpenAI instances

Usage: azure-openai-proxy [--config-dir DIR] [--check-config]

Options:
  --config-dir DIR   read DIR/base.yaml and DIR/$ENVIRONMENT.yaml (default: config)
  --check-config     validate the configuration, print a summary and exit
  --version          print the version and exit
  --help             print this help and exit

Environment: ENVIRONMENT selects the overlay file (default: development); ${VAR}
references in the YAML and the legacy API_* variables are read from the environment.";

struct Args {
    config_dir: PathBuf,
    check_only: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut args = Args {
        config_dir: PathBuf::from("config"),
        check_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" | "-V" => {
                println!("azure-openai-proxy {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--check-config" => args.check_only = true,
            "--config-dir" => {
                args.config_dir = it.next().ok_or("--config-dir needs a directory")?.into();
            }
            other => match other.strip_prefix("--config-dir=") {
                Some(dir) => args.config_dir = dir.into(),
                None => return Err(format!("unknown argument {other:?}")),
            },
        }
    }
    Ok(Some(args))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(a)) => a,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Variables that are not valid UTF-8 cannot be configuration; skip them.
    let env: Env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let loaded = match config::load(&args.config_dir, &env) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sources: Vec<String> = loaded
        .sources
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let sources = if sources.is_empty() {
        "environment variables".to_string()
    } else {
        sources.join(" + ")
    };
    let config = loaded.config;
    let names: Vec<&str> = config.instances.iter().map(|i| i.name.as_str()).collect();
    if args.check_only {
        println!(
            "configuration OK ({sources}): {} instance(s): {}",
            names.len(),
            names.join(", ")
        );
        return ExitCode::SUCCESS;
    }

    let logs = match logging::init(&config) {
        Ok(logs) => logs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "configuration from {sources}; instances: {}",
        names.join(", ")
    );
    if config.auth.api_keys.is_empty() {
        log::warn!(
            "auth.api_keys is not set: any client that can reach {}:{} can spend these instances' quota",
            config.host,
            config.port
        );
    }
    let workers = config.server.workers;
    let source = Source {
        dir: args.config_dir,
        env,
    };
    let proxy = match Proxy::start(config, source) {
        Ok(p) => p,
        Err(e) => {
            log::error!("{e}");
            logs.flush(LOG_FLUSH);
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "listening on http://{} with {workers} workers",
        proxy.addr()
    );
    let mut signals = match Signals::new([SIGHUP, SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot handle signals ({e}); running until killed");
            proxy.wait();
            logs.flush(LOG_FLUSH);
            return ExitCode::SUCCESS;
        }
    };
    for signal in signals.forever() {
        if signal != SIGHUP {
            break;
        }
        match proxy.reload() {
            Ok(done) => log::info!("SIGHUP: reloaded; instances: {}", done.instances.join(", ")),
            Err(e) => log::error!("SIGHUP: reload failed, keeping the running configuration: {e}"),
        }
    }
    // The grace period of the configuration in force: a reload may have changed it.
    let grace = proxy.shutdown_grace();
    log::info!(
        "shutting down: waiting up to {} s for requests under way",
        grace.as_secs_f64()
    );
    if proxy.shutdown(grace) {
        log::info!("all requests finished; bye");
    } else {
        log::warn!("grace period over; requests still under way are cut");
    }
    logs.flush(LOG_FLUSH);
    ExitCode::SUCCESS
}

/// How long the exit waits for queued log lines to be written.
const LOG_FLUSH: Duration = Duration::from_secs(2);
