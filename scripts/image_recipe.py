#!/usr/bin/env python3
"""The pgbranch image's recipe, read from the Dockerfile, for builds without
Docker (scripts/e2e.sh on ../shared/k8s-node, whose image.sh assembles an
image from a base image tarball plus files).

The Dockerfile stays the one recipe: this script derives everything the
Docker-less build needs from it -- the base image, the cargo command, the
binary's path and mode in the image, USER, ENTRYPOINT and CMD -- and refuses
any instruction of the final stage it cannot reproduce (RUN, ENV, WORKDIR,
COPY from the build context, ...). Change the Dockerfile in a way this
script does not understand and the e2e image build fails instead of quietly
building something else.

usage:
  image_recipe.py [--dockerfile PATH] [--build-arg K=V]... describe
      the recipe as JSON
  image_recipe.py [--dockerfile PATH] [--build-arg K=V]... kit-args BINARY
      the image.sh/mkimage.py arguments (one a line) adding BINARY the way
      the Dockerfile does: --add BINARY:DEST:MODE and --config JSON
  image_recipe.py [--dockerfile PATH] [--build-arg K=V]... verify IMAGE.tar
      checks a docker-archive against the recipe: the binary at its path
      with its mode, owned by root, in the top layer; User, Entrypoint, Cmd
Exit status 1 with a message on any mismatch or unsupported instruction.
"""
import argparse
import io
import json
import re
import shlex
import sys
import tarfile


class RecipeError(Exception):
    pass


