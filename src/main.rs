//! The `regcache` command line: `serve`, `prefetch`, `ca init|show|path`,
//! `cache stats|ls|rm|purge|verify`, `shared gc`, `export`, `import` and
//! `config`.
//!
//! A failure ends with one line on stderr, `regcache: error: …`; its
//! [`Failure`] kind decides the exit code: 2 (the usage code) when what the
//! user typed or configured is wrong, 1 when regcache could not start or do
//! its work.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use regcache::app::{App, StartError};
use regcache::cli::progress::ImageSpinners;
use regcache::config::{
    with_defaults_in_help, CaSource, Config, ConfigError, LogFormat, Settings, DEFAULT_TOML,
};
use regcache::proxy::Proxy;
use regcache::serve::state::{State, StateError};
use regcache::shared::{CreateProbe, SharedStore};
use regcache::tls::ca::{CERT_FILE, KEY_FILE};
use regcache::tls::CertificateAuthority;
use sha2::{Digest, Sha256};

/// A forward, TLS-intercepting caching proxy for container registries.
///
/// Point clients at it with HTTPS_PROXY=http://HOST:3128 and make them trust
/// its CA (curl http://HOST:3128/ca.crt).
#[derive(Parser)]
#[command(name = "regcache", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (with no options: 127.0.0.1:3128, CA in ./certs)
    Serve(Box<ServeArgs>),
    /// Manage regcache's certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// Inspect or clear the disk cache (through the running regcache's admin API if one holds it)
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Look after the shared tier (shared_store) of many nodes
    #[command(subcommand)]
    Shared(SharedCommand),
    /// Write cached images to one tar file (an OCI image layout) for an air-gapped regcache
    Export(ExportArgs),
    /// Load a bundle from `regcache export` into the cache (while regcache is stopped)
    Import(ImportArgs),
    /// Fill the cache with images from upstream, as pulls would (all platforms unless --platform)
    Prefetch(Box<PrefetchArgs>),
    /// Print the built-in configuration, a starting point for --config
    Config,
    /// Check the image rules ([[rules]]) of the configuration
    #[command(subcommand)]
    Rules(RulesCommand),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Say which rule an image matches and what it does (alpine, ghcr.io/org/tool@sha256:…)
    Test {
        /// TOML configuration file holding the rules
        #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Image references
        #[arg(required = true)]
        images: Vec<String>,
    },
}

