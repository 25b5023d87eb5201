//! `shaper`: clinical-traffic shaping for copper-line site gateways.

use shaper_user::{apply, compile, config, status};

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "shaper",
    version,
    about = "eBPF + HTB traffic shaper for clinical sites on copper lines"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate a config and print the compiled plan. Touches nothing.
    Check {
        config: PathBuf,
        /// Do not check that the interfaces exist (preparing a config elsewhere).
        #[arg(long)]
        offline: bool,
    },
    /// Apply a config and exit; shaping stays in place (pinned in bpffs).
    Apply { config: PathBuf },
    /// Per-class and per-rule counters read from the kernel.
    Status {
        #[arg(long)]
        json: bool,
        /// Seconds between the two samples used for current rates (0: none).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// Remove all shaping and restore the interfaces as they were found.
    Remove,
    /// Foreground daemon: apply, reload on SIGHUP, remove and exit on SIGTERM.
    Run {
        config: PathBuf,
        /// Leave the shaping in place when stopped.
        #[arg(long)]
        keep_on_exit: bool,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn load_policy(path: &std::path::Path) -> Result<config::Policy> {
    Ok(config::load(path)?)
}

fn run(cli: Cli) -> Result<ExitCode> {
    let paths = apply::Paths::from_env();
    match cli.cmd {
        Cmd::Check { config, offline } => {
            let policy = load_policy(&config)?;
            if !offline {
                config::check_interfaces_exist(&config, &policy)?;
            }
            let plan = compile::plan(&policy, None);
            let maps = compile::maps(&plan);
            print!("{}", compile::describe(&plan, &maps));
            println!("{}: OK (leaf \"auto\" is fq_codel where the kernel has it, else bfifo; decided at apply)", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Apply { config } => {
            let policy = load_policy(&config)?;
            let state = runtime()?.block_on(apply::apply(&paths, &policy, &config))?;
            log::info!(
                "applied {}: {} classes, {} rules on {} (upload) and {} (download), classifier via {:?}",
                config.display(),
                policy.classes.len(),
                policy.rules.len(),
                policy.wan,
                policy.lan,
                state.attachments.first().map(|a| a.mode)
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json, interval } => {
            let rt = runtime()?;
            let report = rt.block_on(status::collect(&paths, interval))?;
            match report {
                None => {
                    eprintln!("not applied");
                    Ok(ExitCode::from(3))
                }
                Some(r) if json => {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    Ok(ExitCode::SUCCESS)
                }
                Some(r) => {
                    print!("{}", status::render(&r));
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Cmd::Remove => {
            if runtime()?.block_on(apply::remove(&paths))? {
                log::info!("shaping removed; interfaces restored");
            } else {
                log::info!("nothing was applied");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            config,
            keep_on_exit,
        } => runtime()?.block_on(daemon(paths, config, keep_on_exit)),
    }
}

async fn daemon(paths: apply::Paths, config: PathBuf, keep_on_exit: bool) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let policy = load_policy(&config)?;
    apply::apply(&paths, &policy, &config).await?;
    log::info!(
        "shaping {} -> {}; SIGHUP reloads {}",
        policy.lan,
        policy.wan,
        config.display()
    );
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match load_policy(&config) {
                    Ok(p) => match apply::apply(&paths, &p, &config).await {
                        Ok(_) => log::info!("reloaded {}", config.display()),
                        Err(e) => log::error!("reload failed, previous shaping kept: {e:#}"),
                    },
                    Err(e) => log::error!("reload refused, previous shaping kept: {e:#}"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    if keep_on_exit {
        log::info!("stopping; shaping left in place");
    } else {
        apply::remove(&paths).await?;
        log::info!("stopped; shaping removed");
    }
    Ok(ExitCode::SUCCESS)
}
