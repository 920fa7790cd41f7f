//! The storage volume in a branch's namespace. With `--volume-pvc NAME`,
//! computes mount the PersistentVolumeClaim NAME of the branch's own
//! namespace (a Pod can only use a claim of its namespace), which the user
//! creates, bound to the storage volume. Without it the compute Pod would
//! stay Pending with nothing on the Branch to say why: the Branch is
//! Stalled `VolumeClaimMissing` instead, and looked at again shortly, so it
//! goes on by itself once the claim appears.

use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::runtime::controller::Action;

use super::Done;
use crate::compute::VolumeSource;
use crate::controller::status::Outcome;
use crate::controller::{Context, Error};

/// The Stalled reason of a branch whose namespace lacks the volume claim.
pub const VOLUME_CLAIM_MISSING: &str = "VolumeClaimMissing";

/// How soon a branch waiting for its claim is looked at again.
const RECHECK: Duration = Duration::from_secs(15);

/// The claim computes mount, when the volume is one.
pub fn claim_of(volume: &VolumeSource) -> Option<&str> {
    match volume {
        VolumeSource::Pvc(name) => Some(name),
        VolumeSource::HostPath(_) => None,
    }
}

/// What a branch in `ns` reports while the claim `claim` is not there.
fn missing(claim: &str, ns: &str) -> Done {
    Done {
        outcome: Outcome::Stalled {
            reason: VOLUME_CLAIM_MISSING.into(),
            message: format!(
                "PersistentVolumeClaim {claim} not found in namespace {ns}: computes mount the storage volume through a claim of that name in the branch's namespace; create it there, bound to the storage volume (see the chart's NOTES)"
            ),
        },
        phase: crate::api::BranchPhase::Pending,
        requeue: Action::requeue(RECHECK),
    }
}

/// Before a compute starts: `Some` (Stalled) when its volume is a claim
/// that does not exist in `ns`.
pub(super) async fn check_claim(ctx: &Context, ns: &str) -> Result<Option<Done>, Error> {
    let Some(claim) = claim_of(&ctx.config.compute.volume) else {
        return Ok(None);
    };
    let found = ctx
        .get::<PersistentVolumeClaim>(ns, "read the volume claim", claim)
        .await?;
    Ok(found.is_none().then(|| missing(claim, ns)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_claim_volume_needs_a_claim_in_the_namespace() {
        assert_eq!(
            claim_of(&VolumeSource::Pvc("pgdata".into())),
            Some("pgdata")
        );
        assert_eq!(claim_of(&VolumeSource::HostPath("/srv".into())), None);
    }

    /// Missing: Stalled with a reason and a message naming the claim and
    /// the namespace, and looked at again soon (it recovers by itself).
    #[test]
    fn a_missing_claim_stalls_the_branch_and_is_rechecked() {
        let d = missing("pgdata", "team-a");
        match &d.outcome {
            Outcome::Stalled { reason, message } => {
                assert_eq!(reason, VOLUME_CLAIM_MISSING);
                assert!(
                    message.contains("pgdata") && message.contains("team-a"),
                    "{message}"
                );
            }
            o => panic!("{o:?}"),
        }
        assert_eq!(d.requeue, Action::requeue(RECHECK));
    }
}
