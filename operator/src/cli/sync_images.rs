//! `regmirror sync-images`: copy the images an air-gapped cluster needs into one of its
//! RegistryMirrors, where its nodes will ask for them, with the credentials and CA the
//! mirror's own YAML gives (Secrets resolved as the operator would).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use regmirror_core::model::ResolvedMirror;

use super::{check, InputArgs};
use crate::sync::remote::{auth_file_credentials, same_registry};
use crate::sync::{
    self, human_bytes, images, Access, Destination, Job, Plan, Platform, Progress, ProgressMode,
    Remote, Syncer, Totals,
};

#[derive(Debug, clap::Args)]
pub struct SyncImagesArgs {
    #[command(flatten)]
    pub input: InputArgs,
    /// The images: a file (one reference a line, `#` comments) or references separated by
    /// commas; by tag or digest, normalised like docker (`nginx` is
    /// docker.io/library/nginx:latest). May be given several times.
    #[arg(long = "images", value_name = "LIST", required = true)]
    pub images: Vec<String>,
    /// The RegistryMirror (metadata.name, in PATHS) to fill.
    #[arg(long = "to", value_name = "MIRROR")]
    pub to: String,
    /// Which of its endpoints to fill (0 is the first).
    #[arg(long, default_value_t = 0)]
    pub endpoint: usize,
    /// Copy only this platform of a multi-platform image (os/arch[/variant]); may be given
    /// several times. Without it, every platform of an index.
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<Platform>,
    /// A docker config file (`docker login`'s config.json) with credentials for the images'
    /// registries, when the YAML has none for them.
    #[arg(long, value_name = "FILE")]
    pub from_auth_file: Option<PathBuf>,
    /// A CA bundle (PEM) for the images' registries, when the YAML has none for them.
    #[arg(long, value_name = "FILE")]
    pub from_ca_file: Option<PathBuf>,
    /// Speak plain http to the images' registries (when the YAML does not list them).
    #[arg(long)]
    pub from_plain_http: bool,
    /// List what would be copied, and copy nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Blobs copied at once.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    /// A progress bar (on a terminal by default) or plain lines.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
}

/// Runs the command; the exit code: 0 all copied, 1 something failed (each named), 2 the
/// input is unusable.
pub fn main(args: SyncImagesArgs) -> i32 {
    match prepare(&args) {
        Ok(prepared) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime");
            runtime.block_on(run(&args, prepared))
        }
        Err((code, message)) => {
            eprintln!("{message}");
            code
        }
    }
}

/// What the YAML and the lists say, checked before anything is sent.
struct Prepared {
    mirror: String,
    endpoint_url: String,
    dest: Access,
    jobs: Vec<Job>,
    /// How to reach each source registry, by host.
    sources: BTreeMap<String, Access>,
}