#[derive(Args)]
struct PrefetchArgs {
    /// Images: alpine:3.20, ghcr.io/org/tool:1, registry.k8s.io/pause@sha256:…
    images: Vec<String>,
    /// A file with one image per line (# comments and blank lines ignored)
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Only this platform of multi-platform images, e.g. linux/amd64 (repeatable)
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Vec<String>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Entries, bytes, tags and the hit ratio
    Stats {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Every cached tag (with its digest), then every entry, newest first
    Ls {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Remove a digest (sha256:...) or an image tag (alpine:3.20, ghcr.io/org/tool:1)
    Rm {
        #[command(flatten)]
        cache: CacheArgs,
        /// Digest or image reference
        target: String,
    },
    /// Remove everything in the cache
    Purge {
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Hash every entry against its digest; remove the damaged ones (exit code 1 if any)
    Verify {
        #[command(flatten)]
        cache: CacheArgs,
    },
}

#[derive(Subcommand)]
enum SharedCommand {
    /// Delete the objects no node used for DURATION (run it daily; leased objects are kept)
    Gc(GcArgs),
}

#[derive(Args)]
struct GcArgs {
    /// TOML configuration file to take shared_store from
    #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The shared tier: s3://BUCKET/PREFIX (credentials and endpoint from AWS_* variables)
    #[arg(long, env = "REGCACHE_SHARED_STORE", value_name = "URL")]
    shared_store: Option<String>,
    /// Delete objects whose last use is older than this: 30d, 12h, 90m (over a day: nodes mark a use once a day)
    #[arg(long, value_name = "DURATION", value_parser = regcache::config::parse_duration)]
    unused_for: std::time::Duration,
    /// List what would be deleted; delete nothing
    #[arg(long)]
    dry_run: bool,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// The bundle to write (written as FILE.partial, renamed when complete)
    #[arg(long, short, value_name = "FILE")]
    output: PathBuf,
    /// Images to export (alpine:3.20, ghcr.io/org/tool:1, name@sha256:...) [default: every cached tag]
    #[arg(value_name = "IMAGE")]
    images: Vec<String>,
    /// Also export images of repositories not known public (named on stderr); an importing regcache guards them
    #[arg(long)]
    include_private: bool,
}

#[derive(Args)]
struct ImportArgs {
    #[command(flatten)]
    cache: CacheArgs,
    /// A bundle written by `regcache export` (or any OCI image layout tar
    /// whose images carry an io.regcache.ref annotation)
    #[arg(value_name = "BUNDLE")]
    bundle: PathBuf,
}

#[derive(Args)]
struct CacheArgs {
    /// TOML configuration file to take cache_dir from
    #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of the disk cache
    #[arg(long, env = "REGCACHE_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML configuration file; flags and REGCACHE_* variables override it
    #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA in ca_dir if there is none (with --force: replace it)
    Init {
        #[command(flatten)]
        ca: CaArgs,
        /// Replace an existing CA; clients must trust the new one
        #[arg(long)]
        force: bool,
    },
    /// Print the CA certificate (PEM) and its details
    Show {
        #[command(flatten)]
        ca: CaArgs,
    },
    /// Print the path of the CA certificate
    Path {
        #[command(flatten)]
        ca: CaArgs,
    },
}

#[derive(Args)]
struct CaArgs {
    /// TOML configuration file to take ca_dir/ca_cert/ca_key from
    #[arg(long, env = "REGCACHE_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding the regcache CA
    #[arg(long, env = "REGCACHE_CA_DIR", value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// An organisation's CA certificate (PEM), instead of ca_dir
    #[arg(
        long,
        env = "REGCACHE_CA_CERT",
        value_name = "FILE",
        requires = "ca_key"
    )]
    ca_cert: Option<PathBuf>,
    /// Private key of --ca-cert (PEM, PKCS#8)
    #[arg(
        long,
        env = "REGCACHE_CA_KEY",
        value_name = "FILE",
        requires = "ca_cert"
    )]
    ca_key: Option<PathBuf>,
}

/// The exit code of a usage error, as for clap's own.
const USAGE_CODE: u8 = 2;

/// Why a command failed, as a line for stderr; the kind decides the exit code.
enum Failure {
    /// What the user typed or configured is wrong: the command line, the
    /// environment, the config file or a value in them, or the proxy users
    /// file (who may use the proxy). Exit code 2.
    Usage(String),
    /// regcache could not do what a valid invocation asked: start (the CA,
    /// upstream trust, the cache, the listening socket) or do its work (I/O,
    /// upstream, a damaged cache). Exit code 1.
    Run(String),
}

impl Failure {
    fn usage(message: impl std::fmt::Display) -> Self {
        Self::Usage(message.to_string())
    }

    fn runtime(message: impl std::fmt::Display) -> Self {
        Self::Run(message.to_string())
    }

    /// Prints the failure on stderr; returns its exit code.
    fn report(self) -> ExitCode {
        let (code, message) = match self {
            Failure::Usage(message) => (USAGE_CODE, message),
            Failure::Run(message) => (1, message),
        };
        eprintln!("regcache: error: {message}");
        ExitCode::from(code)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Failure::usage(e)
    }
}

impl From<StartError> for Failure {
    /// A file named by the configuration that cannot be used (proxy users,
    /// regcache's registry accounts) is configuration to fix; every other
    /// start error is regcache failing to start.
    fn from(e: StartError) -> Self {
        match e {
            StartError::Access(_)
            | StartError::AdminToken(_)
            | StartError::State(StateError::Account(_)) => Failure::usage(e),
            StartError::Tls(_) | StartError::State(_) => Failure::runtime(e),
        }
    }
}

/// The command line, parsed with `--help` showing the defaults of
/// `default.toml`; an error is the exit code to leave with.
fn parse_command_line() -> Result<Cli, ExitCode> {
    let mut command =
        with_defaults_in_help(Cli::command()).map_err(|e| Failure::from(e).report())?;
    let mut matches = command
        .try_get_matches_from_mut(std::env::args_os())
        .map_err(usage_error)?;
    Cli::from_arg_matches_mut(&mut matches).map_err(|e| usage_error(e.format(&mut command)))
}

