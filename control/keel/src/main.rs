//! `keel`: the one binary of a keel compute host.
//!
//! Parses the command line into typed configuration and hands it to the
//! library that owns the work; nothing else happens here.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

mod client;
mod join;
mod private_file;
use clap::{Parser, Subcommand, ValueEnum};
use keel_control::server::{up, UpConfig};

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "keel: data-plane-first appliance for private-cloud compute hosts"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, env = "KEEL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

#[derive(Subcommand)]
enum Command {
    /// Start the all-in-one appliance: REST API and embedded state.
    Up {
        /// Address the REST API listens on.
        #[arg(long, env = "KEEL_LISTEN", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Directory holding all state (SQLite database, locks).
        #[arg(long, env = "KEEL_STATE_DIR", default_value = "./var/keel")]
        state_dir: PathBuf,
        /// VM acceleration: auto (KVM if a probe boot works), kvm or tcg.
        #[arg(long, env = "KEEL_ACCEL", default_value = "auto")]
        accel: AccelChoice,
        /// libvirt connection the host agent drives VMs through.
        #[arg(long, env = "KEEL_LIBVIRT_URI", default_value = "qemu:///system")]
        libvirt_uri: String,
        /// Seconds a graceful VM stop waits for the guest before forcing it off.
        #[arg(long, env = "KEEL_VM_SHUTDOWN_TIMEOUT", default_value_t = 60)]
        vm_shutdown_timeout: u64,
        /// Shared PostgreSQL database for many hosts and API nodes
        /// (postgres://user:password@host:port/database); without it, state
        /// is an embedded SQLite file in the state directory.
        #[arg(long, env = "KEEL_DATABASE", hide_env_values = true)]
        database: Option<String>,
        /// Serve only the REST API: no host agent in this process (an API
        /// node in front of a shared --database).
        #[arg(long, env = "KEEL_NO_HOST_AGENT")]
        no_host_agent: bool,
        /// This host's id (default: the machine id); distinct ids let
        /// several host agents share one machine, as tests do.
        #[arg(long, env = "KEEL_HOST_ID")]
        host_id: Option<String>,
        /// This host's interface on a physical network, as NAME=IFACE
        /// (repeat, or comma-separate in KEEL_UPLINKS): external networks on
        /// NAME reach the data plane through IFACE.
        #[arg(
            long = "uplink",
            env = "KEEL_UPLINKS",
            value_delimiter = ',',
            value_name = "NAME=IFACE"
        )]
        uplinks: Vec<String>,
        /// Join the control plane whose API is at this URL (a new compute
        /// host): it hands out the shared database this host then runs on
        /// (the answer is kept in the state directory).
        #[arg(
            long,
            env = "KEEL_JOIN",
            requires = "join_token",
            conflicts_with_all = ["database", "no_host_agent"],
            value_name = "URL"
        )]
        join: Option<String>,
        /// A system admin's API token for --join.
        #[arg(
            long,
            env = "KEEL_JOIN_TOKEN",
            hide_env_values = true,
            requires = "join"
        )]
        join_token: Option<String>,
        /// The database URL hosts that join this control plane are told,
        /// when they reach it at another address (default: --database).
        #[arg(
            long,
            env = "KEEL_HOST_DATABASE",
            hide_env_values = true,
            requires = "database"
        )]
        host_database: Option<String>,
    },
    /// Print the version.
    Version {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the OpenAPI document of the REST API.
    Openapi,
    /// Run the VPC data plane on the named interfaces (control: --socket).
    Dataplane(keel_dataplane::daemon::DaemonArgs),
    /// Build the bootable appliance image (see firmware/README.md).
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run a benchmark suite (list them with `keel bench list`).
    Bench {
        /// Suite name, or `list`.
        suite: String,
        /// Also write machine-readable results to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// A short pass (for CI): proves the suite runs; numbers are rough.
        #[arg(long)]
        quick: bool,
    },
    /// Serve one raw disk image as a vhost-user-blk device until SIGTERM.
    VhostBlk(VhostBlkArgs),
    /// Run the L4/L7 load balancer from a JSON config (reload: SIGHUP).
    Lb(keel_lb::daemon::LbArgs),
    /// Back up, restore, verify and prune disk images (CBT incrementals).
    Backup(BackupArgs),
    /// Log in to a keel API (kept for the other client commands).
    Login(client::LoginArgs),
    /// List resources of a kind (`keel list kinds` names them).
    List(client::ListArgs),
    /// Show one resource.
    Show(client::ShowArgs),
    /// Create a resource from key=value fields (and --wait for its task).
    Create(client::CreateArgs),
    /// Delete a resource (reads it first for If-Match).
    Delete(client::DeleteArgs),
    /// Run a resource action: start, stop, resize, restore, ...
    Action(client::ActionArgs),
    /// Follow tasks.
    Task {
        #[command(subcommand)]
        command: client::TaskCommand,
    },
    /// Continuous data protection: journal a group's disks and ship to a DR
    /// replica; run, inspect and promote the replica (see cdp/README.md).
    Cdp {
        #[command(subcommand)]
        command: CdpCommand,
    },
}

