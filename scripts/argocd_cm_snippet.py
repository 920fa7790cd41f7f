#!/usr/bin/env python3
"""Prints the argocd-cm ConfigMap snippet that installs pgbranch's health
checks (argo/resource_customizations/pgbranch.dev/<Kind>/health.lua), or with
--check DOC, fails when the snippet in DOC (between the markers) differs.
"""
import os
import sys

ROOT = "argo/resource_customizations/pgbranch.dev"
BEGIN, END = "<!-- argocd-cm:begin -->", "<!-- argocd-cm:end -->"


def snippet():
    lines = ["```yaml", "apiVersion: v1", "kind: ConfigMap", "metadata:",
             "  name: argocd-cm", "  namespace: argocd", "  labels:",
             "    app.kubernetes.io/part-of: argocd", "data:"]
    for kind in sorted(os.listdir(ROOT)):
        with open(os.path.join(ROOT, kind, "health.lua"), encoding="utf-8") as f:
            lua = f.read().rstrip("\n").split("\n")
        lines.append("  resource.customizations.health.pgbranch.dev_%s: |" % kind)
        lines.extend(("    " + line) if line else "" for line in lua)
    lines.append("```")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        with open(sys.argv[2], encoding="utf-8") as f:
            doc = f.read()
        try:
            current = doc.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\n")
        except IndexError:
            print("%s: markers %s ... %s missing" % (sys.argv[2], BEGIN, END))
            return 1
        if current != snippet():
            print("%s: argocd-cm snippet differs from the health.lua files; "
                  "regenerate with: python3 scripts/argocd_cm_snippet.py --write %s" % (sys.argv[2], sys.argv[2]))
            return 1
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        with open(sys.argv[2], encoding="utf-8") as f:
            doc = f.read()
        head, rest = doc.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        with open(sys.argv[2], "w", encoding="utf-8") as f:
            f.write(head + BEGIN + "\n" + snippet() + END + tail)
        return 0
    sys.stdout.write(snippet())
    return 0


if __name__ == "__main__":
    sys.exit(main())
