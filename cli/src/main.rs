//! `hush`: the Hush command-line client.
//!
//! Each invocation is one short-lived process working on one device's home
//! directory (`--home`, `$HUSH_HOME` or `~/.hush`). See `hush --help`.

use clap::{Parser, Subcommand};
use hush_cli::CliError;
use hush_cli::commands;
use hush_cli::driver::StopSignal;
use hush_cli::home::Home;
use hush_cli::output::{Style, err_line};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The relay's allocator (mimalloc, without transparent huge pages): the
/// catch-up benchmark (`client_bench`) runs the client's driver with it, so
/// the CLI runs the way it is measured. The commit thread seals and writes
/// megabytes per page, and with huge pages a sixth of a catch-up's time went
/// to the kernel zeroing fresh memory.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// End-to-end encrypted messages through a Hush relay.
///
/// Exit status: 0 success; 1 error; 2 usage; 3 relay unreachable;
/// 4 certificate mismatch or untrusted; 5 not confirmed in time (a sent
/// message stays in the outbox); 6 not initialised, already initialised, or
/// the home directory is in use by another hush process.
#[derive(Debug, Parser)]
#[command(name = "hush", version)]
struct Cli {
    /// This device's directory (default: $HUSH_HOME, else ~/.hush).
    #[arg(long, global = true, env = "HUSH_HOME", value_name = "DIR")]
    home: Option<PathBuf>,
    /// How to reach the relay: quic, ws (WebSocket over TLS on the same TCP
    /// port number) or auto (QUIC first; the WebSocket too after 300 ms or
    /// once QUIC fails; the first connected wins).
    #[arg(long, global = true, env = "HUSH_TRANSPORT", value_name = "quic|ws|auto", default_value = "auto", value_parser = transport)]
    transport: hush_cli::Transport,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create this device: a new user, or (with --link) another device of an existing one.
    Init {
        /// The relay, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        relay: String,
        /// Pin the relay's certificate by the SHA-256 of its DER (hex).
        /// Without it, the certificate must verify against the system roots.
        #[arg(long, value_name = "HEX")]
        cert_hash: Option<String>,
        /// Your display name (new users; default $USER).
        #[arg(long, conflicts_with = "link")]
        name: Option<String>,
        /// A link code from `hush link-code` on one of your devices.
        #[arg(long, value_name = "CODE")]
        link: Option<String>,
        /// With --link: how long to wait for the other device's welcome
        /// (and for the history import).
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
        wait: Duration,
        /// With --link: do not ask the other device for the message history.
        #[arg(long, requires = "link")]
        no_history: bool,
    },
    /// Print this user's contact code (give it to people who should reach you).
    Code,
    /// Print a one-time code that links a new device to this user (secret).
    LinkCode,
    /// Manage contacts.
    Contact {
        #[command(subcommand)]
        command: ContactCmd,
    },
    /// Groups: create, add, remove, leave, rename, list. Elsewhere a group is
    /// named `#NAME` (or a bare NAME that is no contact's).
    Group {
        #[command(subcommand)]
        command: hush_cli::group::GroupCmd,
    },
    /// This user's devices: list them, remove one.
    Device {
        #[command(subcommand)]
        command: hush_cli::device::DeviceCmd,
    },
    /// Send a message; exits 0 once the relay stored it.
    Send {
        /// The contact's name, or a group (`#NAME`; see `hush group`).
        name: String,
        /// The text.
        text: String,
        /// How long to try before giving up (the message stays in the outbox).
        #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = seconds)]
        wait: Duration,
        /// Ask the relay to keep it unread for its long (important)
        /// retention instead of the default one.
        #[arg(long)]
        important: bool,
    },
    /// Connect, fetch everything waiting, repair gaps, print new messages, exit.
    Sync {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// How long to wait for senders to resend missing messages.
        #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = seconds)]
        wait: Duration,
    },
    /// Stay connected and print messages as they arrive (until Ctrl-C / SIGTERM).
    Listen {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Outbox states, open gaps and counters (offline).
    Status {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Show the conversation with a contact or a group (offline).
    History {
        /// The contact's name, or a group (`#NAME`).
        name: String,
        /// How many of the latest messages.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Mark every message from a contact read (syncs to your other devices,
    /// sends read receipts).
    Read {
        /// The contact's name, or a group (`#NAME`).
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum ContactCmd {
    /// Add a contact under a name of your choice.
    Add {
        /// The name to use for them.
        name: String,
        /// Their contact code (`hush-contact:…`).
        code: String,
    },
    /// List contacts.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

fn seconds(text: &str) -> Result<Duration, String> {
    let v: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    Ok(Duration::from_secs_f64(v))
}

fn style(json: bool) -> Style {
    if json { Style::Json } else { Style::Human }
}

/// SIGINT or SIGTERM.
fn stop_signal() -> StopSignal {
    Box::pin(async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    })
}

async fn run(cli: Cli) -> Result<(), CliError> {
    // Known answers through this build's AEAD before any key or message is
    // touched: a broken build refuses to run (ClientError::SelfTest).
    hush_client::self_test::check_crypto()?;
    hush_cli::Transport::configure(cli.transport);
    let home = Home::resolve(cli.home)?;
    match cli.command {
        Cmd::Init {
            relay,
            cert_hash,
            name,
            link,
            wait,
            no_history,
        } => commands::init(&home, relay, cert_hash, name, link, wait, !no_history).await,
        Cmd::Code => commands::code(&home),
        Cmd::LinkCode => commands::link_code(&home).await,
        Cmd::Contact {
            command: ContactCmd::Add { name, code },
        } => commands::contact_add(&home, name, code).await,
        Cmd::Contact {
            command: ContactCmd::List { json },
        } => commands::contact_list(&home, style(json)),
        Cmd::Group { command } => hush_cli::group::run(&home, command).await,
        Cmd::Device { command } => hush_cli::device::run(&home, command).await,
        Cmd::Send {
            name,
            text,
            wait,
            important,
        } => commands::send(&home, name, text, wait, important).await,
        Cmd::Sync { json, wait } => commands::sync(&home, style(json), wait).await,
        Cmd::Listen { json } => commands::listen(&home, style(json), stop_signal()).await,
        Cmd::Status { json } => commands::status(&home, style(json)),
        Cmd::History { name, limit, json } => commands::history(&home, name, limit, style(json)),
        Cmd::Read { name } => commands::read(&home, name).await,
    }
}

fn transport(text: &str) -> Result<hush_cli::Transport, String> {
    hush_cli::Transport::parse(text).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            err_line(&format!("hush: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            err_line(&format!("hush: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}
