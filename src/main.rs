//! The command line: parse flags, load and validate the configuration, set up logging,
//! and run the proxy.

use azure_openai_proxy::config::{Credential, Env, Loaded, Source};
use azure_openai_proxy::credential;
use azure_openai_proxy::observe::logging;
use azure_openai_proxy::Proxy;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::process::ExitCode;

/// The static binary's allocator (see Cargo.toml): musl's malloc serialises threads.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment
/// overrides them): no per-thread caches. A thread holds each stream, and a cache,
/// even a small one, is kept by every thread: 9,968 held streams took 753 MB with
/// jemalloc's defaults, 739 MB with the smallest caches, 673 MB without (654 MB with
/// musl's malloc; each measured with `bench/loads.py held`, as `scripts/bench.sh` runs
/// it). The threads still spread over jemalloc's arenas, each with its own lock, which
/// is what musl's single lock lacked.
#[cfg(target_env = "musl")]
#[export_name = "_rjem_malloc_conf"]
static JEMALLOC_CONF: Option<&u8> = Some(&b"tcache:false\0"[0]);

use std::time::Duration;

const USAGE: &str = "\
azure-openai-proxy: an OpenAI-compatible proxy in front of Azure OpenAI instances

Usage: azure-openai-proxy [--config-dir DIR | --env-only] [--env-file PATH]
                          [--host ADDR] [--port N] [--check-config [--credentials]]

Options:
  --config-dir DIR   read DIR/base.yaml and DIR/$ENVIRONMENT.yaml (default: config)
  --env-only         read no config file: the legacy API_* variables alone define the
                     instances (API_KEY + API_BASE, or API_INSTANCES)
  --env-file PATH    read KEY=VALUE lines from PATH over the process environment, at
                     start and again on every reload (SIGHUP, POST /config/reload)
  --host ADDR, --port N
                     listen there, whatever the configuration's host and port say
  --check-config     validate the configuration (every problem found, one per line),
                     print where each instance comes from (and its credential's
                     type and sources) and any warning, and exit (0: valid, 1: not)
  --credentials      with --check-config: fetch one Microsoft Entra ID token per
                     credential and say whether it came (1 if one did not)
  --version          print the version and exit
  --help             print this help and exit

Environment: ENVIRONMENT selects the overlay file (default: development); ${VAR}
references in the YAML and the legacy API_* variables are read from the environment
(and --env-file).";

struct Args {
    /// `None` with `--env-only`.
    config_dir: Option<PathBuf>,
    env_file: Option<PathBuf>,
    host: Option<String>,
    port: Option<u16>,
    check_only: bool,
    /// `--credentials`: `--check-config` fetches a token per credential.
    check_credentials: bool,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut config_dir = None;
    let mut env_only = false;
    let mut env_file = None;
    let mut host = None;
    let mut port = None;
    let mut check_only = false;
    let mut check_credentials = false;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_string(), Some(value.to_string()))
            }
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{flag} needs {what}"))
        };
        match flag.as_str() {
            "--help" | "-h" if inline.is_none() => {
                println!("{USAGE}");
                return Ok(None);
            }
            "--version" | "-V" if inline.is_none() => {
                println!("azure-openai-proxy {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--check-config" if inline.is_none() => check_only = true,
            "--credentials" if inline.is_none() => check_credentials = true,
            "--env-only" if inline.is_none() => env_only = true,
            "--config-dir" => config_dir = Some(value("a directory")?.into()),
            "--env-file" => env_file = Some(value("a file")?.into()),
            "--host" => host = Some(value("an address")?),
            "--port" => {
                let n = value("a port number")?;
                port = Some(
                    n.parse()
                        .map_err(|_| format!("--port {n:?} is not a port number"))?,
                );
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    if check_credentials && !check_only {
        return Err("--credentials goes with --check-config".into());
    }
    if env_only && config_dir.is_some() {
        return Err("--env-only reads no config file: it cannot go with --config-dir".into());
    }
    Ok(Some(Args {
        config_dir: (!env_only).then(|| config_dir.unwrap_or_else(|| PathBuf::from("config"))),
        env_file,
        host,
        port,
        check_only,
        check_credentials,
    }))
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
    let source = Source {
        dir: args.config_dir,
        env,
        env_file: args.env_file,
        host: args.host,
        port: args.port,
    };
    let loaded = match source.load() {
        Ok(l) => l,
        Err(e) => {
            // One line per problem found, so that each can be read (and grepped) alone.
            for problem in e.to_string().lines() {
                eprintln!("error: invalid configuration: {problem}");
            }
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
    // Opened before anything is served, and by --check-config too, so that a log file
    // that cannot be created stops the start (and the unit's ExecStartPre) with the
    // file and key to fix.
    let log_file = match logging::open_file(&loaded.config) {
        Ok(file) => file,
        Err(e) => {
            eprintln!(
                "error: invalid configuration: {}: {e}",
                loaded.source_of("logging.file")
            );
            return ExitCode::FAILURE;
        }
    };
    let names: Vec<&str> = loaded
        .config
        .instances
        .iter()
        .map(|i| i.name.as_str())
        .collect();
    let origins: Vec<String> = names
        .iter()
        .zip(&loaded.origins)
        .map(|(name, origin)| format!("{name} from {origin}"))
        .collect();
    if args.check_only {
        println!(
            "configuration OK ({sources}): {} instance(s): {}",
            names.len(),
            names.join(", ")
        );
        let mut credentials_ok = true;
        let mut checked: Vec<(&Credential, bool)> = Vec::new();
        for (i, (origin, inst)) in origins.iter().zip(&loaded.config.instances).enumerate() {
            println!("  instance {origin}");
            let Some(c) = &inst.credential else { continue };
            println!(
                "    credential {} (from {}): {}",
                c.kind(),
                loaded.source_of(&format!("instances[{i}].credential")),
                credential::describe(c)
            );
            if !args.check_credentials {
                continue;
            }
            // One fetch per credential, however many instances share it.
            if let Some((_, ok)) = checked.iter().find(|(seen, _)| *seen == c) {
                println!(
                    "    credential check: as above ({})",
                    if *ok { "ok" } else { "failed" }
                );
                continue;
            }
            let result = credential::check(c);
            match &result {
                Ok(what) => println!("    credential check: ok, {what}"),
                Err(why) => println!("    credential check: FAILED: {why}"),
            }
            credentials_ok &= result.is_ok();
            checked.push((c, result.is_ok()));
        }
        for warning in &loaded.warnings {
            eprintln!("warning: {warning}");
        }
        return if credentials_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }

    let Loaded {
        config, warnings, ..
    } = loaded;
    let logs = match logging::init(&config, log_file) {
        Ok(logs) => logs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    log::info!(
        "configuration from {sources}; instances: {}",
        origins.join("; ")
    );
    for warning in &warnings {
        log::warn!("{warning}");
    }
    if config.auth.api_keys.is_empty() {
        log::warn!(
            "auth.api_keys is not set: any client that can reach {}:{} can spend these instances' quota",
            config.host,
            config.port
        );
    }
    let workers = config.server.workers;
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
        // Before the reload's own line, so that it goes to the reopened file.
        logs.reopen();
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
