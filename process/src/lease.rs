//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly
//! one writes.
//!
//! The election itself is [`kube_lease_manager`]'s. Its rules: the holder renews a third of
//! the duration after each renewal; another candidate takes over only once the holder's
//! `renewTime` plus `leaseDurationSeconds` has passed by the candidate's own clock: it clears
//! the expired holder, waits a random 0.1–1 s, and claims the lease with server-side apply
//! under a field manager of its own (`kube-lease-manager-<identity>`), so that of two
//! candidates claiming at once the API server refuses the second (409 Conflict).
//!
//! This module adds what a process needs around it: [`LeaseLock::acquire`] waits until the
//! lease is ours (a follower retries errors; it has nothing to lose by waiting), [`Held`]
//! renews it in a task of its own so that long work under it does not delay renewal,
//! [`Held::lost`] says when leadership is gone — another holder, or no renewal confirmed by
//! the API server for a whole duration (kube-lease-manager alone would keep retrying and go on
//! saying we lead) — and [`Held::release`] hands the lease back on shutdown.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Future;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::client::Body;
use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};
use tokio::time::Instant;

/// Leadership ends this long before a whole duration without a confirmed renewal, for the
/// time a renewal takes to reach the API server.
const MARGIN: Duration = Duration::from_secs(1);

/// One candidate for one Lease.
pub struct LeaseLock {
    /// The client, seen through [`Witness`].
    client: Client,
    namespace: String,
    name: String,
    identity: String,
    /// Whole seconds, at least 2: the Lease counts in seconds, and renewal comes before expiry.
    duration: u64,
    confirmed: Confirmed,
}

/// When (by our clock) the last write was sent that the API server answered with a Lease
/// naming us as holder.
type Confirmed = Arc<Mutex<Option<Instant>>>;

impl LeaseLock {
    /// A candidate `identity` for the Lease `namespace/name`, held for `duration` (whole
    /// seconds, at least 2) after each renewal.
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        assert!(
            duration >= Duration::from_secs(2),
            "a lease duration under 2 s leaves no time to renew"
        );
        let confirmed = Confirmed::default();
        let witness = Witness {
            client: client.clone(),
            identity: identity.to_owned(),
            confirmed: confirmed.clone(),
        };
        LeaseLock {
            client: Client::new(witness, client.default_namespace().to_owned()),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration: duration.as_secs(),
            confirmed,
        }
    }

    /// How often the holder renews: a third of the duration, as client-go does.
    pub fn renew_interval(&self) -> Duration {
        Duration::from_secs((self.duration / 3).max(1))
    }

    fn params(&self) -> LeaseParams {
        // kube-lease-manager renews `grace` seconds before the lease expires.
        let grace = self.duration - self.renew_interval().as_secs();
        LeaseParams::new(self.identity.clone(), self.duration, grace)
    }

    async fn manager(&self) -> Result<LeaseManager, LeaseManagerError> {
        LeaseManager::new(
            self.client.clone(),
            &self.name,
            &self.namespace,
            self.params(),
            LeaseCreateMode::AutoCreate,
        )
        .await
    }

    /// Waits until the lease is ours (creating it if there is none), then keeps it: see
    /// [`Held`]. Errors talking to the API server are logged and retried.
    pub async fn acquire(self) -> Held {
        let manager = loop {
            let manager = match self.manager().await {
                Ok(manager) => manager,
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read the lease; retrying");
                    tokio::time::sleep(self.renew_interval()).await;
                    continue;
                }
            };
            let leading = loop {
                match manager.changed().await {
                    Ok(true) => break true,
                    Ok(false) => {}
                    // Deleted under us: start again, which creates it.
                    Err(LeaseManagerError::NonexistentLease(_)) => break false,
                    Err(e) => {
                        tracing::warn!(lease = %self.name, error = %e, "cannot take the lease; retrying");
                        tokio::time::sleep(self.renew_interval()).await;
                    }
                }
            };
            if leading {
                break manager;
            }
        };
        self.keep(manager).await
    }

    async fn keep(self, manager: LeaseManager) -> Held {
        let limit = Duration::from_secs(self.duration).saturating_sub(MARGIN);
        let confirmed = self.confirmed;
        confirmed
            .lock()
            .expect("lease confirmation lock")
            .get_or_insert_with(Instant::now);
        let name = self.name;
        let (mut leading, watcher) = manager.watch().await;
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let stopped = loop {
                let last = *confirmed.lock().expect("lease confirmation lock");
                let deadline = last.map_or_else(Instant::now, |at| at + limit);
                tokio::select! {
                    _ = &mut stop_rx => break true,
                    changed = leading.changed() => {
                        if changed.is_err() || !*leading.borrow_and_update() {
                            tracing::error!(lease = %name, "the lease has another holder");
                            break false;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        if *confirmed.lock().expect("lease confirmation lock") == last {
                            tracing::error!(lease = %name, "could not renew the lease in time");
                            break false;
                        }
                    }
                }
            };
            if !stopped {
                // Not ours any more: neither renew nor release it.
                watcher.abort();
                let _ = lost_tx.send(true);
                return;
            }
            // With the last receiver gone, kube-lease-manager releases the lease and ends.
            drop(leading);
            match tokio::time::timeout(limit, watcher).await {
                Ok(Ok(Ok(_))) => tracing::info!(lease = %name, "released the lease"),
                Ok(Ok(Err(e))) => {
                    tracing::warn!(lease = %name, error = %e, "releasing the lease failed; another replica takes over when it expires")
                }
                Ok(Err(e)) => tracing::warn!(lease = %name, error = %e, "the lease task failed"),
                Err(_) => {
                    tracing::warn!(lease = %name, "releasing the lease timed out; another replica takes over when it expires")
                }
            }
        });
        Held {
            lost,
            stop: Some(stop),
            task,
        }
    }
}

/// A lease being held: renewed in the background until released, or until it is lost.
pub struct Held {
    lost: tokio::sync::watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Resolves when leadership is lost; from then on, nothing may be written.
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and hands the lease back.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// The client kube-lease-manager talks through: it passes every request on, and notes when a
/// write was sent that the API server answered with a Lease naming us as holder. That is the
/// one thing kube-lease-manager does not tell: whether its renewals go through.
#[derive(Clone)]
struct Witness {
    client: Client,
    identity: String,
    confirmed: Confirmed,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, kube::Error>> + Send>>;

impl tower_service::Service<Request<Body>> for Witness {
    type Response = Response<Body>;
    type Error = kube::Error;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), kube::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Answer {
        let this = self.clone();
        Box::pin(async move {
            let write = request.method() == Method::PATCH;
            let sent = Instant::now();
            let response = this.client.send(request).await?;
            if !write || !response.status().is_success() {
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await?.to_bytes();
            let holder = serde_json::from_slice::<Lease>(&bytes)
                .ok()
                .and_then(|lease| lease.spec?.holder_identity);
            if holder.as_deref() == Some(this.identity.as_str()) {
                let mut confirmed = this.confirmed.lock().expect("lease confirmation lock");
                *confirmed = Some(confirmed.map_or(sent, |at| at.max(sent)));
            }
            Ok(Response::from_parts(parts, Body::from(bytes)))
        })
    }
}