fn main() -> ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Ca(cmd) => ca(cmd),
        Command::Cache(cmd) => cache(cmd),
        Command::Shared(SharedCommand::Gc(args)) => shared_gc(args),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Prefetch(args) => prefetch(*args),
        Command::Config => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
        Command::Rules(RulesCommand::Test { config, images }) => rules_test(config, &images),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

/// Help and version go to stdout as clap writes them; a usage error is one
/// line on stderr and exit code 2 ([`USAGE_CODE`]).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(USAGE_CODE)
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            Failure::usage(format!("{first} (see --help)")).report()
        }
    }
}

/// The configuration from these flags (and environment) over the config file,
/// if any, over the built-in defaults.
fn load_config(flags: Settings, config_file: Option<&Path>) -> Result<Config, Failure> {
    Ok(Config::from_settings(flags.layered(config_file)?)?)
}

/// The start-up probe of the shared store: a store that ignores
/// conditional create stops regcache (exit 2) unless
/// `shared_single_flight = false`; one that does not answer is used when
/// it does.
async fn check_shared_store(shared: &SharedStore, single_flight: bool) -> Result<(), Failure> {
    match shared.probe_conditional_create().await {
        CreateProbe::Enforced if single_flight => {
            tracing::info!(
                store = shared.name(),
                "shared store enforces conditional create: one upstream fetch per cluster"
            );
        }
        CreateProbe::Enforced => shared.without_leases(),
        CreateProbe::Ignored if single_flight => {
            return Err(Failure::usage(format!(
                "shared_store {}: the store ignores conditional writes (If-None-Match: *), so nodes \
                 cannot agree on one fetcher; use a store that enforces them, or set \
                 shared_single_flight = false to let each node fetch on its own",
                shared.name()
            )));
        }
        CreateProbe::Ignored => {
            tracing::warn!(store = shared.name(), "shared store ignores conditional writes: each node fetches on its own (shared_single_flight = false)");
            shared.without_leases();
        }
        CreateProbe::Unreachable(error) => {
            tracing::warn!(store = shared.name(), %error, "shared store not reachable at start: serving without it until it answers");
            if !single_flight {
                shared.without_leases();
            }
        }
    }
    Ok(())
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = load_config(args.settings, args.config.as_deref())?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let started = std::time::SystemTime::now();
    let app = App::new(config)?;
    runtime.block_on(async move {
        if let Some(shared) = &app.state.shared {
            check_shared_store(shared, app.config().shared_single_flight).await?;
            tokio::spawn(shared.clone().retry_uploads());
        }
        let proxy = Proxy::bind(app.clone()).await.map_err(|e| {
            Failure::runtime(format!("cannot listen on {}: {e}", app.config().listen))
        })?;
        let addr = proxy.local_addr().map_err(Failure::runtime)?;
        if let Some(mirror) = proxy.mirror_addr() {
            tracing::info!(%mirror, "registry mirror over HTTPS: https://{mirror}/v2/");
        }
        if let (Some(peer), Some(endpoint)) = (proxy.peer_addr(), &app.config().peer) {
            tracing::info!(%peer, advertised = %endpoint.advertise, "peer endpoint for the other nodes (mutual TLS, the regcache CA)");
        }
        if let Some(metrics) = proxy.metrics_addr() {
            tracing::info!(%metrics, "Prometheus metrics: http://{metrics}/metrics");
        }
        tracing::info!(
            %addr,
            ca = %app.ca.cert_path().display(),
            "listening; clients use HTTPS_PROXY=http://{addr} and trust http://{addr}/ca.crt"
        );
        let cache_dir = app.config().cache_dir.clone();
        if let Err(e) = regcache::admin::api::write_discovery(&cache_dir, addr).await {
            tracing::warn!(error = %e, "cannot write the admin API address into cache_dir; `regcache cache` commands will not find this regcache");
        }
        let upkeep = tokio::spawn(app.clone().maintain(started));
        let warm = app.config().prefetch_file.clone().map(|file| {
            let every = app.config().prefetch_interval;
            tokio::spawn(regcache::prefetch::warm::keep_warm(
                app.state.clone(),
                file,
                every,
            ))
        });
        proxy.run(shutdown_signal()).await;
        upkeep.abort();
        if let Some(warm) = warm {
            warm.abort();
        }
        // Clients got the last byte of a download once it matched; its
        // entry is committed just after. Let those commits end.
        let grace = app.state.config.shutdown_grace;
        if tokio::time::timeout(grace, app.state.cache.commits_settled())
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown grace period over; downloads still being committed are dropped"
            );
        }
        regcache::admin::api::remove_discovery(&cache_dir, addr).await;
        if let Err(e) = app.state.cache.flush().await {
            tracing::warn!(error = %e, "cannot write cache access times");
        }
        tracing::info!("stopped");
        Ok(())
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops regcache");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("REGCACHE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// The configuration `serve` would use for the cache with these flags.
/// `regcache rules test`: one line per image, as [`regcache::registry::rules::Rules::explain`] says.
fn rules_test(config: Option<PathBuf>, images: &[String]) -> Result<(), Failure> {
    let config = load_config(Settings::default(), config.as_deref())?;
    for image in images {
        let image = regcache::registry::ImageRef::parse(image)
            .map_err(|e| Failure::usage(format!("{image:?}: {e}")))?;
        println!(
            "{}",
            config
                .rules
                .explain(&image.registry, image.repository.as_str())
        );
    }
    Ok(())
}

fn cache_config(args: CacheArgs) -> Result<Config, Failure> {
    let flags = Settings {
        cache_dir: args.cache_dir,
        ..Settings::default()
    };
    load_config(flags, args.config.as_deref())
}

fn cache_dir(args: CacheArgs) -> Result<PathBuf, Failure> {
    Ok(cache_config(args)?.cache_dir)
}

fn prefetch(args: PrefetchArgs) -> Result<(), Failure> {
    let mut images = args.images;
    if let Some(file) = &args.file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Failure::usage(format!("cannot read {}: {e}", file.display())))?;
        images.extend(
            text.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(str::to_string),
        );
    }
    if images.is_empty() {
        return Err(Failure::usage("name at least one image, or --file"));
    }
    let config = load_config(args.serve.settings, args.serve.config.as_deref())?;
    init_logging(config.log_format);
    // Only what serving needs: no CA, no proxy users, no listener.
    let state = State::new(config, None).map_err(StartError::from)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let spinners = ImageSpinners::default();
    let mut failed = Vec::new();
    runtime.block_on(async {
        for image in &images {
            let bar = spinners.add(image);
            match regcache::prefetch::prefetch(&state, image, &args.platform, |n| bar.inc(n)).await
            {
                Ok(done) => {
                    bar.finish_with_message(format!(
                        "ok: {} manifests, {} blobs ({} already cached)",
                        done.manifests, done.blobs, done.already_cached
                    ));
                    eprintln!(
                        "prefetched {image}: {} manifests, {} blobs, {} bytes",
                        done.manifests, done.blobs, done.bytes
                    );
                }
                Err(e) => {
                    bar.abandon_with_message("failed");
                    eprintln!("regcache: cannot prefetch {image}: {e}");
                    failed.push(image.clone());
                }
            }
        }
        if let Err(e) = state.cache.flush().await {
            tracing::warn!(error = %e, "cannot write cache access times");
        }
    });
    let ok = images.len() - failed.len();
    eprintln!("{ok} of {} images prefetched", images.len());
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::runtime(format!("failed: {}", failed.join(", "))))
    }
}

