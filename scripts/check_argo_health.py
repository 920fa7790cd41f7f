#!/usr/bin/env python3
"""Runs every Argo CD health check under argo/resource_customizations with the
Lua 5.1 interpreter (the Lua Argo CD embeds) against its test data, the way
Argo CD does: the object is the global `obj`, the chunk returns a table with
`status` and `message`. Compares with health_test.yaml.

Usage: check_argo_health.py [ROOT]   (default: argo/resource_customizations)
Prints one line per test case; exits non-zero when any case fails.
"""
import os
import subprocess
import sys
import tempfile

import yaml

LUA = os.environ.get("LUA", "lua5.1")


def lua_literal(value):
    """A Lua table constructor for a YAML/JSON value (null becomes nil)."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        out = []
        for ch in value:
            code = ord(ch)
            if ch in "\\\"":
                out.append("\\" + ch)
            elif 32 <= code < 127:
                out.append(ch)
            else:
                # Lua 5.1 has only decimal byte escapes: emit UTF-8 bytes.
                out.extend("\\%d" % b for b in ch.encode("utf-8"))
        return '"' + "".join(out) + '"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if v is None:
                continue
            items.append("[%s] = %s" % (lua_literal(str(k)), lua_literal(v)))
        return "{" + ", ".join(items) + "}"
    # YAML timestamps and dates arrive as datetime objects: Argo sees strings.
    return lua_literal(str(value))


HARNESS = """
obj = %s
local chunk = assert(loadfile(%s))
local hs = chunk()
if type(hs) ~= "table" then
  io.stderr:write("health.lua returned no table\\n")
  os.exit(2)
end
io.write(tostring(hs.status), "\\n", tostring(hs.message or ""))
"""


class StringDatesLoader(yaml.SafeLoader):
    """Keeps timestamps as strings, as Argo CD's JSON objects have them."""


StringDatesLoader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def run_case(health_lua, data_path):
    with open(data_path, encoding="utf-8") as f:
        obj = yaml.load(f, Loader=StringDatesLoader)
    script = HARNESS % (lua_literal(obj), lua_literal(health_lua))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as tmp:
        tmp.write(script)
        path = tmp.name
    try:
        proc = subprocess.run([LUA, path], capture_output=True, text=True, check=False)
    finally:
        os.unlink(path)
    if proc.returncode != 0:
        return None, None, proc.stderr.strip()
    status, _, message = proc.stdout.partition("\n")
    return status, message, None


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "argo/resource_customizations"
    passed = failed = 0
    kinds = []
    for group in sorted(os.listdir(root)):
        for kind in sorted(os.listdir(os.path.join(root, group))):
            kinds.append((group, kind, os.path.join(root, group, kind)))
    if not kinds:
        print("argo-health: no health checks found under %s" % root)
        return 1
    for group, kind, d in kinds:
        health_lua = os.path.join(d, "health.lua")
        tests_file = os.path.join(d, "health_test.yaml")
        if not os.path.isfile(health_lua) or not os.path.isfile(tests_file):
            print("FAIL %s/%s: health.lua or health_test.yaml missing" % (group, kind))
            failed += 1
            continue
        with open(tests_file, encoding="utf-8") as f:
            tests = (yaml.safe_load(f) or {}).get("tests") or []
        if not tests:
            print("FAIL %s/%s: health_test.yaml has no tests" % (group, kind))
            failed += 1
        for t in tests:
            want = t["healthStatus"]
            data = os.path.join(d, t["inputPath"])
            status, message, err = run_case(health_lua, data)
            label = "%s/%s %s" % (group, kind, t["inputPath"])
            if err is not None:
                print("FAIL %s: lua error: %s" % (label, err))
                failed += 1
            elif status != want.get("status") or message != want.get("message", message):
                print("FAIL %s: got %s %r, want %s %r"
                      % (label, status, message, want.get("status"), want.get("message")))
                failed += 1
            else:
                print("ok   %s -> %s" % (label, status))
                passed += 1
    print("argo-health: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
