//! A one-layer OCI image built here (no Docker), and pushing it with skopeo.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::process::{require_tool, run_ok};
use crate::registry::Registry;

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes an OCI image layout with one uncompressed layer holding `hello.txt` with `message`;
/// returns the manifest digest.
pub fn oci_layout(dir: &Path, tag: &str, message: &str) -> String {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let write_blob = |data: &[u8]| {
        let digest = sha256(data);
        std::fs::write(blobs.join(&digest), data).unwrap();
        (format!("sha256:{digest}"), data.len())
    };

    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(message.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_cksum();
    layer
        .append_data(&mut header, "hello.txt", message.as_bytes())
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let (layer_digest, layer_size) = write_blob(&layer);

    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = write_blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = write_blob(manifest.to_string().as_bytes());
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
            "annotations": {"org.opencontainers.image.ref.name": tag}}],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    manifest_digest
}

/// Pushes `layout:tag` to `registry` as `repository:tag`, with the registry's credentials and
/// the PKI's CA (and client certificate, when the registry wants one).
pub fn push(
    layout: &Path,
    tag: &str,
    registry: &Registry,
    repository: &str,
    pki_dir: &Path,
    work: &Path,
) {
    require_tool("skopeo");
    let cert_dir = work.join("push-certs");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(pki_dir.join("ca.crt"), cert_dir.join("ca.crt")).unwrap();
    if registry.options.client_certs {
        std::fs::copy(pki_dir.join("client.crt"), cert_dir.join("client.cert")).unwrap();
        std::fs::copy(pki_dir.join("client.key"), cert_dir.join("client.key")).unwrap();
    }
    let mut skopeo = Command::new("skopeo");
    skopeo.env("HOME", work).arg("copy").arg("--quiet");
    if let Some((user, password)) = &registry.options.basic_auth {
        skopeo.arg("--dest-creds").arg(format!("{user}:{password}"));
    }
    if registry.options.tls {
        skopeo.arg("--dest-cert-dir").arg(&cert_dir);
    } else {
        skopeo.arg("--dest-tls-verify=false");
    }
    skopeo
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{repository}:{tag}", registry.host()));
    run_ok(&mut skopeo);
}
