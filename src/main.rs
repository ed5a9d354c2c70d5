//! The `regcache` command: `serve`, `ca init|show|path`, `config`.
//!
//! Errors in what the user typed or configured print one line and exit with
//! code 2; failures while running exit with code 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use regcache::app::App;
use regcache::config::{CaSource, Config, LogFormat, Settings, DEFAULT_TOML};
use regcache::proxy::Proxy;
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
    /// Inspect or clear the disk cache (while regcache is stopped)
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Write cached images to one tar file (an OCI image layout) for an air-gapped regcache
    Export(ExportArgs),
    /// Load a bundle from `regcache export` into the cache (while regcache is stopped)
    Import(ImportArgs),
    /// Fill the cache with images from upstream, as pulls would (all platforms unless --platform)
    Prefetch(Box<PrefetchArgs>),
    /// Print the built-in configuration, a starting point for --config
    Config,
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
    /// Directory of the disk cache [default: cache]
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
    /// Directory holding the regcache CA [default: certs]
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

/// A failure and the exit code it deserves.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl std::fmt::Display) -> Self {
        Self {
            code: 2,
            message: message.to_string(),
        }
    }
    fn runtime(message: impl std::fmt::Display) -> Self {
        Self {
            code: 1,
            message: message.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Ca(cmd) => ca(cmd),
        Command::Cache(cmd) => cache(cmd),
        Command::Export(args) => export(args),
        Command::Import(args) => import(args),
        Command::Prefetch(args) => prefetch(*args),
        Command::Config => {
            print!("{DEFAULT_TOML}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("regcache: error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Help and version go to stdout as clap writes them; a usage error is one
/// line on stderr and exit code 2.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(2)
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("regcache: error: {first} (see --help)");
            ExitCode::from(2)
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let settings = args
        .settings
        .layered(args.config.as_deref())
        .map_err(Failure::usage)?;
    let config = Config::from_settings(settings).map_err(Failure::usage)?;
    init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let started = std::time::SystemTime::now();
    let app = App::new(config).map_err(Failure::usage)?;
    runtime.block_on(async move {
        let proxy = Proxy::bind(app.clone()).await.map_err(|e| {
            Failure::runtime(format!("cannot listen on {}: {e}", app.config().listen))
        })?;
        let addr = proxy.local_addr().map_err(Failure::runtime)?;
        if let Some(mirror) = proxy.mirror_addr() {
            tracing::info!(%mirror, "registry mirror over HTTPS: https://{mirror}/v2/");
        }
        tracing::info!(
            %addr,
            ca = %app.ca.cert_path().display(),
            "listening; clients use HTTPS_PROXY=http://{addr} and trust http://{addr}/ca.crt"
        );
        let upkeep = tokio::spawn(app.clone().maintain(started));
        proxy.run(shutdown_signal()).await;
        upkeep.abort();
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

fn cache_dir(args: CacheArgs) -> Result<PathBuf, Failure> {
    let settings = Settings {
        cache_dir: args.cache_dir,
        ..Settings::default()
    }
    .layered(args.config.as_deref())
    .map_err(Failure::usage)?;
    Ok(Config::from_settings(settings)
        .map_err(Failure::usage)?
        .cache_dir)
}

fn prefetch(args: PrefetchArgs) -> Result<(), Failure> {
    use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
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
    let settings = args
        .serve
        .settings
        .layered(args.serve.config.as_deref())
        .map_err(Failure::usage)?;
    let config = Config::from_settings(settings).map_err(Failure::usage)?;
    init_logging(config.log_format);
    let app = App::new(config).map_err(Failure::usage)?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let bars = MultiProgress::new();
    let style =
        ProgressStyle::with_template("{prefix:30!} {bytes:>10} {binary_bytes_per_sec:>12} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
    let mut failed = Vec::new();
    runtime.block_on(async {
        for image in &images {
            let bar = bars.add(ProgressBar::new_spinner().with_style(style.clone()));
            bar.set_prefix(image.clone());
            match regcache::prefetch::prefetch(&app.state, image, &args.platform, |n| bar.inc(n))
                .await
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
        if let Err(e) = app.state.cache.flush().await {
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

/// The cache dir and size cap that `serve` would use with these flags.
fn cache_location(args: CacheArgs) -> Result<(PathBuf, u64), Failure> {
    let settings = Settings {
        cache_dir: args.cache_dir,
        ..Settings::default()
    }
    .layered(args.config.as_deref())
    .map_err(Failure::usage)?;
    let config = Config::from_settings(settings).map_err(Failure::usage)?;
    let cap = config
        .cache_size
        .unwrap_or_else(|| regcache::app::default_cache_size(&config.cache_dir));
    Ok((config.cache_dir, cap))
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
    )
    .map_err(bundle_failure)?;
    print!("{summary}");
    Ok(())
}

fn import(args: ImportArgs) -> Result<(), Failure> {
    use regcache::cache::bundle::import;
    let (dir, cap) = cache_location(args.cache)?;
    // Before the cache is opened (and created): a typo makes no cache dir.
    std::fs::File::open(&args.bundle)
        .map_err(|e| Failure::runtime(format!("{}: {e}", args.bundle.display())))?;
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    let cache = import::open_cache(&dir, cap).map_err(bundle_failure)?;
    let summary = runtime
        .block_on(import::import(&cache, &args.bundle))
        .map_err(bundle_failure)?;
    print!("{summary}");
    Ok(())
}

fn cache(cmd: CacheCommand) -> Result<(), Failure> {
    use regcache::cache::offline;
    match cmd {
        CacheCommand::Stats { cache } => {
            let index = offline::open(&cache_dir(cache)?).map_err(Failure::runtime)?;
            let snap = index.load().map_err(Failure::runtime)?;
            print!("{}", offline::stats(&snap));
        }
        CacheCommand::Ls { cache } => {
            let index = offline::open(&cache_dir(cache)?).map_err(Failure::runtime)?;
            let snap = index.load().map_err(Failure::runtime)?;
            print!("{}", offline::list(&snap));
        }
        CacheCommand::Rm { cache, target } => {
            let dir = cache_dir(cache)?;
            let index = offline::open(&dir).map_err(Failure::runtime)?;
            let snap = index.load().map_err(Failure::runtime)?;
            let removed =
                offline::remove(&dir, &index, &snap, &target).map_err(Failure::runtime)?;
            print!("removed:\n{removed}");
        }
        CacheCommand::Purge { cache } => {
            let dir = cache_dir(cache)?;
            offline::purge(&dir).map_err(Failure::runtime)?;
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
    let settings = Settings {
        ca_dir: ca.ca_dir,
        ca_cert: ca.ca_cert,
        ca_key: ca.ca_key,
        ..Settings::default()
    }
    .layered(ca.config.as_deref())
    .map_err(Failure::usage)?;
    Ok(Config::from_settings(settings).map_err(Failure::usage)?.ca)
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