#[derive(Subcommand)]
enum CdpCommand {
    /// Serve a consistency group's disks as vhost-user-blk with the CDP
    /// journal on, shipping sealed segments to the replica, until SIGTERM.
    Source(CdpSourceArgs),
    /// Receive and apply a group's segments at the DR site until SIGTERM.
    Replica(CdpReplicaArgs),
    /// Stop a (stopped) replica for good at a recovery point: its disks
    /// become bootable raw images. Prints the point and the disk paths.
    Promote {
        /// Replica directory.
        #[arg(long)]
        dir: PathBuf,
        /// Recovery point (segment sequence number); default: the latest
        /// consistent one.
        #[arg(long)]
        to: Option<u64>,
    },
    /// Print a replica's state and recovery points (JSON).
    Status {
        /// Replica directory.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Create a site CA and source/replica certificates signed by it.
    Certs {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Name in the replica certificate (the source's --server-name).
        #[arg(long, default_value = "keel-replica")]
        replica_name: String,
    },
    /// Link bandwidth needed for an RPO: Z = 1.2 × SUM × 8 / (RPO − SUM/Y).
    Capacity {
        /// MB written per RPO period (SUM).
        #[arg(long)]
        sum_mb: f64,
        /// RPO in seconds.
        #[arg(long)]
        rpo_secs: f64,
        /// Cache write speed in MB/s (Y).
        #[arg(long)]
        cache_mb_s: f64,
    },
}

#[derive(clap::Args)]
struct CdpTlsArgs {
    /// This side's certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The site CA both certificates are signed by (PEM).
    #[arg(long)]
    ca: PathBuf,
}

#[derive(clap::Args)]
struct CdpSourceArgs {
    /// A disk of the group: SOCKET=IMAGE[=SERIAL] (repeat; disk id = position).
    #[arg(long = "disk", required = true, value_parser = parse_disk)]
    disks: Vec<(PathBuf, PathBuf, Option<String>)>,
    /// Also track changed blocks for backups at this granularity (bitmaps
    /// in IMAGE.cbt, as `keel vhost-blk --cbt-granularity`).
    #[arg(long)]
    cbt_granularity: Option<u64>,
    /// Journal (cache) directory of the group.
    #[arg(long)]
    journal: PathBuf,
    /// Consistency group id.
    #[arg(long)]
    group: u64,
    /// This site's id.
    #[arg(long)]
    site: u64,
    /// Request queues per disk.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// RPO: seal a segment every this many seconds (1 .. 86400).
    #[arg(long, default_value_t = 30)]
    rpo_secs: u64,
    /// Seal earlier at this segment size.
    #[arg(long, default_value_t = 64)]
    max_segment_mib: u64,
    /// Cache budget; beyond it the group falls back to a dirty bitmap.
    #[arg(long, default_value_t = 1024)]
    cache_mib: u64,
    /// Replica address HOST:PORT (journal only when absent).
    #[arg(long)]
    replica: Option<String>,
    /// Name in the replica's certificate.
    #[arg(long, default_value = "keel-replica")]
    server_name: String,
    /// zstd level for segments on the wire.
    #[arg(long)]
    zstd: Option<i32>,
    /// Bandwidth cap in Mbit/s.
    #[arg(long)]
    max_mbit: Option<u64>,
    /// Status file (JSON, rewritten every second); default JOURNAL/status.json.
    #[arg(long)]
    status: Option<PathBuf>,
    /// Synchronous mode (RPO 0): a guest write completes only once the
    /// replica has it; after this many seconds without an acknowledgement
    /// the group falls back to asynchronous until the replica caught up
    /// (1 .. 300).
    #[arg(long, value_name = "SECS")]
    sync_timeout_secs: Option<u64>,
    #[command(flatten)]
    tls: Option<CdpTlsArgs>,
}

#[derive(clap::Args)]
struct CdpReplicaArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// Replica directory (disk-N.raw, undo logs, state.json, status.json).
    #[arg(long)]
    dir: PathBuf,
    /// Consistency group id.
    #[arg(long)]
    group: u64,
    /// Source site whose segments are accepted.
    #[arg(long)]
    source_site: u64,
    /// Recovery points kept.
    #[arg(long, default_value_t = 16)]
    keep: usize,
    #[command(flatten)]
    tls: CdpTlsArgs,
}

fn parse_disk(s: &str) -> Result<(PathBuf, PathBuf, Option<String>), String> {
    let mut parts = s.splitn(3, '=');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(sock), Some(img), serial) if !sock.is_empty() && !img.is_empty() => Ok((
            PathBuf::from(sock),
            PathBuf::from(img),
            serial.map(str::to_owned),
        )),
        _ => Err(format!("expected SOCKET=IMAGE[=SERIAL], got {s:?}")),
    }
}

