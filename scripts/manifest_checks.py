#!/usr/bin/env python3
"""Semantic checks on rendered manifests (multi-document YAML files).

  manifest_checks.py crds-match CRD_DIR RENDERED
      The CustomResourceDefinitions in RENDERED are exactly those in CRD_DIR,
      apart from the labels and the `helm.sh/resource-policy: keep`
      annotation the chart adds.
  manifest_checks.py no-crds RENDERED
      RENDERED holds no CustomResourceDefinition (crds.create=false).
  manifest_checks.py rbac-match RENDERED_A RENDERED_B
      The operator's ClusterRole/Role rules are the same in both (the chart
      and the kustomize config grant the same permissions).
  manifest_checks.py flags-exist BINARY RENDERED...
      Every `--flag` the manifests pass to `pgbranch <subcommand>` is a flag
      that subcommand of BINARY accepts (from its --help). Exit 77 (skip)
      when a subcommand is not implemented in BINARY yet.
  manifest_checks.py pod-security RENDERED...
      Every pod template meets PodSecurity `restricted` (hostPath volumes are
      reported: only the single-node hostPath mode uses them, and it needs a
      namespace at `privileged`).
"""
import sys

import yaml


def load(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def load_dir(d):
    import os
    docs = []
    for n in sorted(os.listdir(d)):
        if n.endswith((".yaml", ".yml")):
            docs.extend(load(os.path.join(d, n)))
    return docs


def crds_match(crd_dir, rendered):
    want = {d["metadata"]["name"]: d for d in load_dir(crd_dir)}
    got = {d["metadata"]["name"]: d for d in load(rendered) if d.get("kind") == "CustomResourceDefinition"}
    errors = []
    if set(want) != set(got):
        errors.append("CRDs differ: in crds/ only %s, rendered only %s"
                      % (sorted(set(want) - set(got)), sorted(set(got) - set(want))))
    for name in sorted(set(want) & set(got)):
        g = yaml.safe_load(yaml.safe_dump(got[name]))
        meta = g["metadata"]
        ann = meta.get("annotations") or {}
        if ann.pop("helm.sh/resource-policy", None) != "keep":
            errors.append("%s: no helm.sh/resource-policy: keep" % name)
        if ann:
            meta["annotations"] = ann
        else:
            meta.pop("annotations", None)
        want_labels = want[name]["metadata"].get("labels")
        if want_labels is None:
            meta.pop("labels", None)
        else:
            meta["labels"] = {k: v for k, v in (meta.get("labels") or {}).items() if k in want_labels}
        if g != want[name]:
            errors.append("%s: rendered CRD differs from crds/" % name)
    return errors


def no_crds(rendered):
    n = [d["metadata"]["name"] for d in load(rendered) if d.get("kind") == "CustomResourceDefinition"]
    return ["CRDs rendered although crds.create=false: %s" % n] if n else []


def operator_rules(path):
    rules = None
    for d in load(path):
        if d.get("kind") in ("ClusterRole", "Role") and d["metadata"]["name"].endswith("-operator"):
            rules = d.get("rules")
    if rules is None:
        return None
    norm = set()
    for r in rules:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r.get("verbs", []):
                    norm.add((g, res, v))
    return norm


def rbac_match(a, b):
    ra, rb = operator_rules(a), operator_rules(b)
    if ra is None or rb is None:
        return ["no operator ClusterRole/Role in %s" % (a if ra is None else b)]
    errors = []
    for x in sorted(ra - rb):
        errors.append("only in %s: %s %s %s" % (a, *x))
    for x in sorted(rb - ra):
        errors.append("only in %s: %s %s %s" % (b, *x))
    return errors


POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_security(paths):
    errors = []
    for path in paths:
        for d in load(path):
            if d.get("kind") not in POD_KINDS:
                continue
            name = "%s %s/%s" % (path, d["kind"], d["metadata"]["name"])
            spec = d["spec"]["template"]["spec"]
            psc = spec.get("securityContext") or {}
            if (psc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
                errors.append("%s: pod seccompProfile is not RuntimeDefault" % name)
            for v in spec.get("volumes") or []:
                if "hostPath" in v:
                    print("  note: %s uses hostPath volume %s (needs a privileged namespace)" % (name, v["name"]))
            for c in (spec.get("initContainers") or []) + spec["containers"]:
                sc = c.get("securityContext") or {}
                cname = "%s container %s" % (name, c["name"])
                if sc.get("allowPrivilegeEscalation") is not False:
                    errors.append("%s: allowPrivilegeEscalation is not false" % cname)
                if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")):
                    errors.append("%s: runAsNonRoot is not set" % cname)
                if (sc.get("runAsUser", psc.get("runAsUser")) == 0):
                    errors.append("%s: runs as uid 0" % cname)
                if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
                    errors.append("%s: capabilities do not drop ALL" % cname)
                if (sc.get("capabilities") or {}).get("add"):
                    errors.append("%s: adds capabilities" % cname)
                if sc.get("privileged"):
                    errors.append("%s: privileged" % cname)
                if not c.get("resources", {}).get("requests"):
                    errors.append("%s: no resource requests" % cname)
                if c["name"] != "postgres" and not (c.get("readinessProbe") and c.get("livenessProbe")):
                    errors.append("%s: missing readiness or liveness probe" % cname)
    return errors


def _template_labels(docs, component):
    """Pod template labels of the workloads of one app.kubernetes.io/component."""
    out = []
    for d in docs:
        if d.get("kind") not in POD_KINDS:
            continue
        labels = ((d["spec"].get("template") or {}).get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/component") == component:
            out.append(labels)
    return out


def _selects(selector, labels):
    """Whether a LabelSelector with matchLabels only selects pods with `labels`."""
    if not selector or selector.get("matchExpressions"):
        return False
    ml = selector.get("matchLabels") or {}
    return bool(ml) and all(labels.get(k) == v for k, v in ml.items())


def storage_netpol(paths):
    """The storage API may be called only by the operator: some NetworkPolicy
    selects the storage pods for Ingress, and every ingress rule of every
    policy selecting them admits only the operator's pods (same namespace,
    no ipBlock, no namespaceSelector) on the API port."""
    docs = [d for p in paths for d in load(p)]
    storage = _template_labels(docs, "storage")
    operator = _template_labels(docs, "operator")
    if not storage:
        return ["no storage workload in %s" % ", ".join(paths)]
    if not operator:
        return ["no operator workload in %s" % ", ".join(paths)]
    errors = []
    guarding = []
    for d in docs:
        if d.get("kind") != "NetworkPolicy":
            continue
        spec = d.get("spec") or {}
        sel = spec.get("podSelector")
        if not any(_selects(sel, l) for l in storage) and sel not in ({}, None):
            continue
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            continue
        name = "NetworkPolicy %s" % d["metadata"]["name"]
        if any(_selects(sel, l) for l in storage):
            guarding.append(name)
        for rule in spec.get("ingress") or []:
            peers = rule.get("from")
            if not peers:
                errors.append("%s admits every peer (an ingress rule without `from`)" % name)
                continue
            for peer in peers:
                if "ipBlock" in peer or "namespaceSelector" in peer:
                    errors.append("%s admits peers outside the operator: %s" % (name, peer))
                elif not any(_selects(peer.get("podSelector"), l) for l in operator):
                    errors.append("%s admits pods that are not the operator: %s" % (name, peer))
            ports = rule.get("ports")
            if not ports or any(p.get("port") not in ("http", 7432) for p in ports):
                errors.append("%s opens ports other than the storage API's: %s" % (name, ports))
    if not guarding:
        errors.append("no NetworkPolicy selects the storage pods for Ingress")
    return errors


SKIP = 77


def flags_exist(binary, paths):
    import re
    import subprocess
    errors, skipped, checked = [], [], 0
    helps = {}
    for path in paths:
        for d in load(path):
            if d.get("kind") not in POD_KINDS:
                continue
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c.get("command") != ["pgbranch"]:
                    continue
                args = c.get("args") or []
                sub = []
                for a in args:
                    if a.startswith("-"):
                        break
                    sub.append(a)
                key = " ".join(sub)
                if key not in helps:
                    p = subprocess.run([binary, *sub, "--help"], capture_output=True, text=True, check=False)
                    flags = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", p.stdout)) - {"--help", "--version"}
                    helps[key] = flags if p.returncode == 0 and flags else None
                if helps[key] is None:
                    skipped.append("`pgbranch %s` defines no flags in %s yet" % (key, binary))
                    continue
                for a in args[len(sub):]:
                    if not a.startswith("--"):
                        continue
                    flag = a.split("=", 1)[0]
                    checked += 1
                    if flag not in helps[key]:
                        errors.append("%s %s/%s: `pgbranch %s` has no flag %s"
                                      % (path, d["kind"], d["metadata"]["name"], key, flag))
    for s_ in sorted(set(skipped)):
        print("  skip: " + s_)
    if not errors:
        print("  %d flags checked against %s" % (checked, binary))
    if skipped and not errors and checked == 0:
        return errors, SKIP
    return errors, 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "flags-exist":
        errors, code = flags_exist(args[0], args[1:])
        for e in errors:
            print("  " + e)
        return 1 if errors else code
    errors = {
        "crds-match": lambda: crds_match(*args),
        "no-crds": lambda: no_crds(*args),
        "rbac-match": lambda: rbac_match(*args),
        "pod-security": lambda: pod_security(args),
        "storage-netpol": lambda: storage_netpol(args),
    }[cmd]()
    for e in errors:
        print("  " + e)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
