//! `regmirror sync-images` against real registries on 127.0.0.1: an upstream and a mirror,
//! both `docker-registry` with TLS from a test CA and htpasswd basic auth (different
//! credentials), the mirror's credentials and CA in the Secrets of the RegistryMirror YAML.
//! Images are built here as OCI layouts (a two-platform index, a bigger one-platform image)
//! and pushed with skopeo; what lands in the mirror is read back with `skopeo inspect --raw`
//! and compared with the upstream's bytes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use regmirror_testbed::{require_tool, Pki, Registry, RegistryOptions};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const UP_USER: (&str, &str) = ("upstream-reader", "up-secret-1");
const MIRROR_USER: (&str, &str) = ("mirror-writer", "mirror-secret-2");

fn sha256(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// Bytes that do not compress, from a seed (xorshift).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// An OCI image layout being written.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout {
            dir: dir.to_owned(),
        }
    }

    /// Writes a blob; its descriptor.
    fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let digest = sha256(data);
        let file = self
            .dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        std::fs::write(file, data).unwrap();
        json!({"mediaType": media_type, "digest": digest, "size": data.len()})
    }

    /// An image manifest for `arch` with the given layers; its descriptor.
    fn image(&self, arch: &str, layers: &[Vec<u8>]) -> Value {
        let layers: Vec<Value> = layers
            .iter()
            .map(|l| self.blob("application/vnd.oci.image.layer.v1.tar", l))
            .collect();
        let diff_ids: Vec<&Value> = layers.iter().map(|l| &l["digest"]).collect();
        let config = json!({"architecture": arch, "os": "linux", "config": {"Cmd": ["/hello"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids}});
        let config = self.blob(
            "application/vnd.oci.image.config.v1+json",
            config.to_string().as_bytes(),
        );
        let manifest = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config, "layers": layers});
        self.blob(
            "application/vnd.oci.image.manifest.v1+json",
            manifest.to_string().as_bytes(),
        )
    }

    /// Names `descriptor` `tag` in index.json.
    fn tag(&self, mut descriptor: Value, tag: &str) {
        descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        let index = json!({"schemaVersion": 2, "manifests": [descriptor]});
        std::fs::write(self.dir.join("index.json"), index.to_string()).unwrap();
    }
}

/// Two registries, the YAML of a mirror of one on the other, a skopeo home.
struct AirGap {
    dir: tempfile::TempDir,
    pki: Pki,
    upstream: Registry,
    mirror: Registry,
    yaml: PathBuf,
    cert_dir: PathBuf,
}