#[derive(clap::Args)]
struct BackupArgs {
    /// Backup repository directory (created by `create` if missing).
    #[arg(long, env = "KEEL_BACKUP_REPO")]
    repo: PathBuf,
    /// Encryption key (64 hex characters, from `keygen`): new points are
    /// encrypted with it, encrypted points are read with it.
    #[arg(long, env = "KEEL_BACKUP_KEY_FILE")]
    key_file: Option<PathBuf>,
    #[command(subcommand)]
    command: BackupCommand,
}

#[derive(Subcommand)]
enum BackupCommand {
    /// Back up a raw image of a stopped disk: incremental from IMAGE.cbt
    /// when --cbt-granularity is given and the bitmap is valid, else full.
    Create {
        /// Disk name (points are grouped by it).
        #[arg(long)]
        disk: String,
        /// Raw image or block device.
        #[arg(long)]
        image: PathBuf,
        /// Granularity the disk was served with (`keel vhost-blk --cbt-granularity`).
        #[arg(long)]
        cbt_granularity: Option<u64>,
        /// CBT bitmap of this backup chain.
        #[arg(long, default_value = "default")]
        bitmap: String,
        /// Chunk size in bytes (multiple of the CBT granularity).
        #[arg(long, default_value_t = 4 << 20)]
        chunk_size: u64,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// List backup points (JSON lines).
    List,
    /// Restore a point to a new file, or over an existing disk (--in-place).
    Restore {
        /// Point id (from `list`).
        point: String,
        /// Target file.
        #[arg(long)]
        to: PathBuf,
        /// Overwrite an existing disk of the same size.
        #[arg(long)]
        in_place: bool,
        /// Chunks in flight.
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
    /// Re-read and re-hash every chunk of one point (or of all points).
    Verify {
        /// Point id; all points when omitted.
        point: Option<String>,
    },
    /// Delete points beyond a max count / max age per disk (then run gc).
    Prune {
        /// Keep at most this many points per disk.
        #[arg(long)]
        max_count: Option<usize>,
        /// Delete points older than this many seconds.
        #[arg(long)]
        max_age_secs: Option<u64>,
    },
    /// Remove chunks no point references.
    Gc,
    /// Write a new random encryption key to a file (mode 0600; keep a copy
    /// elsewhere: without it, its points cannot be restored).
    Keygen {
        /// The key file to create.
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct VhostBlkArgs {
    /// vhost-user socket to listen on (QEMU connects to it).
    #[arg(long)]
    socket: PathBuf,
    /// Image file.
    #[arg(long)]
    image: PathBuf,
    /// Image format: raw or qcow2 (never guessed from the content).
    #[arg(long, default_value = "raw")]
    format: keel_vhost::ImageFormat,
    /// Expose the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Request queues (one worker thread per queue, up to the CPU count).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Bypass the host page cache (O_DIRECT).
    #[arg(long)]
    direct: bool,
    /// Serial number the guest reads (GET_ID).
    #[arg(long, default_value = "keel")]
    serial: String,
    /// Track changed blocks at this granularity in bytes (bitmaps in IMAGE.cbt).
    #[arg(long)]
    cbt_granularity: Option<u64>,
    /// Serve the control channel (live changed-block bitmaps, for backups
    /// while the disk is in use) on this unix socket.
    #[arg(long)]
    control: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Kernel + initramfs + iPXE script, and a UEFI GPT disk image.
    Build {
        /// Output directory.
        #[arg(long, default_value = "./keel-image")]
        out: PathBuf,
        /// The keel binary to ship (default: this one); it is stripped.
        #[arg(long)]
        keel_bin: Option<PathBuf>,
        /// Skip the disk image.
        #[arg(long)]
        no_disk: bool,
        /// Size of the empty ext4 KEEL_STATE partition on the disk (0: none).
        #[arg(long, default_value_t = 64)]
        state_mib: u32,
        /// Also ship QEMU (about 60 MB uncompressed).
        #[arg(long)]
        with_qemu: bool,
        /// The disk's boot loader: shim-grub (Debian's signed shim and GRUB:
        /// boots with secure boot on) or systemd-boot (unsigned).
        #[arg(long, default_value = "shim-grub")]
        boot_loader: BootLoaderChoice,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BootLoaderChoice {
    ShimGrub,
    SystemdBoot,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = format!("{err:#}"), "keel failed");
            eprintln!("keel: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `--uplink NAME=IFACE` values: each interface must exist here, and each
/// name and interface appear once.
fn parse_uplinks(values: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for value in values {
        let Some((name, iface)) = value.split_once('=') else {
            anyhow::bail!("--uplink {value:?}: expected NAME=IFACE");
        };
        if name.is_empty() || iface.is_empty() || iface.contains('/') {
            anyhow::bail!("--uplink {value:?}: expected NAME=IFACE");
        }
        if !std::path::Path::new("/sys/class/net").join(iface).exists() {
            anyhow::bail!("--uplink {value:?}: there is no interface {iface} on this host");
        }
        if out.values().any(|i| i == iface) {
            anyhow::bail!("--uplink {value:?}: interface {iface} is given twice");
        }
        if out.insert(name.to_owned(), iface.to_owned()).is_some() {
            anyhow::bail!("--uplink {value:?}: physical network {name} is given twice");
        }
    }
    Ok(out)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up {
            listen,
            state_dir,
            accel,
            libvirt_uri,
            vm_shutdown_timeout,
            database,
            no_host_agent,
            host_id,
            uplinks,
            join,
            join_token,
            host_database,
        } => {
            let uplinks = parse_uplinks(&uplinks)?;
            let database = match (join, join_token) {
                (Some(api), Some(token)) => Some(join::database_url(&api, &token, &state_dir)?),
                _ => database,
            };
            let keel_bin = std::env::current_exe().context("Cannot find the keel binary")?;
            let agent = keel_agent::AgentConfig {
                state_dir: PathBuf::new(),
                keel_bin,
                libvirt_uri,
                accel: match accel {
                    AccelChoice::Auto => None,
                    AccelChoice::Kvm => Some(keel_agent::Accel::Kvm),
                    AccelChoice::Tcg => Some(keel_agent::Accel::Tcg),
                },
                shutdown_timeout: std::time::Duration::from_secs(vm_shutdown_timeout),
                host_id,
                uplinks,
            };
            let services: keel_control::server::HostServices = Box::new(move |store, dir| {
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let handle = keel_agent::spawn(
                    store,
                    keel_agent::AgentConfig {
                        state_dir: dir,
                        ..agent
                    },
                    stop.clone(),
                )?;
                Ok(Box::new(move || {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    let _ = handle.join();
                }))
            });
            let runtime =
                tokio::runtime::Runtime::new().context("Cannot start the async runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal()?;
                let admin_password = std::env::var("KEEL_ADMIN_PASSWORD").ok();
                up(
                    UpConfig {
                        listen,
                        state_dir,
                        database,
                        host_database,
                        admin_password,
                    },
                    shutdown,
                    (!no_host_agent).then_some(services),
                )
                .await?;
                anyhow::Ok(())
            })?;
        }
        Command::Version { json } => {
            let version = env!("CARGO_PKG_VERSION");
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "version": version, "api_version": "v1" })
                );
            } else {
                println!("keel {version}");
            }
        }
        Command::Openapi => {
            let spec = keel_control::api::openapi();
            println!(
                "{}",
                spec.to_pretty_json()
                    .context("Cannot render the OpenAPI document")?
            );
        }
        Command::Image {
            command:
                ImageCommand::Build {
                    out,
                    keel_bin,
                    no_disk,
                    state_mib,
                    with_qemu,
                    boot_loader,
                },
        } => {
            let keel_bin = match keel_bin {
                Some(bin) => bin,
                None => std::env::current_exe().context("Cannot find this keel binary")?,
            };
            let mut config = keel_firmware::appliance::ImageConfig::new(&out, &keel_bin)?;
            config.disk = !no_disk;
            config.state_mib = state_mib;
            config.with_qemu = with_qemu;
            config.loader = match boot_loader {
                BootLoaderChoice::ShimGrub => keel_firmware::disk::BootLoader::SignedShimGrub,
                BootLoaderChoice::SystemdBoot => keel_firmware::disk::BootLoader::SystemdBoot,
            };
            println!("{}", keel_firmware::appliance::build(&config)?);
        }
        Command::Bench { suite, json, quick } => bench(&suite, json, quick)?,
        Command::Dataplane(args) => dataplane(args)?,
        Command::VhostBlk(args) => vhost_blk(args)?,
        Command::Lb(args) => keel_lb::daemon::run(args)?,
        Command::Backup(args) => backup(args)?,
        Command::Login(args) => client::login(args)?,
        Command::List(args) => client::list(args)?,
        Command::Show(args) => client::show(args)?,
        Command::Create(args) => client::create(args)?,
        Command::Delete(args) => client::delete(args)?,
        Command::Action(args) => client::action(args)?,
        Command::Task { command } => client::task(command)?,
        Command::Cdp { command } => cdp(command)?,
    }
    Ok(())
}

/// The data plane on AF_PACKET interfaces plus vhost-user-net NICs (the
/// dataplane crate cannot open those itself: keel-vhost depends on it).
fn dataplane(args: keel_dataplane::daemon::DaemonArgs) -> anyhow::Result<()> {
    let (ports, _servers) = keel_vhost::net::open_ports(&args.vhost_user_net)?;
    keel_dataplane::daemon::run_with_ports(args, ports)?;
    Ok(())
}

fn bench(suite: &str, json: Option<PathBuf>, quick: bool) -> anyhow::Result<()> {
    if suite == "list" {
        for s in keel_bench::suites::ALL {
            println!("{:<12} {}", s.name, s.about);
        }
        return Ok(());
    }
    let scale = if quick {
        keel_bench::Scale::Quick
    } else {
        keel_bench::Scale::Full
    };
    let report = keel_bench::run(suite, scale)?;
    print!("{}", report.to_text());
    if let Some(path) = json {
        report.write_json(&path)?;
        println!("results written to {}", path.display());
    }
    Ok(())
}

fn vhost_blk(args: VhostBlkArgs) -> anyhow::Result<()> {
    let opts = keel_vhost::DiskServeOptions {
        socket: args.socket,
        disk: keel_vhost::DiskOptions {
            path: args.image,
            readonly: args.readonly,
            direct: args.direct,
            format: args.format,
        },
        queues: args.queues,
        serial: args.serial,
        cbt_granularity: args.cbt_granularity,
        control: args.control,
    };
    let stop = keel_vhost::StopHandle::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("Cannot start the signal runtime")?;
    let signal = runtime.block_on(async { shutdown_signal() })?;
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || keel_vhost::serve_disk(&opts, &stop))
    };
    tracing::info!("serving vhost-user-blk");
    runtime.block_on(signal);
    stop.stop();
    server
        .join()
        .map_err(|_| anyhow::anyhow!("vhost-blk server thread panicked"))??;
    Ok(())
}