fn prepare(args: &SyncImagesArgs) -> Result<Prepared, (i32, String)> {
    let checked = check(&args.input);
    let Some(mirror) = checked.resolved.iter().find(|m| m.name == args.to) else {
        let mut message: Vec<String> = checked.problems.iter().map(|p| p.to_string()).collect();
        if !checked.origins.contains_key(&args.to) {
            let known: Vec<&str> = checked.origins.keys().map(String::as_str).collect();
            message.push(format!(
                "no RegistryMirror named {:?} in the manifests (found: {})",
                args.to,
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                }
            ));
        }
        message.push(format!(
            "nothing copied: RegistryMirror {:?} is not usable",
            args.to
        ));
        return Err((1, message.join("\n")));
    };
    for problem in &checked.problems {
        eprintln!("warning: {problem}");
    }
    let Some(endpoint) = mirror.endpoints.get(args.endpoint) else {
        return Err((
            2,
            format!(
                "RegistryMirror {:?} has {} endpoint(s); --endpoint {} is not one of them",
                mirror.name,
                mirror.endpoints.len(),
                args.endpoint
            ),
        ));
    };
    let destination = Destination::new(mirror, &endpoint.url);
    let mut jobs = Vec::new();
    let mut problems = Vec::new();
    for list in &args.images {
        match images::parse_list(list) {
            Ok(references) => {
                for source in references {
                    match destination.reference_for(&source) {
                        Ok(dest) => jobs.push(Job { source, dest }),
                        Err(e) => problems.push(e.to_string()),
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if jobs.is_empty() && problems.is_empty() {
        problems.push("--images lists no image".to_owned());
    }
    if !problems.is_empty() {
        problems.push("nothing copied".to_owned());
        return Err((2, problems.join("\n")));
    }

    let ca = match &args.from_ca_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| (2, format!("--from-ca-file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let mut sources = BTreeMap::new();
    for job in &jobs {
        let host = job.source.registry().to_owned();
        if sources.contains_key(&host) {
            continue;
        }
        let access = match source_in_yaml(&checked.resolved, &host) {
            Some(access) => access,
            None => {
                let credentials = match &args.from_auth_file {
                    Some(path) => auth_file_credentials(path, &host).map_err(|e| (2, e))?,
                    None => None,
                };
                Access {
                    host: host.clone(),
                    plain_http: args.from_plain_http,
                    ca: ca.clone(),
                    credentials_from: credentials
                        .as_ref()
                        .and(args.from_auth_file.as_ref())
                        .map(|p| p.display().to_string()),
                    credentials,
                    ..Access::default()
                }
            }
        };
        sources.insert(host, access);
    }
    Ok(Prepared {
        mirror: mirror.name.clone(),
        endpoint_url: endpoint.url.to_string(),
        dest: Access::of_endpoint(
            &endpoint.url.host,
            endpoint.url.scheme,
            &endpoint.settings,
            Some(format!("RegistryMirror {}", mirror.name)),
        ),
        jobs,
        sources,
    })
}

/// The registry's own settings when a mirror in the YAML lists it as an endpoint (a mirror
/// whose last endpoint is the upstream itself, say): its credentials and CA.
fn source_in_yaml(mirrors: &[ResolvedMirror], host: &str) -> Option<Access> {
    mirrors
        .iter()
        .flat_map(|m| m.endpoints.iter().map(move |e| (m, e)))
        .find(|(_, e)| same_registry(&e.url.host, host) && e.url.path.is_empty())
        .map(|(m, e)| {
            let mut access = Access::of_endpoint(
                host,
                e.url.scheme,
                &e.settings,
                Some(format!("RegistryMirror {}", m.name)),
            );
            access.host = host.to_owned();
            access
        })
}

async fn run(args: &SyncImagesArgs, prepared: Prepared) -> i32 {
    let started = Instant::now();
    let mut totals = Totals::new();
    let report_failure = |totals: &mut Totals, e: sync::SyncError| {
        eprintln!("error: {e}");
        totals.failures.push(e);
    };

    let dest = match Remote::connect(&prepared.dest) {
        Ok(dest) => dest,
        Err(e) => {
            eprintln!("error: {e}\nnothing copied");
            return 1;
        }
    };
    let mut remotes: BTreeMap<String, Remote> = BTreeMap::new();
    for (host, access) in &prepared.sources {
        match Remote::connect(access) {
            Ok(remote) => {
                remotes.insert(host.clone(), remote);
            }
            Err(e) => report_failure(&mut totals, e),
        }
    }

    // Every image's manifests first: what moves, and how much (the progress bar's total).
    let mut plans: Vec<Plan> = Vec::new();
    for job in &prepared.jobs {
        let Some(source) = remotes.get(job.source.registry()) else {
            continue;
        };
        match sync::inspect(source, job.clone(), &args.platforms).await {
            Ok(plan) => plans.push(plan),
            Err(e) => report_failure(&mut totals, e),
        }
    }
    let total: u64 = plans.iter().map(Plan::bytes).sum();
    println!(
        "{} {} image(s) ({}) to RegistryMirror {} at {}",
        if args.dry_run {
            "would sync"
        } else {
            "syncing"
        },
        plans.len(),
        human_bytes(total),
        prepared.mirror,
        prepared.endpoint_url
    );

    let mut succeeded = 0;
    let progress = Progress::new(
        if args.dry_run {
            ProgressMode::Plain
        } else {
            args.progress
        },
        total,
    );
    let syncer = Syncer::new(dest, args.jobs, progress.clone());
    for plan in &plans {
        let source = &remotes[plan.job.source.registry()];
        let header = format!(
            "{} -> {} {} ({}, {} blob(s), {})",
            plan.job.source.whole(),
            plan.job.dest.whole(),
            plan.top.digest,
            plan.describe(),
            plan.blobs.len(),
            human_bytes(plan.bytes())
        );
        if args.dry_run {
            match syncer.preview(plan).await {
                Ok(preview) => {
                    println!("{header}");
                    for blob in &preview.blobs_missing {
                        println!(
                            "  would copy blob {} ({})",
                            blob.digest,
                            human_bytes(blob.size)
                        );
                    }
                    for blob in &preview.blobs_present {
                        println!(
                            "  present    blob {} ({})",
                            blob.digest,
                            human_bytes(blob.size)
                        );
                    }
                    for manifest in &preview.manifests_missing {
                        println!("  would push manifest {manifest}");
                    }
                    for manifest in &preview.manifests_present {
                        println!("  present    manifest {manifest}");
                    }
                    totals.stats.blobs_copied += preview.blobs_missing.len() as u64;
                    totals.stats.bytes_copied +=
                        preview.blobs_missing.iter().map(|b| b.size).sum::<u64>();
                    totals.stats.blobs_present += preview.blobs_present.len() as u64;
                    totals.stats.manifests_pushed += preview.manifests_missing.len() as u64;
                    totals.stats.manifests_present += preview.manifests_present.len() as u64;
                }
                Err(e) => report_failure(&mut totals, e),
            }
            continue;
        }
        match syncer.copy(source, plan).await {
            Ok(stats) => {
                succeeded += 1;
                println!("{header}");
                if !plan.same_as_source {
                    println!(
                        "  only the platforms asked for, of {} ({})",
                        plan.source_digest,
                        plan.job.source.whole()
                    );
                }
                totals.add(&stats);
            }
            Err(e) => report_failure(&mut totals, e),
        }
    }
    progress.finish();

    let s = &totals.stats;
    let seconds = started.elapsed().as_secs_f64();
    if args.dry_run {
        println!(
            "dry run: would copy {} blob(s) ({}), {} present; would push {} manifest(s), {} present; nothing copied",
            s.blobs_copied,
            human_bytes(s.bytes_copied),
            s.blobs_present,
            s.manifests_pushed,
            s.manifests_present
        );
    } else {
        println!(
            "synced {} image(s): {} blob(s) copied ({}), {} skipped as present ({}), {} mounted; {} manifest(s) pushed, {} present; {:.1} s, {}/s",
            succeeded,
            s.blobs_copied,
            human_bytes(s.bytes_copied),
            s.blobs_present,
            human_bytes(s.bytes_present),
            s.blobs_mounted,
            s.manifests_pushed,
            s.manifests_present,
            seconds,
            human_bytes((s.bytes_copied as f64 / seconds.max(1e-3)) as u64)
        );
    }
    if totals.failures.is_empty() {
        0
    } else {
        eprintln!("{} image(s) failed", totals.failures.len());
        1
    }
}