def logical_lines(text):
    """Dockerfile lines with continuations joined, comments and blanks dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


def substitute(s, args):
    def repl(m):
        name = m.group(1) or m.group(2)
        if name not in args:
            raise RecipeError("undefined build argument %s in %r" % (name, s))
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, s)


def json_list(rest, what):
    try:
        v = json.loads(rest)
    except ValueError:
        raise RecipeError("%s must be in JSON (exec) form, got %r" % (what, rest))
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise RecipeError("%s must be a JSON list of strings, got %r" % (what, rest))
    return v


def parse(text, build_args):
    """The recipe of a two-stage Dockerfile: a build stage that runs `cargo
    build` and `install`s the binary, and a final stage on a base image that
    copies it in and sets USER/ENTRYPOINT/CMD."""
    args = {}
    stages = []  # dicts: base, name, lines
    for line in logical_lines(text):
        word, _, rest = line.partition(" ")
        word = word.upper()
        rest = rest.strip()
        if word == "ARG":
            name, eq, default = rest.partition("=")
            name = name.strip()
            if name in build_args:
                args[name] = build_args[name]
            elif eq:
                args[name] = substitute(default.strip().strip('"'), args)
            elif name not in args:
                raise RecipeError("ARG %s has no default; pass --build-arg %s=..." % (name, name))
            continue
        if word == "FROM":
            parts = substitute(rest, args).split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append({"base": parts[0], "name": name, "lines": []})
            continue
        if not stages:
            raise RecipeError("%s before the first FROM" % word)
        stages[-1]["lines"].append((word, substitute(rest, args)))
    if len(stages) != 2:
        raise RecipeError("expected two stages (build, image), found %d" % len(stages))
    build, final = stages

    # The build stage: `cargo build ... --bin X` and `install -m MODE SRC DEST`.
    cargo = install = None
    for word, rest in build["lines"]:
        if word != "RUN":
            continue
        words = shlex.split(re.sub(r"--mount=\S+", "", rest))
        for cmd in " ".join(words).split("&&"):
            c = shlex.split(cmd)
            if c[:2] == ["cargo", "build"]:
                cargo = c[1:]
            elif c[:1] == ["install"]:
                install = c[1:]
    if cargo is None or "--bin" not in cargo:
        raise RecipeError("the build stage has no `cargo build ... --bin NAME`")
    if "--release" not in cargo:
        raise RecipeError("the build stage's cargo build is not --release")
    binary = cargo[cargo.index("--bin") + 1]
    if not install or install[0] != "-m" or len(install) != 4:
        raise RecipeError("the build stage has no `install -m MODE target/release/%s DEST`" % binary)
    mode, src, installed = install[1], install[2], install[3]
    if src != "target/release/%s" % binary:
        raise RecipeError("install copies %s, not target/release/%s" % (src, binary))

    # The final stage: only what this script can reproduce.
    recipe = {
        "base": final["base"],
        "cargo": cargo,
        "binary": src,
        "dest": None,
        "mode": mode,
        "user": None,
        "entrypoint": None,
        "cmd": None,
    }
    for word, rest in final["lines"]:
        if word == "COPY":
            parts = rest.split()
            if len(parts) != 3 or parts[0] != "--from=%s" % build["name"]:
                raise RecipeError("COPY %s: only `COPY --from=%s SRC DEST` is reproduced" % (rest, build["name"]))
            if parts[1] != installed:
                raise RecipeError("COPY --from=%s %s: the build stage installed %s" % (build["name"], parts[1], installed))
            if recipe["dest"] is not None:
                raise RecipeError("more than one COPY into the image")
            recipe["dest"] = parts[2]
        elif word == "USER":
            recipe["user"] = rest
        elif word == "ENTRYPOINT":
            recipe["entrypoint"] = json_list(rest, "ENTRYPOINT")
        elif word == "CMD":
            recipe["cmd"] = json_list(rest, "CMD")
        else:
            raise RecipeError(
                "the image stage's %s %s cannot be reproduced without Docker; "
                "teach scripts/image_recipe.py (and scripts/e2e.sh) to do it" % (word, rest))
    for key in ("dest", "user", "entrypoint"):
        if recipe[key] is None:
            raise RecipeError("the image stage sets no %s" % key.upper())
    return recipe


def image_config(recipe):
    cfg = {"User": recipe["user"], "Entrypoint": recipe["entrypoint"]}
    if recipe["cmd"] is not None:
        cfg["Cmd"] = recipe["cmd"]
    return cfg


def kit_args(recipe, binary):
    return ["--add", "%s:%s:%s" % (binary, recipe["dest"], recipe["mode"]),
            "--config", json.dumps(image_config(recipe), separators=(",", ":"))]


def verify(recipe, image_tar):
    """Problems of a docker-archive against the recipe (empty: it matches)."""
    problems = []
    with tarfile.open(image_tar) as t:
        manifest = json.load(t.extractfile("manifest.json"))[0]
        config = json.load(t.extractfile(manifest["Config"])).get("config", {})
        top = t.extractfile(manifest["Layers"][-1]).read()
    for key, want in image_config(recipe).items():
        if config.get(key) != want:
            problems.append("config %s is %r, the Dockerfile says %r" % (key, config.get(key), want))
    with tarfile.open(fileobj=io.BytesIO(top)) as layer:
        names = {m.name.lstrip("./").lstrip("/"): m for m in layer.getmembers()}
        m = names.get(recipe["dest"].lstrip("/"))
        if m is None or not m.isfile():
            problems.append("%s is not a file in the image's top layer" % recipe["dest"])
        else:
            if m.mode & 0o7777 != int(recipe["mode"], 8):
                problems.append("%s has mode %o, the Dockerfile installs it %s" % (recipe["dest"], m.mode & 0o7777, recipe["mode"]))
            if (m.uid, m.gid) != (0, 0):
                problems.append("%s is owned by %d:%d, COPY makes it root's" % (recipe["dest"], m.uid, m.gid))
    return problems


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dockerfile", default="Dockerfile")
    ap.add_argument("--build-arg", action="append", default=[])
    ap.add_argument("command", choices=["describe", "kit-args", "verify"])
    ap.add_argument("path", nargs="?")
    a = ap.parse_args(argv)
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    try:
        with open(a.dockerfile, encoding="utf-8") as f:
            recipe = parse(f.read(), build_args)
        if a.command == "describe":
            print(json.dumps(recipe, indent=2))
        elif a.command == "kit-args":
            if not a.path:
                raise RecipeError("kit-args needs the binary's path")
            print("\n".join(kit_args(recipe, a.path)))
        else:
            if not a.path:
                raise RecipeError("verify needs the image tarball's path")
            problems = verify(recipe, a.path)
            for p in problems:
                print("image_recipe: %s: %s" % (a.path, p), file=sys.stderr)
            if problems:
                return 1
            print("image_recipe: %s matches %s (%s %s, User %s, Entrypoint %s)" % (
                a.path, a.dockerfile, recipe["dest"], recipe["mode"], recipe["user"],
                json.dumps(recipe["entrypoint"])))
    except RecipeError as e:
        print("image_recipe: %s: %s" % (a.dockerfile, e), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
