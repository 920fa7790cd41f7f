//! `spec.expiresAt` of Branches and Snapshots: when an object is deleted
//! because it expired, and when its expiresAt is refused.
//!
//! An expiresAt at or before the object's creation (a copied sample with a
//! date long gone, a typo in the year) would delete the object the moment
//! it appears, with nothing to show for it but an operator log line. It is
//! refused instead: Stalled with reason `ExpiresAtInPast` (the status write
//! publishes the Warning Event). Every deletion by expiry publishes a
//! Normal Event with reason `Expired` on the object.

use std::time::Duration;

use kube::runtime::events::EventType;
use kube::Resource;

use super::{Context, Error};

/// The Event reason of a deletion by expiry.
pub const EXPIRED: &str = "Expired";
/// The Stalled reason of an expiresAt at or before the object's creation.
pub const EXPIRES_AT_IN_PAST: &str = "ExpiresAtInPast";

/// What `spec.expiresAt` asks for now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expiry {
    /// No expiresAt.
    Never,
    /// Expires later: look again after this long.
    Later(Duration),
    /// Due: delete the object.
    Due,
    /// At or before the object's creation: refuse, never delete.
    BeforeCreation,
}

/// Decides what `expires` means for an object created at `created` (None:
/// not known, e.g. before the API server stamped it) at the time `now`.
pub fn decide(
    expires: Option<jiff::Timestamp>,
    created: Option<jiff::Timestamp>,
    now: jiff::Timestamp,
) -> Expiry {
    let Some(expires) = expires else {
        return Expiry::Never;
    };
    if created.is_some_and(|c| expires <= c) {
        return Expiry::BeforeCreation;
    }
    if now >= expires {
        return Expiry::Due;
    }
    Expiry::Later(expires.duration_since(now).unsigned_abs())
}

/// The object's `metadata.creationTimestamp`.
pub fn created<K: Resource>(obj: &K) -> Option<jiff::Timestamp> {
    obj.meta().creation_timestamp.as_ref().map(|t| t.0)
}

/// The error of an expiresAt at or before the creation of a `kind`.
pub fn in_past(kind: &str, expires: jiff::Timestamp, created: Option<jiff::Timestamp>) -> Error {
    let created = created.map(|c| c.to_string()).unwrap_or_default();
    Error::stalled(
        EXPIRES_AT_IN_PAST,
        format!(
            "spec.expiresAt {expires} is not after the {kind}'s creation ({created}): it would be deleted at once, so it is kept. Set a time in the future, or remove expiresAt"
        ),
    )
}

/// Publishes the Normal `Expired` Event of an object about to be deleted
/// because it expired.
pub async fn publish_expired<K>(ctx: &Context, obj: &K, expires: jiff::Timestamp)
where
    K: Resource<DynamicType = ()>,
{
    let note = format!(
        "spec.expiresAt {expires} passed: deleting the {}",
        K::kind(&())
    );
    super::status::publish(ctx, obj, EventType::Normal, EXPIRED, "Delete", &note).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> jiff::Timestamp {
        jiff::Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn no_expires_at_never_expires() {
        assert_eq!(decide(None, Some(t(0)), t(100)), Expiry::Never);
    }

    #[test]
    fn a_future_expires_at_waits_then_is_due() {
        assert_eq!(
            decide(Some(t(60)), Some(t(0)), t(10)),
            Expiry::Later(Duration::from_secs(50))
        );
        assert_eq!(decide(Some(t(60)), Some(t(0)), t(60)), Expiry::Due);
        assert_eq!(decide(Some(t(60)), Some(t(0)), t(3600)), Expiry::Due);
    }

    /// A sample applied long after its date, or an expiresAt set to the
    /// creation second: refused, not deleted.
    #[test]
    fn an_expires_at_not_after_creation_is_refused() {
        assert_eq!(
            decide(Some(t(-86_400)), Some(t(0)), t(1)),
            Expiry::BeforeCreation
        );
        assert_eq!(decide(Some(t(0)), Some(t(0)), t(1)), Expiry::BeforeCreation);
        let e = in_past("Branch", t(-86_400), Some(t(0)));
        assert_eq!(e.reason(), EXPIRES_AT_IN_PAST);
        assert!(e.to_string().contains("not after the Branch's creation"));
    }

    /// Moving expiresAt of an existing object into the past (after its
    /// creation) is how to delete it early: due.
    #[test]
    fn an_expires_at_moved_before_now_but_after_creation_is_due() {
        assert_eq!(decide(Some(t(5)), Some(t(0)), t(100)), Expiry::Due);
        // Creation unknown: only the time counts.
        assert_eq!(decide(Some(t(5)), None, t(100)), Expiry::Due);
    }
}
