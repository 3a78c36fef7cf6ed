//! Copying images from their registries into a mirror (`regmirror sync-images`), with
//! `oci-client`: manifests and blobs by digest, every platform of an index or those asked for.
//!
//! Safe to interrupt and rerun: a blob the mirror already has is not sent again (one HEAD
//! each), every byte is checked against its digest on the way through, and manifests are
//! pushed last (an index after the manifests it lists), so the tag never names content the
//! mirror does not have.

pub mod images;
pub mod progress;
pub mod remote;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::{
    OciDescriptor, IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE,
    OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use oci_client::Reference;
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

pub use images::{Destination, Platform};
pub use progress::{Progress, ProgressMode};
pub use remote::{Access, Remote};

/// What went wrong, naming the image, the registry and the reason. Never credentials.
#[derive(Debug, Error)]
pub enum SyncError {
    #[error("{image}: {registry}: {action}: {reason}")]
    Registry {
        image: String,
        registry: String,
        action: String,
        reason: String,
    },
    #[error("{image}: {registry}: {what} {digest} does not match its digest ({reason})")]
    Digest {
        image: String,
        registry: String,
        what: &'static str,
        digest: String,
        reason: String,
    },
    #[error("{image}: {registry}: {reason}")]
    Unsupported {
        image: String,
        registry: String,
        reason: String,
    },
    #[error("{registry}: {reason}")]
    Client { registry: String, reason: String },
}

/// An error with its causes: reqwest's own message leaves out the TLS or connection reason.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The manifest media types asked for, images and indexes, OCI and Docker.
const ACCEPTED: &[&str] = &[
    OCI_IMAGE_INDEX_MEDIA_TYPE,
    IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    OCI_IMAGE_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE,
];

fn is_index(media_type: &str) -> bool {
    media_type == OCI_IMAGE_INDEX_MEDIA_TYPE || media_type == IMAGE_MANIFEST_LIST_MEDIA_TYPE
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// One image to copy.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: Reference,
    pub dest: Reference,
}

/// A manifest, its bytes as they are in the source (so its digest stays the same).
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
    /// The platform an index lists it for.
    pub platform: Option<String>,
}

/// A blob (config or layer) an image needs.
#[derive(Debug, Clone)]
pub struct Blob {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

/// Everything one image needs in the mirror, read from its source.
#[derive(Debug, Clone)]
pub struct Plan {
    pub job: Job,
    /// What goes at the tag (or digest): the image manifest, the index, or the manifest of the
    /// one platform asked for.
    pub top: Manifest,
    /// The manifests `top` lists, pushed by digest before it.
    pub children: Vec<Manifest>,
    /// Config and layer blobs, each once.
    pub blobs: Vec<Blob>,
    /// Whether `top` is the source's own manifest (not an index cut down to some platforms).
    pub same_as_source: bool,
    /// The source's manifest digest.
    pub source_digest: String,
}

impl Plan {
    pub fn bytes(&self) -> u64 {
        self.blobs.iter().map(|b| b.size).sum()
    }

    /// `index (linux/amd64, linux/arm64)` or `manifest`.
    pub fn describe(&self) -> String {
        if is_index(&self.top.media_type) {
            let platforms: Vec<&str> = self
                .children
                .iter()
                .map(|c| c.platform.as_deref().unwrap_or("?"))
                .collect();
            format!("index of {}", platforms.join(", "))
        } else {
            match &self.top.platform {
                Some(platform) => format!("manifest for {platform}"),
                None => "manifest".to_owned(),
            }
        }
    }
}

/// Counts, for the summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub blobs_copied: u64,
    pub bytes_copied: u64,
    /// Already in the mirror (a rerun, or another image's layer).
    pub blobs_present: u64,
    pub bytes_present: u64,
    /// Mounted from another repository of the mirror, not sent again.
    pub blobs_mounted: u64,
    pub manifests_pushed: u64,
    pub manifests_present: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.blobs_copied += other.blobs_copied;
        self.bytes_copied += other.bytes_copied;
        self.blobs_present += other.blobs_present;
        self.bytes_present += other.bytes_present;
        self.blobs_mounted += other.blobs_mounted;
        self.manifests_pushed += other.manifests_pushed;
        self.manifests_present += other.manifests_present;
    }
}

fn registry_error(
    image: &Reference,
    remote: &Remote,
    action: impl Into<String>,
) -> impl FnOnce(OciDistributionError) -> SyncError {
    let image = image.whole();
    let registry = remote.host.clone();
    let action = action.into();
    move |e| SyncError::Registry {
        image,
        registry,
        action,
        reason: chain(&e),
    }
}

