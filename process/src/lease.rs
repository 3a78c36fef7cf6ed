//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several replicas exactly
//! one writes.
//!
//! Hand-written rather than taken from a crate: the published lease crates trail kube's major
//! versions (kube 5 here), and what is needed is small. The rules are client-go's: the holder
//! renews well within `leaseDurationSeconds`; another candidate takes over only when it has
//! seen the lease *unchanged* for a whole duration, by its own clock (so clock skew between
//! nodes does not matter); every write carries the `resourceVersion` it read, so two
//! candidates racing for an expired lease cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

/// One candidate for one Lease.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The lease as last seen, and when (by our clock) it last changed.
    observed: Option<(Observed, Instant)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: None,
        }
    }

    /// How often the holder should renew: a third of the duration, as client-go does.
    pub fn renew_interval(&self) -> Duration {
        self.duration / 3
    }

    /// Takes or renews the lease. `Ok(true)`: we lead until `duration` from now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.claim(None)),
            };
            return self.won(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let seen = Observed {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
        };
        let now = Instant::now();
        let since = match &self.observed {
            Some((before, at)) if *before == seen => *at,
            _ => now,
        };
        self.observed = Some((seen.clone(), since));
        let ours = seen.holder.as_deref() == Some(self.identity.as_str());
        let expired = seen.holder.is_none() || now.duration_since(since) >= self.duration;
        if !ours && !expired {
            return Ok(false);
        }
        let mut claimed = lease.clone();
        claimed.spec = Some(self.claim(Some(&spec)));
        self.won(
            self.api
                .replace(&self.name, &PostParams::default(), &claimed)
                .await,
        )
    }

    /// Gives the lease up on shutdown, so another replica need not wait for it to expire.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.acquire_time = None;
        spec.renew_time = None;
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await?;
        Ok(())
    }

    /// The spec that says we hold the lease, continuing `previous`.
    fn claim(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.identity);
        let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(if ours || previous.is_none() {
                transitions
            } else {
                transitions + 1
            }),
            ..LeaseSpec::default()
        }
    }

    /// A write that lost a race (409 Conflict) means someone else leads.
    fn won(&mut self, written: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A lease being held: renewed in the background until released, or until it is lost.
pub struct Held {
    lost: tokio::sync::watch::Receiver<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseLock {
    /// Waits until the lease is ours. Errors talking to the API server are logged and retried:
    /// a follower has nothing to lose by waiting.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "cannot read the lease; retrying")
                }
            }
            tokio::time::sleep(self.renew_interval()).await;
        }
    }

    /// Keeps renewing the lease in a task of its own, so that long work under it does not
    /// delay renewal. Leadership is lost when a renewal finds another holder, or when renewals
    /// fail for a whole duration.
    pub fn keep(mut self) -> Held {
        let (lost_tx, lost) = tokio::sync::watch::channel(false);
        let (stop, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut renewed = Instant::now();
            let mut wait = self.renew_interval();
            loop {
                tokio::select! {
                    _ = &mut stop_rx => {
                        if let Err(e) = self.release().await {
                            tracing::warn!(error = %e, "releasing the lease failed; another replica takes over when it expires");
                        }
                        return;
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                match self.try_acquire_or_renew().await {
                    Ok(true) => {
                        renewed = Instant::now();
                        wait = self.renew_interval();
                    }
                    Ok(false) => break,
                    Err(e) if renewed.elapsed() + Duration::from_secs(1) < self.duration => {
                        tracing::warn!(lease = %self.name, error = %e, "renewing the lease failed; retrying");
                        wait = Duration::from_secs(1);
                    }
                    Err(e) => {
                        tracing::error!(lease = %self.name, error = %e, "could not renew the lease in time");
                        break;
                    }
                }
            }
            let _ = lost_tx.send(true);
        });
        Held {
            lost,
            stop: Some(stop),
            task,
        }
    }
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
