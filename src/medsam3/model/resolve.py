"""Which SAM3 model a command uses, and where its files are.

Resolution order (first that is set wins):

1. the explicit ``--model`` value (``model=`` argument): a local folder in transformers layout
   (``config.json``, ``model.safetensors``, tokenizer and processor files) or a Hugging Face Hub id;
2. the environment variable ``MEDSAM3_MODEL``;
3. ``model = "..."`` in the configuration file (``$MEDSAM3_CONFIG``, else
   ``$XDG_CONFIG_HOME/medsam3/config.toml``, else ``~/.config/medsam3/config.toml``);
4. the compact model bundled with the package (``medsam3/assets/models/medsam3-nano``).

A Hub id is only downloaded by :func:`model_directory`, i.e. when a command actually loads it, and only
when the network allows; every failure (offline, gated, missing) raises a :class:`ModelError` that says
what to do. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medsam3.errors import ModelError

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml
    except ModuleNotFoundError:
        _toml = None

ENV_MODEL = "MEDSAM3_MODEL"
ENV_CONFIG = "MEDSAM3_CONFIG"
BUNDLED_MODEL_NAME = "medsam3-nano"
BUNDLED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "models" / BUNDLED_MODEL_NAME
#: Files a transformers model folder is fetched with (weights, configuration, tokenizer, processor).
HUB_FILE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

HOW_TO_GET_A_MODEL = (
    "convert a SAM3 / Medical SAM3 checkpoint with `medsam3 convert sam3.pt OUT_DIR` and pass "
    f"`--model OUT_DIR`, set the environment variable {ENV_MODEL} to a model folder or Hub id "
    '(for example facebook/sam3), or write `model = "..."` in ~/.config/medsam3/config.toml'
)


@dataclass(frozen=True)
class ResolvedModel:
    """A model choice: ``source`` is a local folder path or a Hub id, ``kind`` says which.

    ``origin`` names where the choice came from (``--model``, ``MEDSAM3_MODEL``, the config file, bundled),
    for messages.
    """

    source: str
    kind: Literal["local", "hub", "bundled"]
    origin: str


def config_file_path() -> Path:
    """The user configuration file (which may not exist)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "medsam3" / "config.toml"


def _model_from_config_file() -> tuple[str, Path] | None:
    path = config_file_path()
    explicit = bool(os.environ.get(ENV_CONFIG))
    if not path.is_file():
        if explicit:
            raise ModelError(f"{path}: configuration file named by {ENV_CONFIG} does not exist")
        return None
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise ModelError(f"{path}: reading the configuration file needs Python 3.11+ or the tomli package")
    try:
        data = _toml.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, _toml.TOMLDecodeError) as exc:
        raise ModelError(f"{path}: cannot read the medsam3 configuration file ({exc})") from exc
    value = data.get("model")
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"{path}: `model` must be a non-empty string (a model folder or a Hub id)")
    return value.strip(), path


def _classify(value: str, origin: str, base: Path | None = None) -> ResolvedModel:
    """Turn a user value into a :class:`ResolvedModel`, checking local folders now."""
    text = value.strip()
    if not text:
        raise ModelError(f"{origin}: empty model name")
    path = Path(text).expanduser()
    if not path.is_absolute() and base is not None and (base / path).exists():
        path = base / path
    if path.exists():
        if path.is_file():
            if path.suffix.lower() in _CHECKPOINT_SUFFIXES:
                raise ModelError(
                    f"{text}: this is a checkpoint file, not a model folder; convert it first with "
                    f"`medsam3 convert {text} OUT_DIR` and use OUT_DIR as the model ({origin})"
                )
            raise ModelError(f"{text}: not a model folder ({origin}); expected a folder with config.json")
        check_model_folder(path, origin)
        return ResolvedModel(str(path.resolve()), "local", origin)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        raise ModelError(f"{text}: model folder not found ({origin}); {HOW_TO_GET_A_MODEL}")
    return ResolvedModel(text, "hub", origin)


def check_model_folder(path: Path, origin: str = "model") -> None:
    """Raise :class:`ModelError` unless ``path`` looks like a transformers model folder."""
    if not (path / "config.json").is_file():
        raise ModelError(
            f"{path}: not a transformers model folder ({origin}): config.json is missing; "
            f"{HOW_TO_GET_A_MODEL}"
        )
    weights = list(path.glob("*.safetensors")) + list(path.glob("*.safetensors.index.json"))
    if not weights:
        raise ModelError(f"{path}: no model.safetensors in this model folder ({origin})")


def resolve_model(model: str | os.PathLike | None = None) -> ResolvedModel:
    """Pick the model to use (see the module docstring for the order); nothing is downloaded here.

    Raises:
        ModelError: the chosen folder does not exist or is not a model folder, the configuration file is
            unreadable, or nothing is configured and the bundled model is not installed.
    """
    if model is not None and str(model).strip():
        return _classify(str(model), "--model")
    if os.environ.get(ENV_MODEL, "").strip():
        return _classify(os.environ[ENV_MODEL], f"environment variable {ENV_MODEL}")
    found = _model_from_config_file()
    if found is not None:
        value, path = found
        return _classify(value, f"configuration file {path}", base=path.parent)
    if BUNDLED_MODEL_DIR.is_dir():
        check_model_folder(BUNDLED_MODEL_DIR, "bundled model")
        return ResolvedModel(str(BUNDLED_MODEL_DIR), "bundled", "bundled model")
    raise ModelError(
        f"no SAM3 model configured, and the bundled compact model ({BUNDLED_MODEL_NAME}) is not installed "
        f"with this copy of medsam3; {HOW_TO_GET_A_MODEL}"
    )


def model_directory(resolved: ResolvedModel) -> Path:
    """The local folder of a resolved model, downloading a Hub model (into the Hub cache) if needed.

    Raises:
        ModelError: the Hub cannot be reached and the model is not cached, the repository is gated and the
            licence was not accepted / no token is set, or the repository does not exist.
    """
    if resolved.kind != "hub":
        return Path(resolved.source)
    repo = resolved.source
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise ModelError(f"{repo}: downloading Hub models needs the huggingface_hub package") from exc
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        folder = snapshot_download(repo, allow_patterns=list(HUB_FILE_PATTERNS), local_files_only=offline)
    except GatedRepoError as exc:
        raise ModelError(
            f"{repo}: this Hub model is gated; accept its licence at https://huggingface.co/{repo} and "
            "log in with `hf auth login` (or set HF_TOKEN), or convert a local sam3.pt with `medsam3 convert`"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"{repo}: no local folder of that name, and no such model on the Hugging Face Hub, or it is "
            f"private (log in with `hf auth login` if you have access) ({resolved.origin})"
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise ModelError(
            f"{repo}: no local folder of that name, not in the local Hub cache, and the Hub cannot be "
            "reached (offline"
            f"{', HF_HUB_OFFLINE is set' if offline else ''}); download it once while online, or convert a "
            "local sam3.pt with `medsam3 convert` and pass the folder with --model"
        ) from exc
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"{repo}: download from the Hugging Face Hub failed ({exc})") from exc
    path = Path(folder)
    check_model_folder(path, f"Hub model {repo}")
    return path