/// `regcache shared gc`: one garbage collection of the shared tier; the
/// deleted objects (or, with --dry-run, those that would be) on stdout,
/// then a summary. Exit code 1 when the store cannot be listed or a
/// delete failed.
fn shared_gc(args: GcArgs) -> Result<(), Failure> {
    use regcache::shared::gc::GcOptions;
    let flags = Settings {
        shared_store: args.shared_store,
        ..Settings::default()
    };
    let config = load_config(flags, args.config.as_deref())?;
    init_logging(config.log_format);
    let Some(url) = config.shared_store else {
        return Err(Failure::usage(
            "no shared_store to collect: give --shared-store s3://BUCKET/PREFIX, REGCACHE_SHARED_STORE or shared_store in --config",
        ));
    };
    let shared = SharedStore::from_url(&url).map_err(Failure::usage)?;
    let options = GcOptions {
        unused_for: args.unused_for,
        dry_run: args.dry_run,
    };
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let report = runtime
        .block_on(shared.gc(&options, |key, size| {
            println!("{verb} {key} ({size} bytes)");
        }))
        .map_err(Failure::runtime)?;
    print!("{report}");
    if report.failed > 0 {
        return Err(Failure::runtime(format!(
            "shared_store {url}: {} deletes failed",
            report.failed
        )));
    }
    Ok(())
}