/// Whether a registry answered "no such thing" (rather than failing).
fn is_not_found(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code == 404,
        OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| {
            matches!(
                e.code,
                OciErrorCode::ManifestUnknown
                    | OciErrorCode::NotFound
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::BlobUnknown
            )
        }),
        _ => false,
    }
}

/// A manifest's media type: its `mediaType`, or what its fields say it is.
fn media_type_of(json: &Value) -> Option<String> {
    if json.get("schemaVersion").and_then(Value::as_i64) != Some(2) {
        return None;
    }
    if let Some(media_type) = json.get("mediaType").and_then(Value::as_str) {
        return Some(media_type.to_owned());
    }
    if json.get("manifests").is_some() {
        Some(OCI_IMAGE_INDEX_MEDIA_TYPE.to_owned())
    } else if json.get("layers").is_some() {
        Some(OCI_IMAGE_MEDIA_TYPE.to_owned())
    } else {
        None
    }
}

fn descriptor(value: &Value) -> Option<(String, u64, String)> {
    Some((
        value.get("digest")?.as_str()?.to_owned(),
        value.get("size")?.as_u64()?,
        value
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// Reads what `job` needs from its source: manifests (checked against their digests) and
/// the list of blobs. Nothing is written anywhere.
pub async fn inspect(source: &Remote, job: Job, platforms: &[Platform]) -> Result<Plan, SyncError> {
    let image = job.source.whole();
    let unsupported = |reason: String| SyncError::Unsupported {
        image: image.clone(),
        registry: source.host.clone(),
        reason,
    };
    let (bytes, digest) = pull_manifest(source, &job.source, None).await?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| unsupported(format!("the manifest is not JSON: {e}")))?;
    let media_type = media_type_of(&json)
        .ok_or_else(|| unsupported("not a schema 2 image manifest or index".into()))?;
    let source_manifest = Manifest {
        digest: digest.clone(),
        media_type: media_type.clone(),
        bytes,
        platform: None,
    };

    if !is_index(&media_type) {
        let blobs = blobs_of(&json)
            .ok_or_else(|| unsupported("the manifest lists no config and layers".into()))?;
        return Ok(Plan {
            job,
            top: source_manifest,
            children: Vec::new(),
            blobs,
            same_as_source: true,
            source_digest: digest,
        });
    }

    let entries = json
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| unsupported("the index lists no manifests".into()))?;
    let selected: Vec<&Value> = entries
        .iter()
        .filter(|entry| {
            platforms.is_empty()
                || Platform::of_entry(entry)
                    .is_some_and(|p| platforms.iter().any(|want| want.selects(&p)))
        })
        .collect();
    if selected.is_empty() {
        let available: Vec<String> = entries
            .iter()
            .filter_map(Platform::of_entry)
            .map(|p| p.to_string())
            .collect();
        let wanted: Vec<String> = platforms.iter().map(|p| p.to_string()).collect();
        return Err(unsupported(format!(
            "the index has no manifest for {} (it has {})",
            wanted.join(", "),
            available.join(", ")
        )));
    }

    let mut children = Vec::new();
    let mut blobs: Vec<Blob> = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in &selected {
        let (child_digest, size, child_type) = descriptor(entry)
            .ok_or_else(|| unsupported("an index entry has no digest or size".into()))?;
        let child_ref = job.source.clone_with_digest(child_digest.clone());
        let (child_bytes, _) = pull_manifest(source, &child_ref, Some(size)).await?;
        let child_json: Value = serde_json::from_slice(&child_bytes)
            .map_err(|e| unsupported(format!("manifest {child_digest} is not JSON: {e}")))?;
        let child_type = if child_type.is_empty() {
            media_type_of(&child_json).unwrap_or_default()
        } else {
            child_type
        };
        if is_index(&child_type) {
            return Err(unsupported(format!(
                "manifest {child_digest} is an index inside an index, which sync-images does not copy"
            )));
        }
        for blob in blobs_of(&child_json).ok_or_else(|| {
            unsupported(format!(
                "manifest {child_digest} lists no config and layers"
            ))
        })? {
            if seen.insert(blob.digest.clone()) {
                blobs.push(blob);
            }
        }
        children.push(Manifest {
            digest: child_digest,
            media_type: child_type,
            bytes: child_bytes,
            platform: Platform::of_entry(entry).map(|p| p.to_string()),
        });
    }

    let (top, children, same_as_source) = if selected.len() == entries.len() {
        (source_manifest, children, true)
    } else if children.len() == 1 {
        // One platform asked for: its manifest goes at the tag, as `docker pull --platform`
        // followed by `docker push` would leave it.
        (children.remove(0), Vec::new(), false)
    } else {
        let mut cut = json.clone();
        cut["manifests"] = Value::Array(selected.into_iter().cloned().collect());
        let bytes = Bytes::from(serde_json::to_vec(&cut).expect("JSON values serialize"));
        let top = Manifest {
            digest: sha256_digest(&bytes),
            media_type,
            bytes,
            platform: None,
        };
        (top, children, false)
    };
    if !same_as_source && job.source.digest().is_some() {
        return Err(unsupported(format!(
            "{} names the whole index by its digest: --platform cannot take part of it (name it by tag, or name the platform's manifest by its digest)",
            job.source.whole()
        )));
    }
    Ok(Plan {
        job,
        top,
        children,
        blobs,
        same_as_source,
        source_digest: digest,
    })
}

/// Config and layers of an image manifest (foreign layers, which registries do not hold,
/// left out).
fn blobs_of(json: &Value) -> Option<Vec<Blob>> {
    let mut blobs = Vec::new();
    let config = json.get("config")?;
    let layers = json.get("layers")?.as_array()?;
    for value in std::iter::once(config).chain(layers) {
        if value.get("urls").is_some() {
            continue;
        }
        let (digest, size, media_type) = descriptor(value)?;
        if !blobs.iter().any(|b: &Blob| b.digest == digest) {
            blobs.push(Blob {
                digest,
                size,
                media_type,
            });
        }
    }
    Some(blobs)
}

/// Pulls a manifest and checks its bytes against the digest asked for (or the one the
/// registry names) and the size an index gave for it.
async fn pull_manifest(
    source: &Remote,
    reference: &Reference,
    size: Option<u64>,
) -> Result<(Bytes, String), SyncError> {
    let (bytes, digest) = source
        .client
        .pull_manifest_raw(reference, &source.auth, ACCEPTED)
        .await
        .map_err(registry_error(reference, source, "pull manifest"))?;
    let actual = sha256_digest(&bytes);
    let expected = reference.digest().unwrap_or(&digest).to_owned();
    let mismatch = |reason: String| SyncError::Digest {
        image: reference.whole(),
        registry: source.host.clone(),
        what: "manifest",
        digest: expected.clone(),
        reason,
    };
    if !expected.starts_with("sha256:") {
        return Err(SyncError::Unsupported {
            image: reference.whole(),
            registry: source.host.clone(),
            reason: format!("digest {expected} is not sha256"),
        });
    }
    if actual != expected {
        return Err(mismatch(format!("its bytes hash to {actual}")));
    }
    if let Some(size) = size.filter(|s| *s != bytes.len() as u64) {
        return Err(mismatch(format!(
            "{} bytes, the index says {size}",
            bytes.len()
        )));
    }
    Ok((bytes, actual))
}

/// What a dry run finds: what would move for one image.
#[derive(Debug, Clone, Default)]
pub struct Preview {
    pub blobs_missing: Vec<Blob>,
    pub blobs_present: Vec<Blob>,
    pub manifests_missing: Vec<String>,
    pub manifests_present: Vec<String>,
}

/// Copies images into one mirror endpoint.
pub struct Syncer {
    pub dest: Remote,
    pub jobs: usize,
    pub progress: Progress,
    /// Blobs in the mirror, by digest: the repository they are in, for cross-repository
    /// mounts.
    copied: Mutex<HashMap<String, Reference>>,
}

enum BlobOutcome {
    Copied(u64),
    Present(u64),
    Mounted,
}

impl Syncer {
    pub fn new(dest: Remote, jobs: usize, progress: Progress) -> Syncer {
        Syncer {
            dest,
            jobs: jobs.max(1),
            progress,
            copied: Mutex::new(HashMap::new()),
        }
    }

    async fn blob_present(&self, reference: &Reference, digest: &str) -> Result<bool, SyncError> {
        self.dest
            .client
            .blob_exists(reference, digest)
            .await
            .map_err(registry_error(
                reference,
                &self.dest,
                format!("check blob {digest}"),
            ))
    }

    /// The digest the mirror has at `reference`, if it has a manifest there.
    async fn manifest_in_dest(&self, reference: &Reference) -> Result<Option<String>, SyncError> {
        match self
            .dest
            .client
            .fetch_manifest_digest(reference, &self.dest.auth)
            .await
        {
            Ok(digest) => Ok(Some(digest)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(registry_error(reference, &self.dest, "check manifest")(e)),
        }
    }

    /// What copying `plan` would do, without writing anything.
    pub async fn preview(&self, plan: &Plan) -> Result<Preview, SyncError> {
        let dest = &plan.job.dest;
        self.dest
            .client
            .store_auth_if_needed(dest.resolve_registry(), &self.dest.auth)
            .await;
        let mut preview = Preview::default();
        for blob in &plan.blobs {
            if self.blob_present(dest, &blob.digest).await? {
                preview.blobs_present.push(blob.clone());
            } else {
                preview.blobs_missing.push(blob.clone());
            }
        }
        for manifest in plan.children.iter().chain([&plan.top]) {
            let at = dest.clone_with_digest(manifest.digest.clone());
            let label = match &manifest.platform {
                Some(platform) => format!("{} ({platform})", manifest.digest),
                None => manifest.digest.clone(),
            };
            if self.manifest_in_dest(&at).await?.is_some() {
                preview.manifests_present.push(label);
            } else {
                preview.manifests_missing.push(label);
            }
        }
        Ok(preview)
    }

    /// Copies one image: blobs the mirror lacks, then the manifests an index lists, then the
    /// manifest at the tag, whose digest in the mirror is checked last.
    pub async fn copy(&self, source: &Remote, plan: &Plan) -> Result<Stats, SyncError> {
        let dest = &plan.job.dest;
        let src = &plan.job.source;
        self.progress.working_on(&dest.whole());
        // Blob requests go out without a manifest request first: hand the client the
        // credentials for both registries now.
        source
            .client
            .store_auth_if_needed(src.resolve_registry(), &source.auth)
            .await;
        self.dest
            .client
            .store_auth_if_needed(dest.resolve_registry(), &self.dest.auth)
            .await;

        let outcomes: Vec<BlobOutcome> = futures::stream::iter(plan.blobs.iter())
            .map(|blob| self.copy_blob(source, src, dest, blob))
            .buffer_unordered(self.jobs)
            .try_collect()
            .await?;
        let mut stats = Stats::default();
        for outcome in outcomes {
            match outcome {
                BlobOutcome::Copied(size) => {
                    stats.blobs_copied += 1;
                    stats.bytes_copied += size;
                }
                BlobOutcome::Present(size) => {
                    stats.blobs_present += 1;
                    stats.bytes_present += size;
                }
                BlobOutcome::Mounted => stats.blobs_mounted += 1,
            }
        }

        for child in &plan.children {
            let at = dest.clone_with_digest(child.digest.clone());
            if self.manifest_in_dest(&at).await?.as_deref() == Some(child.digest.as_str()) {
                stats.manifests_present += 1;
                continue;
            }
            self.push_manifest(&at, child).await?;
            stats.manifests_pushed += 1;
        }
        if self.manifest_in_dest(dest).await?.as_deref() == Some(plan.top.digest.as_str()) {
            stats.manifests_present += 1;
        } else {
            self.push_manifest(dest, &plan.top).await?;
            stats.manifests_pushed += 1;
            match self.manifest_in_dest(dest).await? {
                Some(digest) if digest == plan.top.digest => {}
                other => {
                    return Err(SyncError::Digest {
                        image: dest.whole(),
                        registry: self.dest.host.clone(),
                        what: "manifest",
                        digest: plan.top.digest.clone(),
                        reason: format!(
                            "after the push the mirror has {}",
                            other.as_deref().unwrap_or("no manifest there")
                        ),
                    })
                }
            }
        }
        Ok(stats)
    }

    async fn push_manifest(&self, at: &Reference, manifest: &Manifest) -> Result<(), SyncError> {
        let content_type = http::HeaderValue::from_str(&manifest.media_type).map_err(|_| {
            SyncError::Unsupported {
                image: at.whole(),
                registry: self.dest.host.clone(),
                reason: format!("media type {:?} is not a header value", manifest.media_type),
            }
        })?;
        self.dest
            .client
            .push_manifest_raw(at, manifest.bytes.clone(), content_type)
            .await
            .map_err(registry_error(
                at,
                &self.dest,
                format!("push manifest {}", manifest.digest),
            ))?;
        self.progress.done(&format!(
            "pushed manifest {} {}{}",
            manifest.digest,
            at.whole(),
            manifest
                .platform
                .as_deref()
                .map(|p| format!(" ({p})"))
                .unwrap_or_default()
        ));
        Ok(())
    }

    async fn copy_blob(
        &self,
        source: &Remote,
        src: &Reference,
        dest: &Reference,
        blob: &Blob,
    ) -> Result<BlobOutcome, SyncError> {
        if self.blob_present(dest, &blob.digest).await? {
            self.progress.advance(blob.size);
            self.progress.done(&format!(
                "present blob {} ({}) in {}",
                blob.digest,
                human_bytes(blob.size),
                dest.repository()
            ));
            return Ok(BlobOutcome::Present(blob.size));
        }
        let elsewhere = self
            .copied
            .lock()
            .expect("not poisoned")
            .get(&blob.digest)
            .filter(|other| other.repository() != dest.repository())
            .cloned();
        if let Some(other) = elsewhere {
            let mounted = self
                .dest
                .client
                .mount_blob(dest, &other, &blob.digest)
                .await;
            if mounted.is_ok() && self.blob_present(dest, &blob.digest).await? {
                self.progress.advance(blob.size);
                self.progress.done(&format!(
                    "mounted blob {} from {} in {}",
                    blob.digest,
                    other.repository(),
                    dest.repository()
                ));
                return Ok(BlobOutcome::Mounted);
            }
        }

        let image = src.whole();
        let descriptor = OciDescriptor {
            media_type: blob.media_type.clone(),
            digest: blob.digest.clone(),
            size: blob.size as i64,
            ..OciDescriptor::default()
        };
        let pulled = source
            .client
            .pull_blob_stream(src, &descriptor)
            .await
            .map_err(registry_error(
                src,
                source,
                format!("pull blob {}", blob.digest),
            ))?;

        // Hash and count what goes through; at the end, an error instead of the last (empty)
        // chunk if it is not the blob asked for, so the upload fails rather than completes.
        let seen = Arc::new(Mutex::new((Sha256::new(), 0u64)));
        let mismatch: Arc<Mutex<Option<String>>> = Arc::default();
        let (seen_in, progress) = (seen.clone(), self.progress.clone());
        let body = pulled.stream.map(move |chunk| {
            let chunk = chunk.map_err(OciDistributionError::IoError)?;
            let mut seen = seen_in.lock().expect("not poisoned");
            seen.0.update(&chunk);
            seen.1 += chunk.len() as u64;
            progress.advance(chunk.len() as u64);
            Ok::<Bytes, OciDistributionError>(chunk)
        });
        let (expected, expected_size, mismatch_in) =
            (blob.digest.clone(), blob.size, mismatch.clone());
        let check = futures::stream::once(futures::future::lazy(move |_| {
            let (hasher, size) = std::mem::take(&mut *seen.lock().expect("not poisoned"));
            let hex: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let actual = format!("sha256:{hex}");
            let problem = if size != expected_size {
                Some(format!(
                    "{size} bytes arrived, the manifest says {expected_size}"
                ))
            } else if actual != expected {
                Some(format!("its bytes hash to {actual}"))
            } else {
                None
            };
            match problem {
                None => Ok(Bytes::new()),
                Some(problem) => {
                    *mismatch_in.lock().expect("not poisoned") = Some(problem.clone());
                    Err(OciDistributionError::GenericError(Some(problem)))
                }
            }
        }));
        let pushed = self
            .dest
            .client
            .push_blob_stream(dest, body.chain(check), &blob.digest, Some(blob.size))
            .await;
        if let Some(reason) = mismatch.lock().expect("not poisoned").take() {
            return Err(SyncError::Digest {
                image,
                registry: source.host.clone(),
                what: "blob",
                digest: blob.digest.clone(),
                reason,
            });
        }
        pushed.map_err(registry_error(
            dest,
            &self.dest,
            format!("push blob {}", blob.digest),
        ))?;
        // The mirror checked the digest too (`PUT …?digest=`); it has the blob now.
        self.copied
            .lock()
            .expect("not poisoned")
            .insert(blob.digest.clone(), dest.clone());
        self.progress.done(&format!(
            "copied blob {} ({}) to {}",
            blob.digest,
            human_bytes(blob.size),
            dest.repository()
        ));
        Ok(BlobOutcome::Copied(blob.size))
    }
}

/// `12.3 MB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Runs a whole sync: each plan copied (or previewed) in turn; a failed image does not stop
/// the others. Returns the totals and the failures.
pub struct Totals {
    pub stats: Stats,
    pub failures: Vec<SyncError>,
}

impl Totals {
    pub fn new() -> Totals {
        Totals {
            stats: Stats::default(),
            failures: Vec::new(),
        }
    }

    pub fn add(&mut self, stats: &Stats) {
        self.stats.add(stats);
    }
}

impl Default for Totals {
    fn default() -> Self {
        Totals::new()
    }
}
