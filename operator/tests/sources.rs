//! Secrets as the operator reads them: their one annotation regmirror uses, nothing else
//! (issue 14.2).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use regmirror::controller::snapshot::secret_source;
use regmirror_core::api::{Endpoint, EndpointAuth, RegistryMirror, RegistryMirrorSpec};
use regmirror_core::resolve::resolve;
use regmirror_core::sources::{RefPolicy, SourceKind, Sources, ALLOWED_HOSTS};

fn secret(annotations: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("mirror-pull".into()),
            namespace: Some("regmirror-system".into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(BTreeMap::from([
            ("username".into(), ByteString(b"puller".to_vec())),
            ("password".into(), ByteString(b"hunter2".to_vec())),
        ])),
        ..Default::default()
    }
}

fn resolves_for(secret: &Secret, url: &str) -> bool {
    let mut sources = Sources::new();
    sources.insert(
        SourceKind::Secret,
        "regmirror-system",
        "mirror-pull",
        secret_source(secret),
    );
    let mirror = RegistryMirror::new(
        "m",
        RegistryMirrorSpec {
            cache: None,
            embedded_registry: false,
            registry: "docker.io".into(),
            endpoints: vec![Endpoint {
                url: url.into(),
                auth: Some(EndpointAuth::from_secret("mirror-pull")),
                tls: None,
            }],
            rewrites: vec![],
            node_selector: None,
        },
    );
    resolve(&mirror, &sources, &RefPolicy::new("regmirror-system")).is_ok()
}

#[test]
fn the_snapshot_carries_a_secrets_allowed_hosts_and_no_other_annotation() {
    let last_applied = r#"{"stringData":{"password":"hunter2"}}"#;
    let s = secret(&[
        (ALLOWED_HOSTS, "mirror.example.com:5000"),
        (
            "kubectl.kubernetes.io/last-applied-configuration",
            last_applied,
        ),
    ]);
    let source = secret_source(&s);
    assert_eq!(
        source.allowed_hosts.as_deref(),
        Some("mirror.example.com:5000")
    );
    assert!(!format!("{source:?}").contains("hunter2"));
    assert!(resolves_for(&s, "https://mirror.example.com:5000"));
    assert!(!resolves_for(&s, "https://elsewhere.example.com"));
    // No annotation, no use.
    assert!(!resolves_for(
        &secret(&[]),
        "https://mirror.example.com:5000"
    ));
}