fn bundle_failure(e: regcache::cache::bundle::BundleError) -> Failure {
    use regcache::cache::bundle::BundleError;
    match e {
        BundleError::Reference(_) => Failure::usage(e),
        _ => Failure::runtime(e),
    }
}

fn export(args: ExportArgs) -> Result<(), Failure> {
    let dir = cache_dir(args.cache)?;
    let summary = regcache::cache::bundle::export::export(
        &dir,
        &args.images,
        &args.output,
        args.include_private,
        &regcache::cli::progress::ByteBars::keeping_finished(),
    )
    .map_err(bundle_failure)?;
    print!("{summary}");
    Ok(())
}

fn import(args: ImportArgs) -> Result<(), Failure> {
    use regcache::cache::bundle::import;
    let config = cache_config(args.cache)?;
    // Before the cache is opened (and created): a typo makes no cache dir.
    std::fs::File::open(&args.bundle)
        .map_err(|e| Failure::runtime(format!("{}: {e}", args.bundle.display())))?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let cache =
        import::open_cache(&config.cache_dir, config.cache_cap()).map_err(bundle_failure)?;
    let summary = runtime
        .block_on(import::import(
            &cache,
            &args.bundle,
            &config.rules,
            std::sync::Arc::new(regcache::cli::progress::ByteBars::clearing_finished()),
        ))
        .map_err(bundle_failure)?;
    print!("{summary}");
    Ok(())
}

/// Where `cache stats|ls|rm|purge` find the cache: on disk, or held by a
/// running regcache that is asked through its admin API.
enum Holder {
    /// No regcache has it open: the index, opened here.
    Disk(regcache::cache::index::Index),
    /// A running regcache holds it.
    Running(regcache::cli::remote::Remote),
}

/// Opens the index of `config`'s cache, or finds the regcache holding it.
fn holder(config: &Config) -> Result<Holder, Failure> {
    use regcache::cache::{offline, CacheError};
    match offline::open(&config.cache_dir) {
        Ok(index) => Ok(Holder::Disk(index)),
        Err(CacheError::InUse(_)) => {
            let token = config.admin_token_file.as_ref().map(|path| {
                regcache::config::secret::read_owner_secret(path).map_err(|e| e.to_string())
            });
            regcache::cli::remote::Remote::find(&config.cache_dir, token)
                .map(Holder::Running)
                .map_err(Failure::runtime)
        }
        Err(e) => Err(Failure::runtime(e)),
    }
}

