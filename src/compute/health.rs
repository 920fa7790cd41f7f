//! Why a compute does not come up, read from its Pods as the scheduler and
//! the kubelet report them: a Pod that cannot be scheduled, an image that
//! cannot be pulled, a container that keeps crashing (with postgres's last
//! log line), a container that cannot be created. Pure: the Branch
//! controller lists the Pods and puts the answer in its conditions.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// What keeps a compute Pod from becoming ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    /// CamelCase, for the Branch's condition: `ComputeUnschedulable`,
    /// `ComputeImagePullBackOff`, `ComputeCrashLoopBackOff`,
    /// `ComputeCreateContainerError`.
    pub reason: &'static str,
    /// What the scheduler or kubelet said, with the Pod's name.
    pub message: String,
    /// When the Pod was created (RFC 3339): how long it has been trying.
    pub since: Option<jiff::Timestamp>,
}

/// Waiting reasons of a container that will not fix themselves soon.
fn waiting_reason(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "ImagePullBackOff" | "ErrImagePull" | "ErrImageNeverPull" | "InvalidImageName" => {
            "ComputeImagePullBackOff"
        }
        "CrashLoopBackOff" => "ComputeCrashLoopBackOff",
        "CreateContainerConfigError" | "CreateContainerError" | "RunContainerError" => {
            "ComputeCreateContainerError"
        }
        _ => return None,
    })
}

fn container_problem(pod: &str, c: &ContainerStatus) -> Option<(&'static str, String)> {
    let waiting = c.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting_reason(waiting.reason.as_deref()?)?;
    let mut message = format!(
        "pod {pod}: container {} is {}",
        c.name,
        waiting.reason.as_deref().unwrap_or_default()
    );
    if let Some(m) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
        message.push_str(&format!(": {m}"));
    }
    // A crash: the container's last words (postgres's last log line when
    // the termination message falls back to the log).
    if let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
        let last = t
            .message
            .as_deref()
            .and_then(|m| m.lines().rev().find(|l| !l.trim().is_empty()))
            .map(str::trim);
        match last {
            Some(l) => message.push_str(&format!("; it exited with code {}: {l}", t.exit_code)),
            None => message.push_str(&format!("; it exited with code {}", t.exit_code)),
        }
    }
    Some((reason, message))
}

/// The first problem among `pods` (the Pods of one compute Deployment),
/// or `None` while they are only starting.
pub fn pod_problem(pods: &[Pod]) -> Option<PodProblem> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .find_map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let since = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let status = p.status.as_ref()?;
            if let Some(c) = status.conditions.iter().flatten().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            }) {
                return Some(PodProblem {
                    reason: "ComputeUnschedulable",
                    message: format!(
                        "pod {name} cannot be scheduled: {}",
                        c.message.clone().unwrap_or_default()
                    ),
                    since,
                });
            }
            status
                .container_statuses
                .iter()
                .flatten()
                .chain(status.init_container_statuses.iter().flatten())
                .find_map(|c| container_problem(&name, c))
                .map(|(reason, message)| PodProblem {
                    reason,
                    message,
                    since,
                })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "main-a1-xyz", "creationTimestamp": "2026-12-07T10:00:00Z"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn unschedulable_pods_say_what_the_scheduler_said() {
        let p = pod(
            json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
            "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient cpu."}]}),
        );
        let got = pod_problem(&[p]).unwrap();
        assert_eq!(got.reason, "ComputeUnschedulable");
        assert!(got.message.contains("Insufficient cpu"), "{}", got.message);
        assert_eq!(got.since, Some("2026-12-07T10:00:00Z".parse().unwrap()));
    }

    #[test]
    fn image_pulls_and_crash_loops_carry_the_kubelets_words() {
        let p = pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "postgres",
            "image": "postgres:99", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff",
                "message": "Back-off pulling image \"postgres:99\""}}}]}),
        );
        let got = pod_problem(&[p]).unwrap();
        assert_eq!(got.reason, "ComputeImagePullBackOff");
        assert!(got.message.contains("postgres:99"), "{}", got.message);

        let p = pod(
            json!({"phase": "Running", "containerStatuses": [{"name": "postgres",
            "image": "postgres:15", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}},
            "lastState": {"terminated": {"exitCode": 1,
                "message": "LOG: starting\nFATAL:  invalid value for parameter \"shared_buffers\": \"lots\"\n"}}}]}),
        );
        let got = pod_problem(&[p]).unwrap();
        assert_eq!(got.reason, "ComputeCrashLoopBackOff");
        assert!(
            got.message
                .ends_with("exited with code 1: FATAL:  invalid value for parameter \"shared_buffers\": \"lots\""),
            "{}",
            got.message
        );
    }

    #[test]
    fn starting_pods_are_no_problem() {
        let p = pod(
            json!({"phase": "Pending", "containerStatuses": [{"name": "postgres",
            "image": "postgres:15", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}}]}),
        );
        assert_eq!(pod_problem(&[p]), None);
        assert_eq!(pod_problem(&[]), None);
    }
}
