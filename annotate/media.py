"""Validation of uploaded media: the type is sniffed from the bytes, never from the file name.

Every failure raises ``MediaError`` with a message fit to show the uploader.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from typing import IO

from django.conf import settings
from PIL import Image


class MediaError(ValueError):
    """Bad upload; the message says what is wrong."""


class MediaTooLarge(MediaError):
    """The upload exceeds a size, pixel or duration limit."""


@dataclass(frozen=True)
class MediaInfo:
    modality: str
    mime_type: str
    extension: str
    content_hash: str
    byte_size: int
    width: int | None = None
    height: int | None = None
    duration: float | None = None
    frames: int | None = None
    fps: float | None = None
    extra: dict[str, object] = field(default_factory=dict)


_IMAGE_FORMATS = {
    "PNG": ("image/png", "png"),
    "JPEG": ("image/jpeg", "jpg"),
    "WEBP": ("image/webp", "webp"),
    "GIF": ("image/gif", "gif"),
}
# Frame rate assumed at most when bounding how many packets a video of the longest allowed
# duration can have.
_MAX_FPS = 240
# Container names PyAV reports, mapped to what browsers play.
_VIDEO_FORMATS = {
    "mp4": ("video/mp4", "mp4"),
    "mov": ("video/mp4", "mp4"),
    "webm": ("video/webm", "webm"),
    "matroska": ("video/webm", "webm"),
}


def sniff_modality(head: bytes) -> str | None:
    """Guess image/video from magic bytes; None when neither."""
    if (
        head.startswith(b"\x89PNG\r\n\x1a\n")
        or head.startswith(b"\xff\xd8\xff")
        or head[:6] in (b"GIF87a", b"GIF89a")
    ):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3":
        return "video"
    return None


def _hash_stream(fh: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    fh.seek(0)
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
        size += len(chunk)
    fh.seek(0)
    return h.hexdigest(), size


def inspect_image(fh: IO[bytes], *, max_bytes: int | None = None, max_pixels: int | None = None) -> MediaInfo:
    max_bytes = max_bytes or settings.RL_MAX_IMAGE_BYTES
    max_pixels = max_pixels or settings.RL_MAX_IMAGE_PIXELS
    digest, size = _hash_stream(fh)
    if size == 0:
        raise MediaError("the image file is empty")
    if size > max_bytes:
        raise MediaTooLarge(f"image is {size} bytes; the limit is {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh)
            fmt = img.format or ""
            width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    except Exception as exc:
        raise MediaError("not a readable image (PNG, JPEG, WebP or GIF expected)") from exc
    if fmt not in _IMAGE_FORMATS:
        raise MediaError(f"unsupported image format {fmt or 'unknown'}; use PNG, JPEG, WebP or GIF")
    if width * height > max_pixels:
        # Checked before decoding: a decompression bomb is refused from its header alone.
        raise MediaTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        fh.seek(0)
        with Image.open(fh) as full:
            full.load()  # decodes every byte: truncated files fail here
    except Exception as exc:
        raise MediaError(f"image data is corrupt or truncated ({exc.__class__.__name__})") from exc
    fh.seek(0)
    mime, ext = _IMAGE_FORMATS[fmt]
    return MediaInfo(
        modality="image",
        mime_type=mime,
        extension=ext,
        content_hash=digest,
        byte_size=size,
        width=width,
        height=height,
    )


def inspect_video(
    fh: IO[bytes],
    *,
    max_bytes: int | None = None,
    max_seconds: int | None = None,
    max_pixels: int | None = None,
) -> MediaInfo:
    import av

    max_bytes = max_bytes or settings.RL_MAX_VIDEO_BYTES
    max_seconds = max_seconds or settings.RL_MAX_VIDEO_SECONDS
    max_pixels = max_pixels or settings.RL_MAX_IMAGE_PIXELS
    digest, size = _hash_stream(fh)
    if size == 0:
        raise MediaError("the video file is empty")
    if size > max_bytes:
        raise MediaTooLarge(f"video is {size} bytes; the limit is {max_bytes} bytes")
    try:
        with av.open(fh, mode="r") as container:
            fmt_names = set(container.format.name.split(","))
            if not container.streams.video:
                raise MediaError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            fps = float(stream.average_rate) if stream.average_rate else None
            duration = None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / 1_000_000
            if width * height > max_pixels:
                raise MediaTooLarge(f"video frames are {width}x{height}; the pixel limit is {max_pixels}")
            if duration is not None and duration > max_seconds:
                raise MediaTooLarge(f"video is {duration:.1f} s long; the limit is {max_seconds} s")
            # Demux and decode the whole stream: truncated or corrupt files fail here, not in the
            # browser. The header's duration is only a claim (a WebM written without seeking has
            # none): the packets' timestamps say how long it plays, and the loop stops as soon as
            # they pass the limit, so a long file costs at most max_seconds of decoding. Packets
            # are capped too, in case the timestamps are missing or stand still.
            frames = packets = 0
            first_ts: int | None = None
            last_ts: int | None = None
            time_base = stream.time_base
            max_packets = max_seconds * _MAX_FPS
            for packet in container.demux(stream):
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is not None and time_base is not None:
                    end = ts + (packet.duration or 0)
                    first_ts = ts if first_ts is None else min(first_ts, ts)
                    last_ts = end if last_ts is None else max(last_ts, end)
                    played = float((last_ts - first_ts) * time_base)
                    if played > max_seconds:
                        raise MediaTooLarge(
                            f"video plays for more than {played:.1f} s; the limit is {max_seconds} s"
                        )
                if packet.size:
                    packets += 1
                    if packets > max_packets:
                        raise MediaTooLarge(
                            f"video has more than {max_packets} frames; the limit is {max_seconds} s"
                            f" at up to {_MAX_FPS} fps"
                        )
                for _frame in packet.decode():
                    frames += 1
            if frames == 0:
                raise MediaError("the video has no decodable frames")
            if duration is None and first_ts is not None and last_ts is not None and time_base is not None:
                duration = float((last_ts - first_ts) * time_base)
            codec = stream.codec_context.name
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"not a readable video ({exc.__class__.__name__}: {exc})") from exc
    fh.seek(0)
    fmt = next((f for f in ("mp4", "mov", "webm", "matroska") if f in fmt_names), None)
    if fmt is None:
        raise MediaError(
            f"unsupported video container {sorted(fmt_names)}; use MP4 (H.264) or WebM (VP8/VP9)"
        )
    if codec not in {"h264", "vp8", "vp9", "av1"}:
        raise MediaError(f"unsupported video codec {codec}; browsers play H.264, VP8, VP9 or AV1")
    mime, ext = _VIDEO_FORMATS[fmt]
    if fmt in {"webm", "matroska"} and codec == "h264":
        mime, ext = "video/mp4", "mkv"
    if duration is None and fps:
        duration = frames / fps
    return MediaInfo(
        modality="video",
        mime_type=mime,
        extension=ext,
        content_hash=digest,
        byte_size=size,
        width=width,
        height=height,
        duration=duration,
        frames=frames,
        fps=fps,
        extra={"codec": codec},
    )


def inspect_media(fh: IO[bytes]) -> MediaInfo:
    """Sniff and validate an uploaded image or video."""
    fh.seek(0)
    head = fh.read(64)
    fh.seek(0)
    kind = sniff_modality(head)
    if kind == "image":
        return inspect_image(fh)
    if kind == "video":
        return inspect_video(fh)
    raise MediaError("unsupported file type: expected an image (PNG, JPEG, WebP, GIF) or a video (MP4, WebM)")


def inspect_text(text: str, *, allow_empty: bool = False) -> MediaInfo:
    """``allow_empty``: an empty text is a valid model output (imported preference data has them:
    the assistant said nothing, and that was preferred); uploads by hand still refuse one."""
    if not allow_empty and (not text or not text.strip()):
        raise MediaError("text sample is empty")
    if len(text) > settings.RL_MAX_TEXT_CHARS:
        raise MediaTooLarge(f"text is {len(text)} characters; the limit is {settings.RL_MAX_TEXT_CHARS}")
    if "\x00" in text:
        raise MediaError("text contains NUL characters")
    data = text.encode("utf-8")
    return MediaInfo(
        modality="text",
        mime_type="text/markdown",
        extension="md",
        content_hash=hashlib.sha256(data).hexdigest(),
        byte_size=len(data),
    )


def open_bytes(data: bytes) -> IO[bytes]:
    return io.BytesIO(data)