fn cache(cmd: CacheCommand) -> Result<(), Failure> {
    use regcache::cache::offline;
    match cmd {
        CacheCommand::Stats { cache } => match holder(&cache_config(cache)?)? {
            Holder::Disk(index) => {
                let snap = index.load().map_err(Failure::runtime)?;
                print!("{}", offline::stats(&snap));
            }
            Holder::Running(remote) => {
                print!("{}", remote.stats().map_err(Failure::runtime)?);
            }
        },
        CacheCommand::Ls { cache } => match holder(&cache_config(cache)?)? {
            Holder::Disk(index) => {
                let snap = index.load().map_err(Failure::runtime)?;
                print!("{}", offline::list(&snap));
            }
            Holder::Running(remote) => {
                let images = remote.images().map_err(Failure::runtime)?;
                let snap = regcache::cache::index::Snapshot {
                    tags: images.tags,
                    content: images.content,
                    ..Default::default()
                };
                print!("{}", offline::list(&snap));
            }
        },
        CacheCommand::Rm { cache, target } => {
            let config = cache_config(cache)?;
            let lines = match holder(&config)? {
                Holder::Disk(index) => {
                    let snap = index.load().map_err(Failure::runtime)?;
                    offline::remove(&config.cache_dir, &index, &snap, &target)
                        .map_err(Failure::runtime)?
                        .lines()
                }
                Holder::Running(remote) => {
                    remote.remove(&target).map_err(Failure::runtime)?.removed
                }
            };
            println!("removed:");
            for line in lines {
                println!("{line}");
            }
        }
        CacheCommand::Purge { cache } => {
            let config = cache_config(cache)?;
            let dir = config.cache_dir.clone();
            match holder(&config)? {
                Holder::Disk(index) => {
                    drop(index);
                    offline::purge(&dir).map_err(Failure::runtime)?;
                }
                Holder::Running(remote) => {
                    let purged = remote.purge().map_err(Failure::runtime)?;
                    eprintln!(
                        "the running regcache at {} removed {} entries ({} bytes)",
                        remote.addr(),
                        purged.entries,
                        purged.bytes
                    );
                }
            }
            println!("purged {}", dir.display());
        }
        CacheCommand::Verify { cache } => {
            let dir = cache_dir(cache)?;
            let index = offline::open(&dir).map_err(Failure::runtime)?;
            let snap = index.load().map_err(Failure::runtime)?;
            let report = offline::verify(&dir, &index, &snap).map_err(Failure::runtime)?;
            print!("{report}");
            if !report.damaged.is_empty() {
                return Err(Failure::runtime(format!(
                    "{} damaged cache entries found and removed",
                    report.damaged.len()
                )));
            }
        }
    }
    Ok(())
}

fn ca_source(ca: CaArgs) -> Result<CaSource, Failure> {
    let flags = Settings {
        ca_dir: ca.ca_dir,
        ca_cert: ca.ca_cert,
        ca_key: ca.ca_key,
        ..Settings::default()
    };
    Ok(load_config(flags, ca.config.as_deref())?.ca)
}

fn ca(cmd: CaCommand) -> Result<(), Failure> {
    match cmd {
        CaCommand::Init { ca, force } => {
            let CaSource::Dir(dir) = ca_source(ca)? else {
                return Err(Failure::usage(
                    "ca init manages regcache's own CA in ca_dir; ca_cert/ca_key name a CA regcache does not write",
                ));
            };
            let exists = dir.join(CERT_FILE).exists() || dir.join(KEY_FILE).exists();
            if exists && !force {
                let ca = CertificateAuthority::load_or_create(&CaSource::Dir(dir))
                    .map_err(Failure::runtime)?;
                println!(
                    "{} (already exists; --force replaces it)",
                    ca.cert_path().display()
                );
                return Ok(());
            }
            let ca = CertificateAuthority::create(&dir).map_err(Failure::runtime)?;
            println!("{}", ca.cert_path().display());
            Ok(())
        }
        CaCommand::Show { ca } => {
            let ca = load_existing(ca_source(ca)?)?;
            print!("{}", describe(&ca));
            print!("{}", ca.cert_pem());
            Ok(())
        }
        CaCommand::Path { ca } => {
            let path = match ca_source(ca)? {
                CaSource::Dir(dir) => dir.join(CERT_FILE),
                CaSource::Files { cert, .. } => cert,
            };
            let path = std::path::absolute(&path).unwrap_or(path);
            println!("{}", path.display());
            Ok(())
        }
    }
}

fn load_existing(source: CaSource) -> Result<CertificateAuthority, Failure> {
    if let CaSource::Dir(dir) = &source {
        if !dir.join(CERT_FILE).exists() && !dir.join(KEY_FILE).exists() {
            return Err(Failure::runtime(format!(
                "no CA in {} yet; create one with `regcache ca init` (or start `regcache serve`)",
                dir.display()
            )));
        }
    }
    CertificateAuthority::load_or_create(&source).map_err(Failure::runtime)
}

/// Subject, validity and SHA-256 fingerprint, one per line.
fn describe(ca: &CertificateAuthority) -> String {
    let der = ca.cert_der().as_ref();
    let fingerprint = Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    let mut out = format!("File:        {}\n", ca.cert_path().display());
    if let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) {
        out += &format!("Subject:     {}\n", cert.subject());
        out += &format!("Not before:  {}\n", cert.validity().not_before);
        out += &format!("Not after:   {}\n", cert.validity().not_after);
    }
    out += &format!("SHA-256:     {fingerprint}\n");
    out
}
