#!/usr/bin/env python3
"""Lints and renders the Helm chart offline with Helm's own Go SDK (the
helm-python-sdk package embeds it), the way `helm lint --strict` and
`helm template` would.

Usage: render_chart.py CHART VALUES_FILE OUT_FILE
Writes every rendered manifest into OUT_FILE as one multi-document YAML
stream; exits non-zero on a lint error, a values.schema.json violation or a
template error.
"""
import sys

import helm_python as helm
import yaml

RELEASE, NAMESPACE = "pgbranch", "pgbranch-system"


def main():
    chart_dir, values_file, out_file = sys.argv[1:4]
    with open(values_file, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    report = helm.lint(chart_dir, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in report.get("messages", []):
        print("  lint [%s] %s: %s" % ({1: "info", 2: "warning", 3: "error"}.get(m.get("severity"), "?"),
                                      m.get("path"), m.get("error")))
    for e in report.get("errors", []):
        print("  lint error: %s" % e)
    if problems or report.get("errors"):
        return 1
    try:
        with helm.Chart.load(chart_dir) as chart:
            chart.validate_schema(values)
            manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    except helm.HelmError as e:
        print("  %s: %s" % (type(e).__name__, e))
        return 1
    docs = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt") or not manifests[path].strip():
            continue
        for doc in yaml.safe_load_all(manifests[path]):
            if doc:
                docs.append(doc)
    with open(out_file, "w", encoding="utf-8") as out:
        yaml.safe_dump_all(docs, out, sort_keys=False)
    print("  rendered %d objects: %s" % (len(docs), ", ".join(
        sorted({"%s" % d.get("kind") for d in docs}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
