#!/usr/bin/env python3
"""Validates custom resources (samples, Argo CD health test data) against the
openAPIV3Schema of our CRDs in crds/, strictly: an object schema with
`properties` accepts no other field (the API server would silently prune
it, and a typo in a sample would go unnoticed), unless the schema says
x-kubernetes-preserve-unknown-fields.

Usage: check_crd_objects.py CRD_DIR FILE_OR_DIR...
Prints one line per object; exits non-zero when any object fails. CEL rules
(x-kubernetes-validations) are not evaluated here: the real-apiserver test
tier does that.
"""
import copy
import os
import re
import sys

import jsonschema
import yaml

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def strict(schema):
    """Copy of an OpenAPI v3 structural schema as a strict JSON Schema."""
    s = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.get("x-kubernetes-int-or-string"):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.pop("nullable", False) and "type" in node:
            node["type"] = [node["type"], "null"]
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for key in ("properties", "patternProperties"):
            for child in (node.get(key) or {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            if isinstance(node.get(key), dict):
                walk(node[key])
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key) or []:
                walk(child)

    walk(s)
    return s


def load_crds(crd_dir):
    schemas = {}
    for name in sorted(os.listdir(crd_dir)):
        if not name.endswith((".yaml", ".yml")):
            continue
        with open(os.path.join(crd_dir, name), encoding="utf-8") as f:
            for crd in yaml.safe_load_all(f):
                if not crd or crd.get("kind") != "CustomResourceDefinition":
                    continue
                group = crd["spec"]["group"]
                kind = crd["spec"]["names"]["kind"]
                for v in crd["spec"]["versions"]:
                    schema = strict(v["schema"]["openAPIV3Schema"])
                    # metadata is the API server's: checked by hand below.
                    schema.get("properties", {}).pop("metadata", None)
                    schema["properties"]["metadata"] = {"type": "object"}
                    schema["properties"]["apiVersion"] = {"type": "string"}
                    schema["properties"]["kind"] = {"type": "string"}
                    schemas[("%s/%s" % (group, v["name"]), kind)] = schema
    return schemas


def files(args):
    for a in args:
        if os.path.isdir(a):
            for root, _, names in sorted(os.walk(a)):
                for n in sorted(names):
                    if n.endswith((".yaml", ".yml")) and n != "kustomization.yaml":
                        yield os.path.join(root, n)
        else:
            yield a


def main():
    crd_dir, targets = sys.argv[1], sys.argv[2:]
    schemas = load_crds(crd_dir)
    if not schemas:
        print("no CRDs found in %s" % crd_dir)
        return 1
    passed = failed = 0
    for path in files(targets):
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        for doc in docs:
            key = (doc.get("apiVersion"), doc.get("kind"))
            name = (doc.get("metadata") or {}).get("name", "?")
            label = "%s %s/%s" % (path, doc.get("kind"), name)
            if key not in schemas:
                if str(key[0]).startswith("pgbranch.dev/"):
                    print("FAIL %s: no CRD for %s %s" % (label, key[0], key[1]))
                    failed += 1
                continue
            errors = sorted(jsonschema.Draft7Validator(schemas[key]).iter_errors(doc),
                            key=lambda e: list(e.absolute_path))
            if not DNS1123_SUBDOMAIN.match(str(name)) or len(str(name)) > 63:
                errors.append("metadata.name %r is not a DNS label" % name)
            if errors:
                failed += 1
                for e in errors:
                    where = ".".join(str(p) for p in getattr(e, "absolute_path", []))
                    print("FAIL %s: %s%s" % (label, where + ": " if where else "", getattr(e, "message", e)))
            else:
                passed += 1
                print("ok   %s" % label)
    print("crd-objects: %d passed, %d failed" % (passed, failed))
    return 1 if failed or passed == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