fn cdp(command: CdpCommand) -> anyhow::Result<()> {
    use keel_cdp::transport::tls::TlsFiles;
    let files = |t: CdpTlsArgs| TlsFiles {
        cert: t.cert,
        key: t.key,
        ca: t.ca,
    };
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("Cannot start the signal runtime")
    };
    match command {
        CdpCommand::Source(a) => {
            let mut journal =
                keel_cdp::journal::JournalConfig::new(&a.journal, a.group, a.site, Vec::new());
            journal.rpo = std::time::Duration::from_secs(a.rpo_secs);
            journal.max_segment_bytes = a.max_segment_mib << 20;
            journal.cache_limit_bytes = a.cache_mib << 20;
            journal.sync_timeout = a.sync_timeout_secs.map(std::time::Duration::from_secs);
            let ship = match (a.replica, a.tls) {
                (Some(replica), Some(tls)) => Some(keel_cdp::transport::ship::ShipConfig {
                    replica,
                    server_name: a.server_name,
                    tls: files(tls),
                    zstd_level: a.zstd,
                    max_bytes_per_sec: a.max_mbit.map(|m| m * 1_000_000 / 8),
                    status_file: Some(a.status.unwrap_or_else(|| a.journal.join("status.json"))),
                }),
                (Some(_), None) => anyhow::bail!("--replica needs --cert, --key and --ca"),
                (None, _) => None,
            };
            let config = keel_cdp::source::SourceConfig {
                disks: a
                    .disks
                    .into_iter()
                    .map(|(socket, image, serial)| keel_cdp::source::SourceDisk {
                        socket,
                        image,
                        serial,
                    })
                    .collect(),
                queues: a.queues,
                journal,
                ship,
                cbt_granularity: a.cbt_granularity,
            };
            let stop = keel_vhost::StopHandle::new();
            let rt = runtime()?;
            let signal = rt.block_on(async { shutdown_signal() })?;
            let server = {
                let stop = stop.clone();
                std::thread::spawn(move || keel_cdp::source::run(config, &stop))
            };
            tracing::info!("serving CDP source");
            rt.block_on(signal);
            stop.stop();
            server
                .join()
                .map_err(|_| anyhow::anyhow!("CDP source thread panicked"))??;
        }
        CdpCommand::Replica(a) => {
            let config = keel_cdp::replica::ReplicaConfig {
                listen: a.listen,
                dir: a.dir,
                group_id: a.group,
                source_site: a.source_site,
                keep: a.keep,
                tls: files(a.tls),
            };
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let rt = runtime()?;
            let signal = rt.block_on(async { shutdown_signal() })?;
            let server = {
                let stop = stop.clone();
                std::thread::spawn(move || keel_cdp::replica::serve(&config, &stop))
            };
            rt.block_on(async {
                tokio::select! {
                    _ = signal => {}
                    _ = async {
                        while !server.is_finished() {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                    } => {}
                }
            });
            stop.store(true, std::sync::atomic::Ordering::Release);
            server
                .join()
                .map_err(|_| anyhow::anyhow!("replica thread panicked"))??;
        }
        CdpCommand::Promote { dir, to } => {
            let mut r = keel_cdp::replica::Replica::open_existing(&dir)?;
            let point = r.promote(to)?;
            let disks: Vec<_> = r
                .state()
                .disks
                .iter()
                .map(|&(id, size)| {
                    serde_json::json!({"id": id, "size": size, "path": r.disk_path(id)})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"promoted_to": point, "disks": disks})
            );
        }
        CdpCommand::Status { dir } => {
            let r = keel_cdp::replica::Replica::open_existing(&dir)?;
            let st = r.state();
            println!(
                "{}",
                serde_json::json!({
                    "group_id": st.group_id, "source_site": st.source_site,
                    "last_seq": st.last_seq, "consistent": !st.in_resync,
                    "promoted": st.promoted, "points": r.points(),
                })
            );
        }
        CdpCommand::Certs { out, replica_name } => {
            let (s, r) = keel_cdp::transport::tls::generate_pki(&out, &replica_name)?;
            println!(
                "{}",
                serde_json::json!({
                    "ca": s.ca, "source": {"cert": s.cert, "key": s.key},
                    "replica": {"cert": r.cert, "key": r.key},
                })
            );
        }
        CdpCommand::Capacity {
            sum_mb,
            rpo_secs,
            cache_mb_s,
        } => {
            let z = keel_cdp::capacity::required_mbit_s(sum_mb, rpo_secs, cache_mb_s)?;
            println!("{}", serde_json::json!({"required_mbit_s": z}));
        }
    }
    Ok(())
}

