#!/usr/bin/env python3
"""Assembles the Argo CD health checks from one source.

Argo CD runs each `resource_customizations/<group>/<Kind>/health.lua` on its
own (no shared modules), so the rules every pgbranch kind shares live once in
`argo/health/common.lua` and each kind's own rules in `argo/health/<Kind>.lua`;
this script writes `argo/resource_customizations/pgbranch.dev/<Kind>/health.lua`
as common + kind, with `{{KIND}}` replaced by the kind's name.

  python3 scripts/argo_health.py          # regenerate
  python3 scripts/argo_health.py --check  # fail if a health.lua drifted
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "argo" / "health"
OUT = ROOT / "argo" / "resource_customizations" / "pgbranch.dev"


def rendered():
    common = (SRC / "common.lua").read_text()
    for part in sorted(SRC.glob("*.lua")):
        if part.name == "common.lua":
            continue
        kind = part.stem
        yield kind, (common + part.read_text()).replace("{{KIND}}", kind)


def main():
    check = "--check" in sys.argv[1:]
    drifted = []
    for kind, text in rendered():
        target = OUT / kind / "health.lua"
        if check:
            if not target.exists() or target.read_text() != text:
                drifted.append(str(target.relative_to(ROOT)))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    if drifted:
        print("out of date (run python3 scripts/argo_health.py): " + ", ".join(drifted))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
