"""The miniature CLIP of the demo world: text and image towers trained on the synthetic scenes.

Versatile Diffusion conditions on CLIP ViT-L/14 tokens; the demo cannot download them, and
random towers make the semantic pathway meaningless. This module holds what the miniature CLIP
is made of and how it is read:

* a word-level CLIP tokenizer over the scene captions' vocabulary (:func:`scene_tokenizer`): the
  byte-level alphabet of :func:`~havir.models.versatile.clip_byte_tokenizer` plus BPE merges that
  join each caption word into one token, so a caption fits CLIP's 77 tokens (character tokens
  would not: the longest captions run past 90 characters);
* ``CLIPTextModelWithProjection`` and ``CLIPVisionModelWithProjection`` (transformers) at a small
  size, with the released model's token counts (77 text tokens, 224-pixel images in 14-pixel
  patches: 257 image tokens) and a 32-wide projection, the ``tiny`` UNets' cross-attention width;
* :func:`load_demo_clip` reads the four folders the ``demo`` Versatile Diffusion layout uses
  (``tokenizer/``, ``image_feature_extractor/``, ``text_encoder/``, ``image_encoder/``);
* :func:`embed_images`, :func:`embed_texts` and :func:`retrieval_top1` measure it the way CLIP is
  measured: unit-norm pooled embeddings, image-to-caption retrieval among candidates.

Trained by ``scripts/train_demo_clip.py``. It knows only the synthetic scenes.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import CLIPImageProcessorPil, CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from havir.errors import MissingInputError
from havir.library_logging import quiet_model_libraries
from havir.models.versatile import DEMO_VD, TEXT_TOKENS
from havir.nsd.scenes import describe_scene, sample_scene

#: The miniature CLIP shipped with HAVIR (fp16 safetensors, trained by scripts/train_demo_clip.py).
DEMO_CLIP = DEMO_VD
FOLDERS = ("tokenizer", "image_feature_extractor", "text_encoder", "image_encoder")
# CLIP's pre-tokenizer splits words from punctuation runs the same way (after lower-casing).
_WORD = re.compile(r"[a-z]+|[^\sa-z]+")


def caption_vocabulary(scenes: int = 3000, seed: int = 0) -> list[str]:
    """Every word and punctuation run of the scene captions, sorted (53 today).

    Read off the caption generator itself (every template of ``scenes`` random scenes), so a
    word added to :mod:`havir.nsd.scenes` joins the vocabulary when the tokenizer is rebuilt.
    """
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    for _ in range(scenes):
        for caption in describe_scene(sample_scene(rng), rng, n_captions=6):
            words.update(_WORD.findall(caption.lower()))
    return sorted(words)


def scene_tokenizer(words: Sequence[str] | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer whose merges make each of ``words`` (default: the caption vocabulary) one
    token; any other text falls back to CLIP's byte alphabet, one token per character.

    Each word gets the merges that join, left to right, the pieces the merges made so far leave
    it in; later merges rank after every earlier one, so they cannot break an earlier word.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2/CLIP byte alphabet

    words = caption_vocabulary() if words is None else list(words)
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces := _apply_merges(symbols, ranks)) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.append(pieces[0] + pieces[1])
    merges = [f"{first} {second}" for (first, second), _ in sorted(ranks.items(), key=lambda item: item[1])]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch, "vocab.json"), Path(scratch, "merges.txt")
        vocab_file.write_text(json.dumps({token: index for index, token in enumerate(dict.fromkeys(vocab))}))
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TEXT_TOKENS)


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none is ranked
    (the loop of CLIP's ``bpe``, on the merges built so far)."""
    while len(symbols) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            return symbols
        first, second = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):  # every occurrence of the pair, left to right, as CLIP's bpe does
            if j < len(symbols) - 1 and symbols[j] == first and symbols[j + 1] == second:
                merged.append(first + second)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


@dataclass
class DemoClip:
    """The miniature CLIP's four parts, as the ``demo`` Versatile Diffusion holds them."""

    tokenizer: CLIPTokenizer
    image_processor: CLIPImageProcessorPil
    text_encoder: CLIPTextModelWithProjection
    image_encoder: CLIPVisionModelWithProjection

    def save_pretrained(self, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
        """Write the four folders (weights as ``dtype`` safetensors) under ``folder``."""
        folder = Path(folder)
        self.tokenizer.save_pretrained(folder / "tokenizer")
        self.image_processor.save_pretrained(folder / "image_feature_extractor")
        for name in ("text_encoder", "image_encoder"):
            module = getattr(self, name)
            original = module.dtype
            module.to(dtype).save_pretrained(folder / name, safe_serialization=True)
            module.to(original)
        return folder


@quiet_model_libraries()  # per-file bars would drown HAVIR's own progress
def load_demo_clip(folder: Path = DEMO_CLIP) -> DemoClip:
    """The miniature CLIP in ``folder`` (default: the shipped one), float32, eval mode."""
    folder = Path(folder)
    missing = [name for name in FOLDERS if not (folder / name).is_dir()]
    if missing:
        raise MissingInputError(
            f"miniature CLIP folder {folder} lacks {', '.join(missing)}: run scripts/train_demo_clip.py "
            "or pass the folder it wrote"
        )
    return DemoClip(
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        image_processor=CLIPImageProcessorPil.from_pretrained(folder / "image_feature_extractor"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", use_safetensors=True, torch_dtype=torch.float32).eval(),
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder / "image_encoder", use_safetensors=True, torch_dtype=torch.float32).eval(),
    )


def image_pixels(clip: DemoClip, images: np.ndarray | Sequence[PIL.Image.Image]) -> torch.Tensor:
    """CLIP's input for uint8 images (n, h, w, 3) or PIL images: float (n, 3, 224, 224)."""
    pil = [PIL.Image.fromarray(image) for image in images] if isinstance(images, np.ndarray) else list(images)
    return clip.image_processor(images=pil, return_tensors="pt").pixel_values


def text_ids(clip: DemoClip, texts: Sequence[str]) -> torch.Tensor:
    """Token ids of ``texts``, padded to CLIP's 77: int (n, 77)."""
    return clip.tokenizer(list(texts), padding="max_length", max_length=TEXT_TOKENS, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def embed_images(clip: DemoClip, images: np.ndarray | Sequence[PIL.Image.Image], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm pooled image embeddings (CLIP's ``image_embeds``): float (n, projection_dim)."""
    embeds = [clip.image_encoder(image_pixels(clip, images[start : start + batch_size])).image_embeds for start in range(0, len(images), batch_size)]
    return torch.nn.functional.normalize(torch.cat(embeds).float(), dim=-1)


@torch.no_grad()
def embed_texts(clip: DemoClip, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Unit-norm pooled text embeddings (CLIP's ``text_embeds``): float (n, projection_dim)."""
    embeds = [clip.text_encoder(text_ids(clip, texts[start : start + batch_size])).text_embeds for start in range(0, len(texts), batch_size)]
    return torch.nn.functional.normalize(torch.cat(embeds).float(), dim=-1)


def retrieval_top1(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> float:
    """Image-to-caption retrieval: the fraction of images i whose most similar caption (cosine,
    among all n) is caption i. ``image_embeds``, ``text_embeds``: (n, d), row i a matching pair."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings differ in shape: {tuple(image_embeds.shape)} vs {tuple(text_embeds.shape)}")
    similarity = image_embeds @ text_embeds.T
    return float((similarity.argmax(dim=1) == torch.arange(len(similarity))).float().mean())
