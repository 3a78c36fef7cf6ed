//! Sealing: a config opens only with its key, its key only with its node's private key, and a
//! config's content must be what its name says.

use std::collections::BTreeMap;

use regmirror_core::contract::config_secret_name;
use regmirror_core::render::{RenderedConfig, RenderedFile};
use regmirror_core::seal::{recipient, NodeKey, SealError, SealingKey};

fn config(password: &str) -> RenderedConfig {
    RenderedConfig {
        peer_registries: Vec::new(),
        flavor: "k3s".into(),
        files: BTreeMap::from([(
            "/etc/rancher/k3s/registries.yaml".to_owned(),
            RenderedFile {
                mode: 0o600,
                content: format!(
                    "configs: {{mirror.example: {{auth: {{password: {password}}}}}}}\n"
                ),
            },
        )]),
        restart_key: "k".into(),
        parts: BTreeMap::new(),
        probes: BTreeMap::new(),
        credential_sources: BTreeMap::new(),
    }
}

fn operator() -> SealingKey {
    SealingKey::from_bytes(&[1; 32]).unwrap()
}

fn node(seed: u8) -> NodeKey {
    NodeKey::from_bytes(&[seed; 32]).unwrap()
}

#[test]
fn the_targeted_node_opens_its_config() {
    let c = config("s3cret");
    let name = config_secret_name(&c);
    let sealed = operator().seal_config(&name, &c);
    assert!(
        !String::from_utf8_lossy(&sealed).contains("s3cret"),
        "the stored bytes do not show the password"
    );
    let a = node(2);
    let sealed_key = operator().seal_key_for(&name, &a.public());
    assert_eq!(recipient(&sealed_key), Some(a.public().to_text().as_str()));
    let key = a.open_key(&name, &sealed_key).unwrap();
    assert_eq!(key.open_config(&name, &sealed).unwrap(), c);
    assert_eq!(operator().open_config(&name, &sealed).unwrap(), c);
}

#[test]
fn another_node_opens_neither_the_key_nor_the_config() {
    let c = config("s3cret");
    let name = config_secret_name(&c);
    let sealed = operator().seal_config(&name, &c);
    let (a, b) = (node(2), node(3));
    let for_a = operator().seal_key_for(&name, &a.public());
    assert_eq!(b.open_key(&name, &for_a), Err(SealError::OtherRecipient));
    // Even claiming to be the recipient, b's private key does not open a's sealed key.
    let forged = for_a.replacen(&a.public().to_text(), &b.public().to_text(), 1);
    assert_eq!(b.open_key(&name, &forged), Err(SealError::KeyDoesNotOpen));
    // A key for another config of b's own does not open a's config.
    let other = config("other");
    let other_name = config_secret_name(&other);
    let b_key = b
        .open_key(
            &other_name,
            &operator().seal_key_for(&other_name, &b.public()),
        )
        .unwrap();
    assert_eq!(
        b_key.open_config(&name, &sealed),
        Err(SealError::ConfigDoesNotOpen(name.clone()))
    );
    // Nor does a guessed operator key.
    assert!(SealingKey::from_bytes(&[9; 32])
        .unwrap()
        .open_config(&name, &sealed)
        .is_err());
}

#[test]
fn a_key_sealed_for_one_config_does_not_open_under_another_name() {
    let a = node(2);
    let c = config("one");
    let name = config_secret_name(&c);
    let sealed_key = operator().seal_key_for(&name, &a.public());
    let other = config_secret_name(&config("two"));
    assert_eq!(
        a.open_key(&other, &sealed_key),
        Err(SealError::KeyDoesNotOpen)
    );
}

#[test]
fn tampered_or_swapped_content_is_refused() {
    let c = config("one");
    let name = config_secret_name(&c);
    let mut sealed = operator().seal_config(&name, &c);
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    assert_eq!(
        operator().open_config(&name, &sealed),
        Err(SealError::ConfigDoesNotOpen(name.clone()))
    );
    // Another config sealed under this name (by someone holding the key) fails the digest.
    let swapped = operator().seal_config(&name, &config("two"));
    assert!(matches!(
        operator().open_config(&name, &swapped),
        Err(SealError::DigestMismatch { .. })
    ));
    assert!(operator().open_config(&name, b"short").is_err());
}

#[test]
fn sealing_is_deterministic_so_writes_are_idempotent() {
    let c = config("one");
    let name = config_secret_name(&c);
    let a = node(2);
    assert_eq!(
        operator().seal_config(&name, &c),
        operator().seal_config(&name, &c)
    );
    assert_eq!(
        operator().seal_key_for(&name, &a.public()),
        operator().seal_key_for(&name, &a.public())
    );
    assert_ne!(
        operator().seal_key_for(&name, &a.public()),
        operator().seal_key_for(&name, &node(3).public())
    );
}

#[test]
fn keys_in_debug_output_are_redacted() {
    assert_eq!(format!("{:?}", operator()), "SealingKey(<redacted>)");
    let shown = format!("{:?}", node(2));
    assert!(shown.starts_with("NodeKey(public: "), "{shown}");
}

#[test]
fn malformed_input_is_an_error_not_a_panic() {
    let a = node(2);
    for text in [
        "",
        "v1",
        "v1.a.b.c",
        "v2.x.y.z",
        "v1.!!.!!.!!",
        "v1.AAAA.AAAA.AAAA",
    ] {
        assert!(a.open_key("regmirror-config-x", text).is_err(), "{text}");
    }
    assert!(SealingKey::from_bytes(&[0; 31]).is_err());
    assert!(NodeKey::from_bytes(&[0; 33]).is_err());
}
