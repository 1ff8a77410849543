"""Encoders: which one a project uses by default, registering and inspecting encoder directories (config only), loading them in a worker."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

from django.conf import settings

from annotate.errors import Invalid
from annotate.models import Project, Sample
from rewards.models import (
    Encoder,
    RewardConfig,
)

log = logging.getLogger(__name__)


def project_modalities(project: Project) -> list[str]:
    """The modalities a project's samples have: its own, or for a mixed project (blank modality)
    those its samples actually use."""
    if project.modality:
        return [project.modality]
    return sorted(set(Sample.objects.filter(project=project).values_list("modality", flat=True)))


BUILTIN = "builtin"


def _default_media_encoder() -> str:
    """``RL_DEFAULT_MEDIA_ENCODER``: the encoder of projects with images or videos whose reward
    config names none. ``builtin`` (the default) is the small image-text CLIP built under
    ``var/encoders`` on first use, which also embeds text samples, so a mixed project (the demo)
    trains out of the box; a path names a local CLIP/SigLIP directory; blank means none (a launch
    without an encoder is refused)."""
    import os

    value = getattr(settings, "RL_DEFAULT_MEDIA_ENCODER", None)
    return str(os.environ.get("RL_DEFAULT_MEDIA_ENCODER", BUILTIN) if value is None else value).strip()


def builtin_encoder_path() -> str:
    """The built-in image-text encoder's directory (built on first use, nothing downloaded)."""
    from rewards.ml.builtin_encoder import ensure_builtin_encoder

    return str(ensure_builtin_encoder(Path(settings.VAR_DIR) / "encoders"))


def encoder_default_path(project: Project) -> str:
    modalities = project_modalities(project)
    if modalities == ["text"]:
        from rewards.ml.encoders import default_text_encoder_path

        return str(default_text_encoder_path())
    default = _default_media_encoder()
    if default == BUILTIN:
        return builtin_encoder_path()
    if default:
        return default
    raise Invalid(
        f"project {project.slug!r} has no encoder configured: set a local CLIP or SigLIP directory "
        "in its reward config (admin) or pass one with the job (RL_DEFAULT_MEDIA_ENCODER is blank)"
    )


# --- Encoders and the embedding cache --------------------------------------------------------------
def encoder_register(*, path: str) -> Encoder:
    """Validate a local encoder directory (config only, no weights loaded) and record it by the
    fingerprint of its weights."""
    return encoder_record(encoder_inspect(path))


def encoder_inspect(path: str) -> Any:
    """``inspect_encoder`` with its error as a 400; reads files only, writes no row."""
    from rewards.ml.encoders import EncoderError, inspect_encoder

    try:
        return inspect_encoder(path)
    except EncoderError as exc:
        raise Invalid(str(exc), code="bad_encoder") from exc
    except (OSError, ValueError) as exc:  # a name too long for the filesystem, a NUL byte...
        raise Invalid(
            f"encoder directory {path[:200]!r} cannot be read ({type(exc).__name__})", code="bad_encoder"
        ) from exc


def encoder_known(path: str) -> bool:
    """A directory registered before (by staff, or as a project's configured encoder)."""
    try:
        resolved = str(Path(path).expanduser().resolve())
    except (OSError, ValueError):
        return False
    return (
        Encoder.objects.filter(path__in={path, resolved}).exists()
        or RewardConfig.objects.filter(encoder_path=path).exists()
    )


def encoder_record(info: Any) -> Encoder:
    encoder, created = Encoder.objects.get_or_create(
        fingerprint=info.fingerprint,
        defaults={
            "name": info.name,
            "path": info.path,
            "family": info.family,
            "model_type": info.model_type,
            "dim": info.dim,
            "modalities": list(info.modalities),
        },
    )
    if not created and encoder.path != info.path:
        Encoder.objects.filter(id=encoder.id).update(path=info.path)
        encoder.path = info.path
    return encoder


def encoder_supports(encoder: Encoder | Any, modality: str) -> bool:
    """Whether ``encoder`` (a row or an ``EncoderInfo``) embeds samples of ``modality``."""
    modalities = list(encoder.modalities or ())
    if not modalities:  # a row written before encoders recorded what they embed
        modalities = ["text"] if encoder.family == "text" else ["image", "video"]
    return modality in modalities


_LOADED: dict[tuple[str, str], Any] = {}


def encoder_load(encoder: Encoder, device: str) -> Any:
    """Load once per process: a worker embedding several batches keeps the weights in memory."""
    from rewards.ml.encoders import EncoderError, load_encoder

    key = (encoder.fingerprint, device)
    if key not in _LOADED:
        try:
            loaded = load_encoder(encoder.path, device=device)
        except EncoderError as exc:
            raise Invalid(str(exc), code="bad_encoder") from exc
        if loaded.info.fingerprint != encoder.fingerprint:
            raise Invalid(f"the encoder at {encoder.path} changed since it was registered; register it again")
        _LOADED.clear()  # one encoder in memory at a time
        _LOADED[key] = loaded
    return _LOADED[key]


def sample_image_open(sample: Sample) -> Any:
    from PIL import Image

    with sample.media.open("rb") as fh:
        image = Image.open(io.BytesIO(fh.read()))
        image.load()
    return image.convert("RGB")
