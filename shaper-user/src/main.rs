//! `shaper`: clinical-traffic shaping for copper-line site gateways.

use shaper_user::dir::Dir;
use shaper_user::{apply, catalogue, compile, config, confirm, daemon, explain, site, status};

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
    /// List the clinical application catalogue (with CONFIG: including its [[app]] tables).
    Catalogue {
        #[arg(long)]
        json: bool,
        config: Option<PathBuf>,
    },
    /// Which rule and class packets get, and why. Touches nothing.
    ///
    /// PACKET: `up|down PROTOCOL SRC[:PORT] -> DST[:PORT] [dscp=EF] [flags=A] [payload=N]
    /// [frag=first|later] [id=N] [sni=HOST]`, addresses as the packet carries them
    /// (IPv6 with a port: [ADDR]:PORT), e.g.
    /// `up udp 192.168.1.5:50020 -> 52.113.1.1:3478 dscp=EF`.
    /// Or --pcap FILE --direction up|down (classic pcap, Ethernet or raw IP).
    /// Exits 2 if the compiled maps and the reference matcher ever disagree.
    Explain {
        config: PathBuf,
        /// Packet descriptions; quote each one (`->` is a shell redirection).
        packets: Vec<String>,
        /// A classic pcap file taken on one egress (see --direction).
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// Which egress the pcap was taken on: up (WAN) or down (LAN).
        #[arg(long)]
        direction: Option<String>,
        #[arg(long)]
        json: bool,
        /// Host names learned by the running shaper (`shaper run` writes
        /// hosts.json in its run directory, read by default when present);
        /// `none` to ignore them.
        #[arg(long)]
        hosts: Option<PathBuf>,
    },
    /// Calls and their media quality: RTP/SRTP streams (plain or in TURN ChannelData)
    /// grouped into calls, with loss, reordering, RFC 3550 jitter, bitrate and an E-model
    /// MOS per direction, and where the loss happened (upload gaps: the LAN side;
    /// download gaps: the line or beyond). Without --pcap: the calls in progress, as
    /// `shaper run` measures them in the classes of `[calls]`.
    Calls {
        /// A classic pcap taken between the site's hosts and the line (Ethernet or raw
        /// IP), measured the way the classifier measures.
        #[arg(long)]
        pcap: Option<PathBuf>,
        /// The site's address range (repeatable); default: private, unique-local and
        /// link-local addresses are the LAN.
        #[arg(long = "lan", value_parser = parse_lan)]
        lan: Vec<shaper_user::units::Cidr>,
        /// A call ends after this long without media (e.g. "10s").
        #[arg(long, default_value = "10s", value_parser = confirm::parse_duration)]
        quiet: std::time::Duration,
        /// Print addresses instead of pseudonyms (a keyed hash under a key made for
        /// this run, so one report's names match each other and nothing else).
        #[arg(long)]
        show_addresses: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ended calls by day and by hour (UTC): how many, how many degraded and why, call
    /// minutes, mean MOS each way (from `shaper run`'s calls.jsonl).
    Report {
        #[arg(long)]
        json: bool,
    },
    /// Apply a config and exit; shaping stays in place (pinned in bpffs).
    Apply {
        config: PathBuf,
        /// Roll back to the last confirmed config unless `shaper confirm` runs
        /// within this time (e.g. "120s", "5m").
        #[arg(long, value_parser = confirm::parse_duration)]
        confirm_within: Option<std::time::Duration>,
    },
    /// Keep a config applied with --confirm-within.
    Confirm,
    /// (internal) waits for a confirmation and rolls back without one.
    #[command(hide = true)]
    ConfirmWatch,
    /// Per-class and per-rule counters read from the kernel.
    Status {
        #[arg(long)]
        json: bool,
        /// Seconds between the two samples used for current rates (0: none).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
    /// A live view of the counters and rates, refreshed every interval.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (default: until interrupted).
        #[arg(long)]
        count: Option<u64>,
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
    /// Install a signed firmware image beside the running one (A/B, boot counting): it boots
    /// at the next reboot and falls back to the running one if it never shapes.
    Upgrade {
        /// The signed upgrade file (`cargo xtask image --sign KEY` makes it).
        #[arg(required_unless_present_any = ["mark_good", "healthy"])]
        file: Option<PathBuf>,
        /// (run at boot by boot-assess) Mark the image on trial good (bless-boot's rename).
        #[arg(long, conflicts_with_all = ["file", "healthy"])]
        mark_good: bool,
        /// (run at boot by boot-assess) Exit 0 when the daemon shapes with the site's config.
        #[arg(long, conflicts_with = "file")]
        healthy: bool,
    },
    /// What image runs, which are installed on the boot disk and which boots next.
    Version,
    /// The line itself: `shaper line probe` measures its framing and overhead.
    Line {
        #[command(subcommand)]
        cmd: LineCmd,
    },
    /// How the box sits in the site's network (site.toml: bridge or router, ports,
    /// management address).
    Site {
        #[command(subcommand)]
        cmd: SiteCmd,
    },
    /// Print the shell completion script for bash, zsh or fish (the image and the
    /// Debian package install them).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages into DIR: shaper.8 and one page per command (shaper-check.8,
    /// shaper-site-up.8, ...), generated from these definitions.
    Man { dir: PathBuf },
}

#[derive(Subcommand)]
enum LineCmd {
    /// Measure through the line whether it is ATM (ADSL) or PTM/Ethernet and the bytes it
    /// adds to each packet, and print the `line`/`framing`/`overhead` to put in `[upload]`
    /// and `[download]`. Sends trains of pings of many sizes (about 1-2 minutes on ADSL)
    /// past the box's own shaper to a host beyond the line that answers them; best on a
    /// quiet line. Only on an Ethernet WAN port, IPv4.
    Probe {
        /// The WAN interface (the Ethernet port towards the modem).
        #[arg(long)]
        interface: String,
        /// An IPv4 host beyond the line that answers pings (the ISP's first hop is best).
        #[arg(long)]
        reflector: std::net::Ipv4Addr,
        /// Trains per probe size (more: slower, steadier on a busy line).
        #[arg(long, default_value_t = 3)]
        trains: u32,
        /// Print the fit and the samples as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Validate a site file and say what it sets up. Touches nothing.
    Check { file: PathBuf },
    /// Set the network up as the site file says (at boot, before the shaper): names the
    /// ports, builds the bridge (or routes), gives the box its management address. A file
    /// that fails validation changes nothing.
    Up { file: PathBuf },
    /// Print the device of the partition the box booted from (the boot loader's
    /// LoaderDevicePartUUID matched against each disk's GPT); exits 3 when the box was not
    /// booted through systemd-boot or its stub.
    BootPartition,
    /// Check the serial console's password hash (one line, `$6$salt$hash` or `$5$...`,
    /// e.g. from `mkpasswd -m sha-512`) and print it; the boot script puts it in
    /// /etc/shadow. Anything else is refused and the console stays locked.
    PasswordHash { file: PathBuf },
    /// (internal, run by init) The DHCP client the site file asks for, in the foreground;
    /// sleeps when it asks for none.
    #[command(hide = true)]
    Dhcp { file: PathBuf },
    /// (internal) udhcpc's hook: EVENT with the lease in the environment.
    #[command(hide = true)]
    DhcpEvent { event: String },
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The one line a user must always see, whatever RUST_LOG says.
            eprintln!("shaper: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr. Under systemd (JOURNAL_STREAM set) each line carries its
/// syslog priority as `<N>` so journald files it at the right level, and no
/// timestamp (the journal adds its own).
fn init_logging() {
    use std::io::Write as _;
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        b.format(|f, r| {
            let prio = match r.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(f, "<{prio}>{}", r.args())
        });
    } else {
        b.format_timestamp(None);
    }
    b.init();
}

/// One roff page per command, section 8 (system administration): `shaper.8` for the
/// whole tool and `shaper-check.8`, `shaper-site-up.8`, ... for each command, hidden
/// (internal) ones left out. Returns how many were written.
fn write_man_pages(cmd: clap::Command, dir: &std::path::Path) -> Result<usize> {
    fn walk(cmd: &clap::Command, name: &str, dir: &std::path::Path, n: &mut usize) -> Result<()> {
        let page = cmd
            .clone()
            .name(name.to_string())
            .bin_name(name.replace('-', " "));
        let mut out = Vec::new();
        clap_mangen::Man::new(page)
            .section("8")
            .manual("shaper")
            .render(&mut out)
            .context("rendering a man page")?;
        let path = dir.join(format!("{name}.8"));
        std::fs::write(&path, out).with_context(|| format!("writing {}", path.display()))?;
        *n += 1;
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            if sub.get_name() == "help" {
                continue;
            }
            walk(sub, &format!("{name}-{}", sub.get_name()), dir, n)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    let mut n = 0;
    walk(&cmd, "shaper", dir, &mut n)?;
    Ok(n)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The records of a JSON-lines file `shaper run` appends to (none when it does not
/// exist); a line that does not parse (cut by a power cut, or another version's) is
/// skipped with a warning naming it.
fn read_jsonl<T: serde::de::DeserializeOwned>(p: &std::path::Path) -> Result<Vec<T>> {
    let text = match std::fs::read_to_string(p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::Error::from(e).context(format!("reading {}", p.display()))),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(e) => log::warn!("{}:{}: skipped: {e}", p.display(), n + 1),
        }
    }
    Ok(out)
}

fn parse_lan(s: &str) -> Result<shaper_user::units::Cidr, String> {
    shaper_user::units::parse_cidr(s)
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
            if let Some(v) = &policy.catalogue {
                println!("apps from the clinical catalogue {v} (`shaper catalogue` lists them)");
            }
            if let Some(a) = &policy.autorate {
                println!(
                    "autorate: ping {} every {} ms (rule autorate-probes, class {}); upload {}-{} kbit/s, download {}-{} kbit/s; a queue is +{} ms of round trip",
                    a.reflectors.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "),
                    a.interval_ms,
                    policy.classes[a.class].name,
                    a.min_bps[Dir::Up] / 1000,
                    policy.dirs[Dir::Up].rate_bps / 1000,
                    a.min_bps[Dir::Down] / 1000,
                    policy.dirs[Dir::Down].rate_bps / 1000,
                    a.delay_ms
                );
            }
            if policy.dirs[Dir::Down].account_arrivals {
                println!(
                    "download arrival accounting: `shaper run` holds what reaches the shaper (dropped or not) within {}{} +{} %, lowering the download rate (to {:.0} % of it at least) while more arrives: an unresponsive flood costs throughput, not the modem's queue",
                    config::format_rate(policy.dirs[Dir::Down].rate_bps),
                    if policy.autorate.is_some() {
                        " (or the lower line rate autorate finds; the lower of the two rates is set)"
                    } else {
                        ""
                    },
                    shaper_user::ingress::MARGIN * 100.0,
                    shaper_user::ingress::FLOOR * 100.0
                );
            }
            for n in &policy.notes {
                println!("note: {n}");
            }
            println!("{}: OK (leaf \"auto\" is fq_codel where the kernel has it, else bfifo; decided at apply)", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Catalogue { json, config } => {
            let cat = match &config {
                Some(path) => config::load_catalogue(path)?,
                None => catalogue::Catalogue::builtin(),
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&cat.to_json())?);
            } else {
                print!("{}", cat.render());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Explain {
            config,
            packets,
            pcap,
            direction,
            json,
            hosts,
        } => {
            let policy = load_policy(&config)?;
            let hosts = match hosts {
                Some(p) if p.as_os_str() == "none" => None,
                Some(p) => Some(
                    shaper_user::rundir::read_versioned(&p, shaper_user::rundir::HOSTS_VERSION)
                        .with_context(|| format!("{} is not a hosts.json", p.display()))?
                        .with_context(|| format!("{} does not exist", p.display()))?,
                ),
                None => shaper_user::hosts::read_snapshot(&paths.run),
            };
            let r = explain::run(
                &policy,
                &packets,
                pcap.as_deref(),
                direction.as_deref(),
                json,
                hosts,
            )
            .map_err(anyhow::Error::msg)?;
            print!("{}", r.text);
            if r.disagreements > 0 {
                eprintln!(
                    "shaper: error: the compiled maps and the reference matcher disagree on {} packet(s)",
                    r.disagreements
                );
                return Ok(ExitCode::from(2));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Calls {
            pcap,
            lan,
            quiet,
            show_addresses,
            json,
        } => {
            use shaper_user::media;
            let Some(pcap) = pcap else {
                let p = shaper_user::rundir::RunDir(&paths.run).calls();
                let live: shaper_user::calls_task::Live = shaper_user::rundir::read_versioned(
                    &p,
                    shaper_user::calls_task::CALLS_VERSION,
                )?
                .with_context(|| {
                    format!(
                        "no {}: `shaper run` is not running, or no class is measured (`[calls] classes`)",
                        p.display()
                    )
                })?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&live)?);
                } else {
                    print!("{}", media::render(&live.calls));
                    println!(
                        "{} call(s) ended since `shaper run` started, {} degraded (`shaper report`)",
                        live.ended, live.degraded
                    );
                }
                return Ok(ExitCode::SUCCESS);
            };
            let bytes =
                std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
            let cap = shaper_user::explain::pcap::read(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: {e}", pcap.display()))?;
            let addresses = if show_addresses {
                media::Addresses::Shown
            } else {
                let mut key = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
                    .context("reading a pseudonym key from /dev/urandom")?;
                media::Addresses::Pseudonymous(key)
            };
            let calls = media::from_capture(&cap, &lan, quiet.as_nanos() as u64, addresses)
                .map_err(|e| anyhow::anyhow!("{}: {e}", pcap.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&calls)?);
            } else {
                print!("{}", media::render(&calls));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report { json } => {
            use shaper_user::media;
            let files = shaper_user::rundir::RunDir(&paths.run);
            let mut calls: Vec<media::CallRecord> = read_jsonl(&files.calls_log_old())?;
            calls.extend(read_jsonl(&files.calls_log())?);
            let lines: Vec<media::report::LineHour> = read_jsonl(&files.line_log())?;
            let r = media::report::report(&calls, &lines);
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", media::report::render(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Apply {
            config,
            confirm_within,
        } => {
            let text = config::read_text(&config)?;
            let policy = config::parse(&config, &text)?;
            let rollback = match confirm_within {
                Some(_) => Some(confirm::prepare(&paths)?),
                None => None,
            };
            let state = runtime()?.block_on(apply::apply(&paths, &policy, &config, &text))?;
            log::info!(
                "applied {}: {} classes, {} rules on {} (upload) and {} (download), classifier via {:?}",
                config.display(),
                policy.classes.len(),
                policy.rules.len(),
                policy.wan,
                policy.lan,
                state.attachments.first().map(|a| a.mode)
            );
            match (confirm_within, rollback) {
                (Some(within), Some(rb)) => {
                    confirm::arm(&paths, &config, within, rb)?;
                    if let Some(p) = confirm::pending(&paths)? {
                        log::warn!("{}", confirm::describe(&p));
                    }
                }
                _ => {
                    // A plain apply is a confirmed one: drop any pending rollback, and
                    // keep it for the next boot.
                    if !confirm::confirm(&paths)? {
                        confirm::keep(&paths, &text)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Confirm => {
            if confirm::confirm(&paths)? {
                log::info!("confirmed; the applied config stays");
            } else {
                log::info!("nothing to confirm");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::ConfirmWatch => {
            runtime()?.block_on(confirm::watch(&paths))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json, interval } => {
            let rt = runtime()?;
            let report = rt.block_on(status::collect(&paths, interval))?;
            match report {
                None => {
                    eprintln!("not applied");
                    // A crash is worth knowing about most when nothing is applied.
                    if let Some(c) = status::read_last_crash(&paths.run) {
                        eprint!("{}", status::render_last_crash(&c));
                    }
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
        Cmd::Top { interval, count } => {
            use std::io::{IsTerminal as _, Write as _};
            let rt = runtime()?;
            let tty = std::io::stdout().is_terminal();
            let interval = interval.max(0.2);
            let mut n = 0u64;
            while count.is_none_or(|c| n < c) {
                // Each frame samples over `interval`, so it also paces the loop.
                let frame = match rt.block_on(status::collect(&paths, interval))? {
                    Some(r) => status::render(&r),
                    None => "not applied\n".to_string(),
                };
                let mut out = std::io::stdout().lock();
                if tty {
                    write!(out, "\x1b[2J\x1b[H")?;
                }
                write!(out, "{frame}")?;
                if !tty {
                    writeln!(out, "----")?;
                }
                out.flush()?;
                n += 1;
            }
            Ok(ExitCode::SUCCESS)
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
        } => {
            // A metrics address on the WAN is refused before anything is applied.
            let policy = load_policy(&config)?;
            if let Some(addr) = policy.metrics_listen {
                shaper_user::metrics::check_listen(addr, &policy.wan)?;
            }
            // Once the first apply succeeded: the metrics socket is bound (a port below
            // 1024 needs CAP_NET_BIND_SERVICE), the capabilities the daemon no longer
            // needs are dropped, then the metrics thread starts (threads inherit their
            // creator's capabilities).
            let mp = paths.clone();
            let on_first_apply: Option<daemon::OnApplied> = Some(Box::new(move |p| {
                let metrics = shaper_user::metrics::bind(p);
                shaper_user::caps::drop_unneeded(p);
                if let Some(m) = metrics {
                    shaper_user::metrics::spawn(m, &mp);
                }
            }));
            runtime()?.block_on(daemon::run(paths, config, keep_on_exit, on_first_apply))
        }
        Cmd::Upgrade {
            file,
            mark_good,
            healthy,
        } => {
            use shaper_user::upgrade;
            let dev = upgrade::Device::default();
            if mark_good {
                println!("shaper: {}", upgrade::mark_good(&dev)?);
            } else if healthy {
                if let Err(e) = upgrade::healthy(&dev, &paths) {
                    println!("not healthy: {e:#}");
                    return Ok(ExitCode::from(3));
                }
                println!("healthy");
            } else if let Some(f) = file {
                upgrade::install(&dev, &f)?;
                print!("{}", upgrade::version_report(&dev));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "shaper", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir } => {
            let n = write_man_pages(<Cli as clap::CommandFactory>::command(), &dir)?;
            println!("{n} man pages in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Version => {
            print!(
                "{}",
                shaper_user::upgrade::version_report(&shaper_user::upgrade::Device::default())
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Site { cmd } => site_cmd(cmd),
        Cmd::Line {
            cmd:
                LineCmd::Probe {
                    interface,
                    reflector,
                    trains,
                    json,
                },
        } => line_probe(&interface, reflector, trains, json),
    }
}

fn line_probe(
    interface: &str,
    reflector: std::net::Ipv4Addr,
    trains: u32,
    json: bool,
) -> Result<ExitCode> {
    use shaper_user::lineprobe;
    let opts = lineprobe::ProbeOpts {
        trains: trains.clamp(1, 50),
        ..lineprobe::ProbeOpts::new(interface, reflector)
    };
    let mut last = std::time::Instant::now();
    let (samples, fit) = lineprobe::probe_line(&opts, &mut |done, total| {
        if !json && last.elapsed() > std::time::Duration::from_secs(5) {
            last = std::time::Instant::now();
            eprintln!("probing: {done}/{total} trains");
        }
    })?;
    if json {
        let v = serde_json::json!({
            "atm": fit.atm,
            "overhead": fit.overhead,
            "rate_bps": fit.rate_bps,
            "atm_vs_linear": fit.atm_vs_linear,
            "ambiguous": fit.ambiguous,
            "overhead_estimate": fit.overhead_estimate,
            "overhead_stderr": fit.overhead_stderr,
            "config": fit.config_lines(),
            "samples": samples.iter().map(|(s, t)| serde_json::json!([s, t])).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("{interface} towards {reflector}: {}", fit.describe());
        println!("put in [upload] and [download]:\n{}", fit.config_lines());
    }
    Ok(ExitCode::SUCCESS)
}

/// Where udhcpc finds its hook (a two-line script that runs `shaper site dhcp-event`).
const UDHCPC_HOOK: &str = "/usr/libexec/shaper/udhcpc-hook";

fn site_cmd(cmd: SiteCmd) -> Result<ExitCode> {
    match cmd {
        SiteCmd::Check { file } => {
            let s = site::load(&file)?;
            print!("{}", site::describe(&s));
            println!("{}: OK", file.display());
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::Up { file } => {
            let s = site::load(&file)?;
            runtime()?.block_on(shaper_user::kernel::net::up(&s))?;
            print!("{}", site::describe(&s));
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::PasswordHash { file } => {
            let text =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let h = site::password_hash(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            println!("{h}");
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::BootPartition => {
            match site::boot_partition(
                std::path::Path::new("/sys/firmware/efi/efivars"),
                std::path::Path::new("/sys/block"),
                std::path::Path::new("/dev"),
            )
            .map_err(anyhow::Error::msg)?
            {
                Some(p) => {
                    println!("{}", p.display());
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("the boot loader did not say which partition the box booted from");
                    Ok(ExitCode::from(3))
                }
            }
        }
        SiteCmd::Dhcp { file } => {
            let s = site::load(&file)?;
            match s.dhcp_devs().as_slice() {
                [] => {
                    // Nothing to do; init respawns what exits, so stay.
                    loop {
                        std::thread::sleep(std::time::Duration::from_secs(u64::from(u32::MAX)));
                    }
                }
                [dev] => {
                    use std::os::unix::process::CommandExt as _;
                    let err = std::process::Command::new("/sbin/udhcpc")
                        .args([
                            "-f",
                            "-i",
                            dev,
                            "-s",
                            UDHCPC_HOOK,
                            "-t",
                            "5",
                            "-T",
                            "3",
                            "-A",
                            "10",
                        ])
                        .exec();
                    Err(anyhow::anyhow!("starting udhcpc: {err}"))
                }
                more => Err(anyhow::anyhow!(
                    "the site file asks for DHCP on {} interfaces; one is supported",
                    more.len()
                )),
            }
        }
        SiteCmd::DhcpEvent { event } => {
            runtime()?.block_on(shaper_user::kernel::net::dhcp_event(&event, |k| {
                std::env::var(k).ok()
            }))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