impl AirGap {
    /// `upstream_in_yaml`: the mirror lists the upstream as its fallback endpoint, with its
    /// own Secret: sync-images reads the upstream's credentials and CA from there.
    fn new(upstream_in_yaml: bool) -> AirGap {
        require_tool("skopeo");
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki"));
        let options = |(user, password): (&str, &str)| RegistryOptions {
            tls: true,
            basic_auth: Some((user.into(), password.into())),
            client_certs: false,
        };
        let upstream = Registry::start(&dir.path().join("upstream"), &pki, options(UP_USER));
        let mirror = Registry::start(&dir.path().join("mirror"), &pki, options(MIRROR_USER));
        let cert_dir = dir.path().join("certs");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(pki.path("ca.crt"), cert_dir.join("ca.crt")).unwrap();

        let ca = pki
            .pem("ca.crt")
            .lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>();
        let upstream_endpoint = if upstream_in_yaml {
            format!(
                "    - url: {}\n      auth: {{secretRef: {{name: upstream-pull}}}}\n      tls: {{caRef: {{secretRef: {{name: registry-ca}}}}}}\n",
                upstream.url()
            )
        } else {
            String::new()
        };
        let yaml = format!(
            r#"apiVersion: regmirror.io/v1alpha1
kind: RegistryMirror
metadata:
  name: air-gap
spec:
  registry: "{upstream}"
  endpoints:
    - url: {mirror_url}
      auth: {{secretRef: {{name: mirror-push}}}}
      tls: {{caRef: {{secretRef: {{name: registry-ca}}}}}}
{upstream_endpoint}---
apiVersion: v1
kind: Secret
metadata:
  name: mirror-push
  namespace: regmirror-system
  annotations:
    regmirror.io/allowed-hosts: "{mirror}"
type: kubernetes.io/basic-auth
stringData:
  username: {mu}
  password: {mp}
---
apiVersion: v1
kind: Secret
metadata:
  name: upstream-pull
  namespace: regmirror-system
  annotations:
    regmirror.io/allowed-hosts: "{upstream}"
type: kubernetes.io/basic-auth
stringData:
  username: {uu}
  password: {up}
---
apiVersion: v1
kind: Secret
metadata:
  name: registry-ca
  namespace: regmirror-system
type: Opaque
stringData:
  ca.crt: |
{ca}"#,
            upstream = upstream.host(),
            mirror = mirror.host(),
            mirror_url = mirror.url(),
            mu = MIRROR_USER.0,
            mp = MIRROR_USER.1,
            uu = UP_USER.0,
            up = UP_USER.1,
        );
        let yaml_file = dir.path().join("yaml/air-gap.yaml");
        std::fs::create_dir_all(yaml_file.parent().unwrap()).unwrap();
        std::fs::write(&yaml_file, yaml).unwrap();
        AirGap {
            dir,
            pki,
            upstream,
            mirror,
            yaml: yaml_file,
            cert_dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn skopeo(&self) -> Command {
        let mut skopeo = Command::new("skopeo");
        skopeo.env("HOME", self.dir.path());
        skopeo
    }

    /// Pushes every image of an OCI layout's tag to the upstream as `repository:tag`.
    fn push(&self, layout: &Layout, tag: &str, repository: &str) {
        let out = self
            .skopeo()
            .args(["copy", "--quiet", "--all", "--preserve-digests"])
            .arg("--dest-creds")
            .arg(format!("{}:{}", UP_USER.0, UP_USER.1))
            .arg("--dest-cert-dir")
            .arg(&self.cert_dir)
            .arg(format!("oci:{}:{tag}", layout.dir.display()))
            .arg(format!(
                "docker://{}/{repository}:{tag}",
                self.upstream.host()
            ))
            .output()
            .unwrap();
        assert_success(&out, "skopeo copy to the upstream");
    }

    /// `skopeo inspect --raw` of `reference` (`repo:tag` or `repo@digest`) in a registry,
    /// with its credentials and the CA: the manifest's bytes, or skopeo's error.
    fn raw(&self, registry: &Registry, reference: &str) -> Result<Vec<u8>, String> {
        let creds = if registry.port == self.upstream.port {
            UP_USER
        } else {
            MIRROR_USER
        };
        let out = self
            .skopeo()
            .args(["inspect", "--raw", "--tls-verify=true"])
            .arg("--cert-dir")
            .arg(&self.cert_dir)
            .arg("--creds")
            .arg(format!("{}:{}", creds.0, creds.1))
            .arg(format!("docker://{}/{reference}", registry.host()))
            .output()
            .unwrap();
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn sync(&self, extra: &[&str]) -> Output {
        self.sync_command(extra).output().unwrap()
    }

    fn sync_command(&self, extra: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_regmirror"));
        command
            .arg("sync-images")
            .arg(&self.yaml)
            .args(["--to", "air-gap", "--progress", "plain"])
            .args(extra);
        command
    }

    /// The upstream image `repository:tag`: `name` as the YAML's registry names it.
    fn image(&self, repository: &str, tag: &str) -> String {
        format!("{}/{repository}:{tag}", self.upstream.host())
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The number before `label` in the summary line, e.g. `blob(s) copied`.
fn count(stdout: &str, label: &str) -> u64 {
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("synced ") || l.starts_with("dry run:"))
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    let before = summary
        .split(label)
        .next()
        .filter(|b| b.len() < summary.len())
        .unwrap_or_else(|| panic!("no {label:?} in {summary:?}"));
    before
        .split(|c: char| !c.is_ascii_digit())
        .rfind(|w| !w.is_empty())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count before {label:?} in {summary:?}"))
}

/// A two-platform image: each platform has its own layer and config, and they share one
/// layer. Returns the layout and the number of distinct blobs.
fn two_platforms(air: &AirGap) -> (Layout, usize) {
    let layout = Layout::new(&air.path("multi"));
    let shared = noise(1, 300_000);
    let amd64 = layout.image("amd64", &[shared.clone(), noise(2, 200_000)]);
    let arm64 = layout.image("arm64", &[shared, noise(3, 250_000)]);
    let mut amd64_entry = amd64.clone();
    amd64_entry["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut arm64_entry = arm64.clone();
    arm64_entry["platform"] = json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [amd64_entry, arm64_entry]});
    let index = layout.blob(
        "application/vnd.oci.image.index.v1+json",
        index.to_string().as_bytes(),
    );
    layout.tag(index, "v1");
    // shared layer, two own layers, two configs
    (layout, 5)
}

/// The upstream's index of `repository:tag` and the digests it lists, by architecture.
fn index_of(air: &AirGap, repository: &str, tag: &str) -> (Vec<u8>, Vec<(String, String)>) {
    let raw = air
        .raw(&air.upstream, &format!("{repository}:{tag}"))
        .unwrap();
    let index: Value = serde_json::from_slice(&raw).unwrap();
    let children = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["platform"]["architecture"].as_str().unwrap().to_owned(),
                m["digest"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (raw, children)
}

#[test]
fn every_platform_of_an_index_lands_in_the_mirror_with_the_same_digests() {
    let air = AirGap::new(true);
    let (layout, blobs) = two_platforms(&air);
    air.push(&layout, "v1", "team/app");
    let (upstream_index, children) = index_of(&air, "team/app", "v1");

    let out = air.sync(&["--images", &air.image("team/app", "v1")]);
    assert_success(&out, "sync-images");
    let stdout = text(&out.stdout);
    assert_eq!(count(&stdout, "blob(s) copied"), blobs as u64, "{stdout}");
    assert_eq!(count(&stdout, "skipped as present"), 0, "{stdout}");
    assert_eq!(count(&stdout, "manifest(s) pushed"), 3, "{stdout}");
    // Plain lines on stderr (not a terminal): one per blob and manifest.
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.starts_with("copied blob "))
            .count(),
        blobs,
        "{stderr}"
    );
    assert!(
        !stdout.contains(MIRROR_USER.1) && !stderr.contains(MIRROR_USER.1),
        "a password was printed"
    );
    assert!(!stdout.contains(UP_USER.1) && !stderr.contains(UP_USER.1));

    // The mirror serves the same index, at the repository nodes ask it for, and each
    // platform's manifest by its digest.
    let mirrored = air.raw(&air.mirror, "team/app:v1").unwrap();
    assert_eq!(sha256(&mirrored), sha256(&upstream_index));
    assert!(stdout.contains(&sha256(&upstream_index)), "{stdout}");
    for (arch, digest) in &children {
        let child = air
            .raw(&air.mirror, &format!("team/app@{digest}"))
            .unwrap_or_else(|e| panic!("{arch} manifest missing in the mirror: {e}"));
        assert_eq!(&sha256(&child), digest);
        // Every blob it lists is there too: skopeo copies it out of the mirror.
        let out = air
            .skopeo()
            .args(["copy", "--quiet", "--src-cert-dir"])
            .arg(&air.cert_dir)
            .arg("--src-creds")
            .arg(format!("{}:{}", MIRROR_USER.0, MIRROR_USER.1))
            .arg(format!("docker://{}/team/app@{digest}", air.mirror.host()))
            .arg(format!("oci:{}:{arch}", air.path("out").display()))
            .output()
            .unwrap();
        assert_success(&out, "skopeo copy out of the mirror");
    }

    // A rerun finds everything there and sends nothing.
    let out = air.sync(&["--images", &air.image("team/app", "v1")]);
    assert_success(&out, "sync-images rerun");
    let stdout = text(&out.stdout);
    assert_eq!(count(&stdout, "blob(s) copied"), 0, "{stdout}");
    assert_eq!(
        count(&stdout, "skipped as present"),
        blobs as u64,
        "{stdout}"
    );
    assert_eq!(count(&stdout, "manifest(s) pushed"), 0, "{stdout}");
    assert_eq!(count(&stdout, "present;"), 3, "{stdout}");
}

#[test]
fn one_platform_or_one_digest_and_the_source_from_an_auth_file() {
    // The YAML lists only the mirror: the upstream's credentials come from a docker config
    // file and its CA from --from-ca-file.
    let air = AirGap::new(false);
    let (layout, _) = two_platforms(&air);
    air.push(&layout, "v1", "team/app");
    let (_, children) = index_of(&air, "team/app", "v1");
    let digest_of = |arch: &str| {
        children
            .iter()
            .find(|(a, _)| a == arch)
            .map(|(_, d)| d.clone())
            .unwrap()
    };
    let auth_file = air.path("config.json");
    std::fs::write(
        &auth_file,
        json!({"auths": {air.upstream.host(): {"username": UP_USER.0, "password": UP_USER.1}}})
            .to_string(),
    )
    .unwrap();
    let ca = air.pki.path("ca.crt");
    let from = [
        "--from-auth-file",
        auth_file.to_str().unwrap(),
        "--from-ca-file",
        ca.to_str().unwrap(),
    ];

    // Without them the upstream refuses.
    let out = air.sync(&["--images", &air.image("team/app", "v1")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&air.image("team/app", "v1")) && stderr.contains(&air.upstream.host()),
        "the error names the image and the registry: {stderr}"
    );

    // linux/arm64 only: its manifest goes at the tag, the amd64 layer stays behind.
    let mut args = vec!["--images".to_owned(), air.image("team/app", "v1")];
    args.extend(["--platform", "linux/arm64"].map(String::from));
    args.extend(from.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = air.sync(&args);
    assert_success(&out, "sync-images --platform linux/arm64");
    let stdout = text(&out.stdout);
    assert_eq!(count(&stdout, "blob(s) copied"), 3, "{stdout}");
    let at_tag = air.raw(&air.mirror, "team/app:v1").unwrap();
    assert_eq!(sha256(&at_tag), digest_of("arm64"));
    assert!(air
        .raw(&air.mirror, &format!("team/app@{}", digest_of("amd64")))
        .is_err());

    // A platform the index does not have.
    let mut args = vec!["--images".to_owned(), air.image("team/app", "v1")];
    args.extend(["--platform", "linux/s390x"].map(String::from));
    args.extend(from.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = air.sync(&args);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("no manifest for linux/s390x (it has linux/amd64, linux/arm64/v8)"),
        "{}",
        text(&out.stderr)
    );

    // By digest: the amd64 manifest, named by its digest, lands at that digest; the shared
    // layer is in the mirror already.
    let by_digest = format!("{}/team/app@{}", air.upstream.host(), digest_of("amd64"));
    let mut args = vec!["--images".to_owned(), by_digest];
    args.extend(from.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = air.sync(&args);
    assert_success(&out, "sync-images by digest");
    let stdout = text(&out.stdout);
    assert_eq!(count(&stdout, "blob(s) copied"), 2, "{stdout}");
    assert_eq!(count(&stdout, "skipped as present"), 1, "{stdout}");
    let mirrored = air
        .raw(&air.mirror, &format!("team/app@{}", digest_of("amd64")))
        .unwrap();
    assert_eq!(sha256(&mirrored), digest_of("amd64"));
    // The tag still names the arm64 manifest.
    assert_eq!(
        sha256(&air.raw(&air.mirror, "team/app:v1").unwrap()),
        digest_of("arm64")
    );
}

#[test]
fn dry_run_lists_what_would_move_and_copies_nothing() {
    let air = AirGap::new(true);
    let (layout, blobs) = two_platforms(&air);
    air.push(&layout, "v1", "team/app");
    let list = air.path("images.txt");
    std::fs::write(
        &list,
        format!(
            "# what the cluster needs\n{}  # the app\n",
            air.image("team/app", "v1")
        ),
    )
    .unwrap();
    let out = air.sync(&["--images", list.to_str().unwrap(), "--dry-run"]);
    assert_success(&out, "sync-images --dry-run");
    let stdout = text(&out.stdout);
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("would copy blob"))
            .count(),
        blobs,
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.trim_start().starts_with("would push manifest"))
            .count(),
        3,
        "{stdout}"
    );
    assert!(stdout.contains("nothing copied"), "{stdout}");
    let missing = air.raw(&air.mirror, "team/app:v1").unwrap_err();
    assert!(missing.contains("manifest unknown"), "{missing}");
    let storage = air.path("mirror/storage/docker/registry/v2/blobs");
    assert!(!storage.exists(), "the dry run wrote blobs into the mirror");
}

#[test]
fn an_interrupted_copy_resumes_where_it_stopped() {
    let air = AirGap::new(true);
    let layout = Layout::new(&air.path("big"));
    let layers: Vec<Vec<u8>> = (0..6).map(|i| noise(100 + i, 4_000_000)).collect();
    let manifest = layout.image("amd64", &layers);
    layout.tag(manifest, "v2");
    air.push(&layout, "v2", "team/big");
    let blobs = 7; // six layers and the config

    // One blob at a time; killed (SIGKILL) as soon as two are in the mirror (the config and
    // a layer), the next one on its way.
    let mut child = air
        .sync_command(&["--images", &air.image("team/big", "v2"), "--jobs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        let copied = line.starts_with("copied blob ");
        seen.push(line);
        if copied
            && seen
                .iter()
                .filter(|l| l.starts_with("copied blob "))
                .count()
                == 2
        {
            child.kill().unwrap();
            break;
        }
    }
    let status = child.wait().unwrap();
    assert!(
        !status.success() && status.code().is_none(),
        "the copy was not interrupted ({status}): {seen:?}"
    );
    // The tag never names content the mirror does not have: manifests go last.
    let missing = air.raw(&air.mirror, "team/big:v2").unwrap_err();
    assert!(missing.contains("manifest unknown"), "{missing}");

    let out = air.sync(&["--images", &air.image("team/big", "v2")]);
    assert_success(&out, "the rerun");
    let stdout = text(&out.stdout);
    let copied = count(&stdout, "blob(s) copied");
    let skipped = count(&stdout, "skipped as present");
    assert!(
        skipped >= 2,
        "the blobs copied before the kill were sent again: {stdout}"
    );
    assert!(copied >= 1, "nothing was left to copy: {stdout}");
    assert_eq!(copied + skipped, blobs, "{stdout}");
    let upstream = air.raw(&air.upstream, "team/big:v2").unwrap();
    let mirrored = air.raw(&air.mirror, "team/big:v2").unwrap();
    assert_eq!(sha256(&mirrored), sha256(&upstream));
}

#[test]
fn images_for_another_registry_and_an_unknown_mirror_are_refused_up_front() {
    let air = AirGap::new(true);
    let out = air.sync(&["--images", "nginx:1.27"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(
            "docker.io/library/nginx:1.27: RegistryMirror \"air-gap\" mirrors 127.0.0.1:"
        ),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .arg("sync-images")
        .arg(&air.yaml)
        .args(["--to", "elsewhere", "--images", "nginx"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .contains("no RegistryMirror named \"elsewhere\" in the manifests (found: air-gap)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn the_air_gap_example_is_valid_and_its_list_reads() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_regmirror"))
        .args(["validate", "examples/air-gap"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert_success(&out, "validate examples/air-gap");
    let list = repo.join("examples/air-gap/images.txt");
    let images = regmirror::sync::images::parse_list(list.to_str().unwrap()).unwrap();
    let names: Vec<String> = images.iter().map(|r| r.whole()).collect();
    assert_eq!(
        names,
        [
            "docker.io/library/nginx:1.27",
            "docker.io/library/busybox:1.37",
            "docker.io/library/redis:7.4"
        ]
    );
}