fn backup(args: BackupArgs) -> anyhow::Result<()> {
    use keel_cdp::backup as b;
    let print = |v: serde_json::Value| println!("{v}");
    if let BackupCommand::Keygen { out } = &args.command {
        anyhow::ensure!(
            !out.exists(),
            "{} exists: not overwriting a key",
            out.display()
        );
        crate::private_file::write(out, b::ChunkKey::generate_hex()?.as_bytes())?;
        let key = b::ChunkKey::from_hex(&std::fs::read_to_string(out)?)?;
        println!(
            "{}",
            serde_json::json!({"key_file": out, "fingerprint": key.fingerprint()})
        );
        return Ok(());
    }
    if let BackupCommand::Create { .. } = args.command {
        b::Repository::create(&args.repo)?;
    }
    let mut repo = b::Repository::open(&args.repo)?;
    if let Some(path) = &args.key_file {
        let hex = std::fs::read_to_string(path)
            .with_context(|| format!("read key file {}", path.display()))?;
        repo = repo.with_key(
            b::ChunkKey::from_hex(&hex).with_context(|| format!("key file {}", path.display()))?,
        );
    }
    let progress = |p: b::Progress| {
        if p.total > 0 && p.done == p.total {
            eprintln!("{} of {} bytes", p.done, p.total);
        }
    };
    match args.command {
        BackupCommand::Create {
            disk,
            image,
            cbt_granularity,
            bitmap,
            chunk_size,
            threads,
        } => {
            let mut spec = b::BackupSpec::new(&disk, &image);
            spec.chunk_size = chunk_size;
            if let Some(t) = threads {
                spec.threads = t;
            }
            let cbt = cbt_granularity.map(|g| (g, bitmap.as_str()));
            let report = b::backup_stopped_disk(&repo, &spec, cbt, &progress)?;
            if let Some(why) = &report.fallback {
                eprintln!("keel: note: {why}");
            }
            print(serde_json::to_value(&report)?);
        }
        BackupCommand::List => {
            for p in repo.points()? {
                let zero = p.chunks.iter().filter(|c| c.is_none()).count();
                println!(
                    "{}",
                    serde_json::json!({
                        "id": p.id, "disk": p.disk, "kind": p.kind, "created_ms": p.created_ms,
                        "disk_size": p.disk_size, "chunk_size": p.chunk_size,
                        "chunks": p.chunks.len(), "zero_chunks": zero,
                        "parent": p.parent, "cbt": p.cbt, "fallback": p.fallback,
                        "encryption": p.encryption,
                    })
                );
            }
        }
        BackupCommand::Restore {
            point,
            to,
            in_place,
            threads,
        } => {
            let mode = if in_place {
                b::RestoreMode::InPlace
            } else {
                b::RestoreMode::NewFile
            };
            print(serde_json::to_value(b::restore(
                &repo, &point, &to, mode, threads, &progress,
            )?)?);
        }
        BackupCommand::Verify { point } => {
            let points = match point {
                Some(id) => vec![repo.load(&id)?],
                None => {
                    // Every point this key (or no key) reads.
                    let (mine, others): (Vec<_>, Vec<_>) = repo
                        .points()?
                        .into_iter()
                        .partition(|p| p.encryption == repo.encryption());
                    if !others.is_empty() {
                        eprintln!(
                            "keel: note: {} point(s) need another key and were not verified",
                            others.len()
                        );
                    }
                    mine
                }
            };
            let report = repo.verify(&points)?;
            print(serde_json::to_value(&report)?);
            anyhow::ensure!(report.ok(), "{} bad chunk use(s)", report.bad.len());
        }
        BackupCommand::Prune {
            max_count,
            max_age_secs,
        } => {
            let policy = b::Policy {
                max_count,
                max_age: max_age_secs.map(std::time::Duration::from_secs),
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis();
            print(serde_json::to_value(b::prune(
                &repo,
                policy,
                u64::try_from(now)?,
            )?)?);
        }
        BackupCommand::Gc => print(serde_json::to_value(repo.gc()?)?),
        BackupCommand::Keygen { .. } => unreachable!("handled before opening the repository"),
    }
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM. The handlers are installed
/// here, before the API serves, so a signal that arrives right after start-up
/// still shuts down gracefully instead of killing the process.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt()).context("Cannot watch SIGINT")?;
    let mut term = signal(SignalKind::terminate()).context("Cannot watch SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT received"),
            _ = term.recv() => tracing::info!("SIGTERM received"),
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
